"""Gradient-inversion attacks on video classifiers."""

from vidleak_jax.attack import checkpoint, driver, sharding
from vidleak_jax.attack.checkpoint import AttackInterrupted
from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.engine import Attack, AttackState, make_attack, make_optimisation
from vidleak_jax.attack.fast_convs import fast_convs
from vidleak_jax.attack.labels import recover_labels
from vidleak_jax.attack.objectives import DISTANCES, gradient_matching_loss
from vidleak_jax.attack.optimizers import OPTIMIZERS, SCHEDULES
from vidleak_jax.attack.parametrize import PARAMETRIZATIONS
from vidleak_jax.attack.priors import PRIORS
from vidleak_jax.attack.reconstruct import Reconstruction, reconstruct

__all__ = [
    "Attack", "AttackConfig", "AttackInterrupted", "AttackState", "DISTANCES", "OPTIMIZERS",
    "PARAMETRIZATIONS", "PRIORS", "Reconstruction", "SCHEDULES", "checkpoint", "driver",
    "fast_convs", "gradient_matching_loss", "make_attack", "make_optimisation", "reconstruct",
    "recover_labels", "sharding",
]

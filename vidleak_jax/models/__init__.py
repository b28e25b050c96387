"""Victim models and the module → pure-function bridge."""

from vidleak_jax.models.pure import pure
from vidleak_jax.models.victims import ACTIVATIONS, VICTIMS, create

__all__ = ["ACTIVATIONS", "VICTIMS", "create", "pure"]

"""Victim models, frozen feature extractors + classifier heads, and the module → pure bridge."""

from vidleak_jax.models.extractors import EXTRACTORS, create_extractor, frozen
from vidleak_jax.models.heads import HEADS, create_head, feature_victim
from vidleak_jax.models.pure import pure
from vidleak_jax.models.victims import ACTIVATIONS, VICTIMS, create

__all__ = ["ACTIVATIONS", "EXTRACTORS", "HEADS", "VICTIMS", "create", "create_extractor",
           "create_head", "feature_victim", "frozen", "pure"]

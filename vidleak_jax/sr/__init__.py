"""Super-resolution of reconstructed clips: classical resizing and learned networks (Flax NNX)."""

from vidleak_jax.sr.apply import apply_model, bicubic, lanczos3, stack_neighbours
from vidleak_jax.sr.methods import SR_METHODS, SRConfig, SRSetup
from vidleak_jax.sr.models import EDSR, ESPCN, SR_MODELS, SR_SCALES, create_model, pixel_shuffle

__all__ = [
    "EDSR", "ESPCN", "SRConfig", "SRSetup", "SR_METHODS", "SR_MODELS", "SR_SCALES",
    "apply_model", "bicubic", "create_model", "lanczos3", "pixel_shuffle", "stack_neighbours",
]

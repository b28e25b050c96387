"""Video data sources: synthetic surveillance-like clips."""

from __future__ import annotations

from vidleak_jax.data.synthetic import class_directions, environment, synthetic_clips

__all__ = ["class_directions", "environment", "synthetic_clips"]

"""vidleak_jax: how much private video leaks from federated-learning gradients."""

from vidleak_jax import attack, data, fl, inputs, metrics, models

__version__ = "0.1.0"
__all__ = ["attack", "data", "fl", "inputs", "metrics", "models"]

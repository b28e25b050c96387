"""Federated-learning client updates (what the attacker observes)."""

from vidleak_jax.fl.updates import client_update, cross_entropy, fedavg_update

__all__ = ["client_update", "cross_entropy", "fedavg_update"]

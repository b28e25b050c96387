"""Federated learning: what clients compute and share (FedSGD gradients, FedAvg deltas after local
epochs over mini-batches), the server's aggregation and rounds, and the attacker's replay."""

from vidleak_jax.fl.local import (APPROXIMATIONS, LocalTraining, UpdateFn, fedavg_update,
                                  local_train, minibatch_order, replay)
from vidleak_jax.fl.server import accuracy, aggregate, aggregated, client_keys, fedavg_round, train_global
from vidleak_jax.fl.updates import client_update, cross_entropy

__all__ = ["APPROXIMATIONS", "LocalTraining", "UpdateFn", "accuracy", "aggregate", "aggregated",
           "client_keys",
           "client_update", "cross_entropy", "fedavg_round", "fedavg_update", "local_train",
           "minibatch_order", "replay", "train_global"]

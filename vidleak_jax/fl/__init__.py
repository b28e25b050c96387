"""Federated learning: what clients compute and share (FedSGD gradients, FedAvg deltas after local
epochs over mini-batches), the server's aggregation and rounds, the attacker's replay, client-side
defences (update transforms, `defenses`) and DP-SGD with its accountant (`privacy`)."""

from vidleak_jax.fl import defenses, privacy, soteria
from vidleak_jax.fl.defenses import DEFENSES, Defense, compose, defend, support
from vidleak_jax.fl.local import (APPROXIMATIONS, LocalTraining, UpdateFn, fedavg_update,
                                  local_train, minibatch_order, replay)
from vidleak_jax.fl.privacy import dp_client_update, dp_fedavg_update, epsilon
from vidleak_jax.fl.server import (ClientFn, accuracy, aggregate, aggregated, client_keys,
                                   fedavg_client, fedavg_round, train_global)
from vidleak_jax.fl.updates import client_update, cross_entropy

__all__ = ["APPROXIMATIONS", "ClientFn", "LocalTraining", "UpdateFn", "accuracy", "aggregate",
           "aggregated", "client_keys", "fedavg_client",
           "client_update", "cross_entropy", "fedavg_round", "fedavg_update", "local_train",
           "minibatch_order", "replay", "train_global"]
__all__ += ["DEFENSES", "Defense", "compose", "defend", "defenses", "dp_client_update",
            "dp_fedavg_update", "epsilon",
            "privacy", "soteria", "support"]

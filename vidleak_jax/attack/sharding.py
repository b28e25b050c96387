"""Restarts sharded over a device mesh: each device optimises its slice of the R candidates.

Candidates never interact, so the sharded attack is `shard_map` of the single-device one with
no communication inside a step; results equal the single-device run for the same seed.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidleak_jax.attack.engine import Attack, AttackState

AXIS = "candidates"


def candidate_mesh(num_restarts: int, devices=None) -> Mesh | None:
  """A 1-D mesh over all (or the given) devices, or None when R does not split evenly or n = 1."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < 2 or num_restarts % len(devices):
    return None
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def _state_specs() -> AttackState:
  return AttackState(candidates=P(AXIS), opt_state=P(AXIS), step=P(), best_loss=P(AXIS),
                     best_candidates=P(AXIS))


def place_state(state: AttackState, mesh: Mesh) -> AttackState:
  """Puts the state on `mesh`, split along the leading restart axis (the step is replicated)."""
  specs = _state_specs()
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                           is_leaf=lambda x: isinstance(x, P))
  expanded = AttackState(*(jax.tree.map(lambda _, sh=sh: sh, part)
                           for part, sh in zip(state, shardings)))
  return jax.device_put(state, expanded)


def shard_candidates(attack: Attack, mesh: Mesh) -> Attack:
  """The same attack with `run` and `finalize` applied per device to its shard of restarts."""
  specs = _state_specs()
  # check_vma=False: the step counter is computed identically on every device (replicated),
  # which the varying-axes check cannot see through lax.cond.
  run = jax.shard_map(attack.run, mesh=mesh, in_specs=(specs, P()),
                      out_specs=(specs, P(None, AXIS)), check_vma=False)
  finalize = jax.shard_map(attack.finalize, mesh=mesh, in_specs=(specs,), out_specs=specs,
                           check_vma=False)
  return attack._replace(run=run, finalize=finalize)

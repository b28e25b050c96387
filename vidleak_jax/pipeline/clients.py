"""The clients' side of the attacked round and what the attacker models of it: the N clients'
private batches, their mini-batch orders, defences and (aggregated) update, and the attacker's
replay of that update (`attacker_update_fn`), penalty scaling and label-recovery trajectory.
Everything here reads the run directory through `rundir`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from vidleak_jax import fl
from vidleak_jax.attack import AttackConfig
from vidleak_jax.attack import labels as labels_lib
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import CLIENT_OPTIONS, DP_SGD, SOTERIA, RunConfig, parse_defenses
from vidleak_jax.settings import InvalidSetting
from vidleak_jax.tree_io import flatten_tree, leaf_paths, unflatten_like
from vidleak_jax.types import ApplyFn, Grads, Params


def attacked_clips(cfg: RunConfig) -> int:
  """Clips in the attacked round: N clients × B clips."""
  return cfg.clients * cfg.batch_size


def client_batch(cfg: RunConfig) -> tuple[jax.Array, jax.Array]:
  """The attacked round's private clips [N·B,T,H,W,C] and labels [N·B] from data.npz (client i
  holds rows i·B .. i·B+B−1), checked against cfg."""
  batch = rundir.require(cfg, "data.npz", "data")
  clips, labels = jnp.asarray(batch["clips"]), jnp.asarray(batch["labels"])
  expected = (attacked_clips(cfg), *cfg.clip_shape)
  if clips.shape != expected:
    raise InvalidSetting("clip_shape", f"data.npz holds clips of shape {clips.shape}, but "
                         f"clients={cfg.clients}, batch_size={cfg.batch_size} and clip_shape="
                         f"{cfg.clip_shape} ask for {expected}: rerun the 'data' stage")
  return clips, labels


def client_orders(cfg: RunConfig) -> jax.Array | None:
  """Each attacked client's local mini-batch order, int32 [N, steps, b] (FedAvg), else None."""
  if cfg.update != "fedavg":
    return None
  return jax.vmap(lambda k: fl.minibatch_order(k, cfg.batch_size, cfg.local))(
      fl.client_keys(rundir.keys(cfg.seed)["clients"], 0, cfg.clients))


def defense_key(cfg: RunConfig, client: int) -> jax.Array:
  """The key from which attacked client `client` draws its defences' randomness
  (`fl.defend(key, update, defenses)`: defence j draws from fold_in(key, j))."""
  return jax.random.fold_in(rundir.keys(cfg.seed)["defenses"], client)


def _dp_sgd(cfg: RunConfig) -> dict[str, Any] | None:
  """dp_sgd's settings (clip_norm, noise_multiplier) when cfg.defenses starts with it, else None."""
  return _option(cfg, DP_SGD)


def _option(cfg: RunConfig, name: str) -> dict[str, Any] | None:
  """The settings of client option `name` (dp_sgd, soteria) in cfg.defenses, else None."""
  return dict(parse_defenses(cfg.defenses)).get(name)


def update_transforms(cfg: RunConfig) -> list[tuple[str, fl.Defense]]:
  """(spec, defence) of cfg.defenses' update transforms (all but the client options), in
  order."""
  return [(spec, fl.defenses.from_spec(spec)) for spec in cfg.defenses
          if fl.defenses.parse_spec(spec)[0] not in CLIENT_OPTIONS]


def classifier_kernel(cfg: RunConfig, apply_fn: ApplyFn, params: Params) -> str:
  """Path of the classifier's kernel [F, K]: the 2-D leaf next to the output bias (found
  structurally, `attack.labels.output_bias_path`) whose last axis is K."""
  bias = labels_lib.output_bias_path(apply_fn, params, (1, *cfg.clip_shape))
  parent = bias.rpartition("/")[0]
  found = [p for p, leaf in zip(leaf_paths(params), jax.tree.leaves(params))
           if p.rpartition("/")[0] == parent and jnp.ndim(leaf) == 2
           and leaf.shape[-1] == cfg.num_classes]
  if len(found) != 1:
    raise InvalidSetting("defenses", f"defenses: soteria needs the classifier's kernel [F, "
                         f"{cfg.num_classes}] next to the output bias {bias!r}; found {found}")
  return found[0]


def soteria_updates(cfg: RunConfig, apply_fn: ApplyFn, params: Params, clips: jax.Array,
                    updates: Grads) -> Grads:
  """Each client's update [N, ...] (leaves) after Soteria (cfg.defenses' soteria settings) on
  its clips [N, B, ...], at the round's params."""
  percent = _option(cfg, SOTERIA)["percent"]
  kernel = classifier_kernel(cfg, apply_fn, params)
  fl.soteria.check_dense(apply_fn, params, clips[0], fl.soteria.kernel_index(params, kernel),
                         kernel)
  one = lambda c, u: fl.soteria.soteria(apply_fn, params, c, u, kernel=kernel, percent=percent)
  return jax.jit(jax.vmap(one))(clips, updates)


def _dp_keys(cfg: RunConfig) -> jax.Array:
  """Each attacked client's DP-SGD noise key [N]: client i's is fold_in(keys["dp_sgd"], i)."""
  root = rundir.keys(cfg.seed)["dp_sgd"]
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(cfg.clients))


def client_side(cfg: RunConfig, apply_fn, params, clips, labels):
  """What the server sees of the attacked round, like params: the mean of the N clients'
  updates (FedSGD gradients or FedAvg deltas), each on its B clips, each after the client's
  `cfg.defenses` (client i: DP-SGD in every step, its noise from `_dp_keys(cfg)[i]`, Soteria on
  its clips, then the update transforms from `defense_key(cfg, i)`)."""
  n = cfg.clients
  clips = clips.reshape(n, cfg.batch_size, *clips.shape[1:])
  labels = labels.reshape(n, cfg.batch_size, *labels.shape[1:])
  dp = _dp_sgd(cfg)
  if cfg.update == "fedsgd" and dp is not None:

    def dp_sgd(apply_fn, params, c, l, k):
      return fl.dp_client_update(apply_fn, params, c, l, key=k, **dp)

    updates = jax.jit(jax.vmap(dp_sgd, in_axes=(None, None, 0, 0, 0)), static_argnums=0)(
        apply_fn, params, clips, labels, _dp_keys(cfg))
  elif cfg.update == "fedsgd":
    updates = jax.jit(jax.vmap(fl.client_update, in_axes=(None, None, 0, 0)), static_argnums=0)(
        apply_fn, params, clips, labels)
  else:
    local = cfg.local

    def fedavg(apply_fn, params, c, l, o, k):
      if dp is None:
        return fl.fedavg_update(apply_fn, params, c, l, local=local, order=o)
      return fl.dp_fedavg_update(apply_fn, params, c, l, local=local, order=o, key=k, **dp)

    updates = jax.jit(jax.vmap(fedavg, in_axes=(None, None, 0, 0, 0, 0)), static_argnums=0)(
        apply_fn, params, clips, labels, client_orders(cfg), _dp_keys(cfg))
  if _option(cfg, SOTERIA) is not None:
    updates = soteria_updates(cfg, apply_fn, params, clips, updates)
  per_client = [jax.tree.map(lambda u, i=i: u[i], updates) for i in range(n)]
  transforms = update_transforms(cfg)
  if transforms:
    try:
      per_client = [fl.defend(defense_key(cfg, i), u, [d for _, d in transforms])
                    for i, u in enumerate(per_client)]
    except ValueError as e:  # a setting that this update contradicts (top_k's k > its size)
      raise InvalidSetting("defenses", f"defenses: {', '.join(s for s, _ in transforms)}: "
                           f"{e}") from None
  return fl.aggregate(per_client)


# FedAvg rounds of at least this many local steps are replayed with each step's activations
# recomputed in the backward pass (`jax.checkpoint`): the replay's memory then stays that of one
# step instead of growing with the steps, for about one more forward pass per step.
REMAT_LOCAL_STEPS = 8


def match_support(cfg: RunConfig, shared: Grads) -> Grads | None:
  """Where the attack matches the shared update: its support (`fl.support`, a bool pytree like
  it) when a client defence sparsifies (top_k, prune, random_mask, soteria: a zero there was not
  sent), else None (everywhere). With N clients it is the union of their supports."""
  names = {name for name, _ in parse_defenses(cfg.defenses)}
  return fl.support(shared) if names & (fl.defenses.SPARSIFYING | {SOTERIA}) else None


def _one_step(step_grad) -> fl.UpdateFn:
  """A FedSGD client's update: one step's gradient (`step_grad(apply_fn)`) on all its clips."""

  def update(apply_fn, params, clips, labels):
    clips, labels = fl.updates.check_update_inputs(apply_fn, params, clips, labels)
    return step_grad(apply_fn)(params, clips, labels, jnp.int32(0))

  return update


def _defended(update_fn: fl.UpdateFn, chain, support: Grads | None) -> fl.UpdateFn:
  """`update_fn` followed by the noise-free, differentiable part of the client's update
  transforms `chain` ((name, settings) in order), when one of them clips (clip_and_noise):
  sparsifiers keep `support` (if given), clip_and_noise scales to global L2 norm <= C (its
  noise, mean zero, is left out), quantisers are the identity (the shared floats are matched
  as they are). Without a clip, `update_fn` itself: the match's mask does the sparsifiers'
  part."""
  if not any(name == "clip_and_noise" for name, _ in chain):
    return update_fn

  def update(apply_fn, params, clips, labels):
    u = update_fn(apply_fn, params, clips, labels)
    for name, settings in chain:
      if (name in fl.defenses.SPARSIFYING or name == SOTERIA) and support is not None:
        u = jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), u, support)
      elif name == "clip_and_noise":
        c = settings["clip_norm"]
        scale = jnp.minimum(1.0, c / jnp.maximum(fl.defenses.global_norm(u), 1e-30))
        u = jax.tree.map(lambda x, scale=scale: (x * scale).astype(x.dtype), u)
    return u

  return update


def attacker_update_fn(cfg: RunConfig, *, support: Grads | None = None) -> fl.UpdateFn:
  """The attacker's model of what the round's clients computed from N·B candidate clips (their
  public local settings; the mini-batch orders too when `attack.replay` is "order"), through
  their defences, which are public; the strongest attack this project makes of each:
    top_k, prune, random_mask  the match sees only the shared update's support (the stage passes
                               `match_support` as `reconstruct`'s mask); before a clip they are
                               replayed as that mask (`support`)
    soteria                    the same support match: its pruned kernel rows were not sent
    fp16, int8, qsgd, sign     the shared update holds the dequantised floats: matched as they
                               are (identity here; the rounding acts as noise)
    clip_and_noise             each client's replayed update is clipped to the same norm C (its
                               noise, mean zero, is left out); cosine alone is scale-invariant,
                               but not across N > 1 clients or after other defences
    dp_sgd                     every step's gradient is the mean of the per-example gradients,
                               each clipped to C (DP-SGD's noise-free part)
  Without defences: exactly the update_fn of an undefended run."""
  dp = _dp_sgd(cfg)
  step_grad = fl.local.mean_ce_grad if dp is None else fl.privacy.clipped_mean_grad(
      dp["clip_norm"])
  if cfg.update == "fedsgd":
    fns = [fl.client_update if dp is None else _one_step(step_grad)] * cfg.clients
  else:
    remat = cfg.local.steps(cfg.batch_size) >= REMAT_LOCAL_STEPS
    if cfg.attack.replay != "order":
      fns = [fl.replay(cfg.local, approximation=cfg.attack.replay, remat=remat,
                       step_grad=step_grad)] * cfg.clients
    else:
      fns = [fl.replay(cfg.local, order=order, remat=remat, step_grad=step_grad)
             for order in client_orders(cfg)]
  chain = [(n, s) for n, s in parse_defenses(cfg.defenses) if n != DP_SGD]
  return fl.aggregated([_defended(fn, chain, support) for fn in fns])


def attack_config(cfg: RunConfig) -> AttackConfig:
  """`cfg.attack` with its penalty weights (priors, residual terms) weighed against the update's
  scale. A FedAvg delta is about lr × steps = s times a gradient, so the l2 (l1) match is s²
  (s) times what it is against a FedSGD gradient; the weights are scaled alike, keeping the
  balance that the same attack has against a gradient (cosine is scale-free)."""
  if cfg.update != "fedavg" or cfg.attack.metric == "cosine":
    return cfg.attack
  scale = cfg.local.lr * cfg.local.steps(cfg.batch_size)
  factor = scale ** 2 if cfg.attack.metric == "l2" else scale
  return dataclasses.replace(
      cfg.attack, priors={k: w * factor for k, w in cfg.attack.priors.items()},
      **{k: getattr(cfg.attack, k) * factor for k in ("residual_l1", "residual_l2",
                                                      "residual_tv")})


def label_trajectory(cfg: RunConfig) -> tuple[int, float] | None:
  """(local steps, local lr) of a FedAvg round, for label recovery from its delta; else None."""
  if cfg.update != "fedavg":
    return None
  return cfg.local.steps(cfg.batch_size), cfg.local.lr


def shared_update(cfg: RunConfig, apply_fn, params, captured: Grads | None):
  """(the update the attacker sees, like params; the true labels when the attacker is given
  them, else None): the client's update on data.npz (saved as shared_update.npz), or `captured`."""
  if captured is not None:
    return unflatten_like(params, flatten_tree(captured), name="shared_update.npz"), None
  clips, labels = client_batch(cfg)
  shared = flatten_tree(client_side(cfg, apply_fn, params, clips, labels))
  rundir.save(cfg, "shared_update.npz", **shared)
  known = labels if cfg.known_labels else None
  return unflatten_like(params, shared, name="shared_update.npz"), known

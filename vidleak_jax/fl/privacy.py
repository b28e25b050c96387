"""Differential privacy at the client: DP-SGD's update (per-example gradient clipping plus Gaussian
noise, Abadi et al. 2016), as one FedSGD step (`dp_client_update`) or as the local training of a
FedAvg client (`dp_fedavg_update`: every local step clipped and noised), and its accountant.

The mechanism is written here with `jax.vmap(jax.grad)` over the client's examples (a few lines,
pure, differentiable w.r.t. the clips so an attacker can replay its noise-free part), rather
than taken from `jax-privacy` 2.0: its `clipping.clipped_grad` does the same computation but
would add jax-privacy, chex-based APIs and pydantic (a compiled, Python-version-specific wheel)
to a dependency set that must also run, unchanged and without an index, on the GPU image.
The accountant is not hand-written: `epsilon` asks Google's `dp-accounting` (RDP accountant,
a Poisson-sampled Gaussian mechanism composed over the steps), imported only when called.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vidleak_jax.fl.defenses import gaussian_like, global_norm
from vidleak_jax.fl.local import LocalTraining, StepGrad, fedavg_update
from vidleak_jax.fl.updates import check_update_inputs, cross_entropy
from vidleak_jax.settings import check
from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params


def _check_positive(value, name: str, *, allow_zero: bool) -> None:
  """ValueError naming `name` unless `value` > 0 (>= 0 with `allow_zero`); traced values pass."""
  if isinstance(value, jax.core.Tracer):
    return
  ok = value >= 0 if allow_zero else value > 0
  check(bool(ok), name, f"must be {'>=' if allow_zero else '>'} 0, got {value}")


def per_example_grads(apply_fn: ApplyFn, params: Params, clips: Clip, labels: jax.Array) -> Grads:
  """d CE(apply_fn(params, clips[i:i+1]), labels[i:i+1]) / d params for every example i: a pytree
  like params with a leading axis [B] (inputs as `client_update`, already checked)."""

  def one(clip, label):
    return jax.grad(lambda p: cross_entropy(apply_fn(p, clip[None]), label[None]))(params)

  return jax.vmap(one)(clips, labels)


def clip_per_example(grads: Grads, clip_norm: float) -> Grads:
  """Per-example grads [B, ...] each scaled to global L2 norm (over all leaves) <= clip_norm."""
  norms = jax.vmap(global_norm)(grads)  # [B]
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
  return jax.tree.map(
      lambda g: (g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)), grads)


def clipped_per_example_grads(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                              clip_norm: float) -> Grads:
  """Each example's gradient of its CE, clipped to L2 norm <= clip_norm: pytree [B, ...]."""
  _check_positive(clip_norm, "clip_norm", allow_zero=False)
  clips, labels = check_update_inputs(apply_fn, params, clips, labels)
  return clip_per_example(per_example_grads(apply_fn, params, clips, labels), clip_norm)


def dp_client_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                     key: jax.Array, clip_norm: float, noise_multiplier: float) -> Grads:
  """DP-SGD's FedSGD update: (sum_i clip_C(g_i) + N(0, (σC)² I)) / B, g_i the gradient of example
  i's CE; a pytree like params. Inputs as `client_update`; C = clip_norm > 0, σ =
  noise_multiplier >= 0 (0: clipping only); both may be traced (e.g. vmapped over)."""
  _check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  clipped = clipped_per_example_grads(apply_fn, params, clips, labels, clip_norm=clip_norm)
  total = jax.tree.map(lambda g: g.sum(axis=0), clipped)
  std, batch = noise_multiplier * clip_norm, clips.shape[0]
  return jax.tree.map(lambda g, z: (g + (std * z).astype(g.dtype)) / batch, total,
                      gaussian_like(key, total))


def clipped_sum(grads: Grads, clip_norm: float) -> Grads:
  """sum_i clip_C(g_i) of per-example grads [B, ...] (leaves), as a contraction of the B
  scales with the gradients: the same sum (to rounding) as summing `clip_per_example`'s, which
  XLA:CPU (jaxlib 0.10.2) crashes on (SIGSEGV) when an attack vmaps its gradient over
  candidates."""
  norms = jax.vmap(global_norm)(grads)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))  # [B]
  return jax.tree.map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)


def dp_step_grad(apply_fn: ApplyFn, *, clip_norm: float, noise_multiplier: float,
                 key: jax.Array | None) -> StepGrad:
  """DP-SGD's step gradient for `fl.local_train`: (sum_i clip_C(g_i) + N(0, (σC)² I)) / b over
  the step's b examples, the noise drawn from fold_in(key, step). key=None: no noise (the
  attacker's replay of the noise-free part; σ is then ignored)."""
  _check_positive(clip_norm, "clip_norm", allow_zero=False)
  _check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)

  def grad(params, clips, labels, step):
    total = clipped_sum(per_example_grads(apply_fn, params, clips, labels), clip_norm)
    if key is not None:
      noise = gaussian_like(jax.random.fold_in(key, step), total)
      total = jax.tree.map(lambda g, z: g + (noise_multiplier * clip_norm * z).astype(g.dtype),
                           total, noise)
    return jax.tree.map(lambda g: g / clips.shape[0], total)

  return grad


def clipped_mean_grad(clip_norm: float):
  """Factory apply_fn -> DP-SGD's noise-free step gradient (the mean of the clipped
  per-example gradients), for `fl.replay(step_grad=...)`."""
  return lambda apply_fn: dp_step_grad(apply_fn, clip_norm=clip_norm, noise_multiplier=0.0,
                                       key=None)


def dp_fedavg_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                     local: LocalTraining, order: jax.Array, key: jax.Array | None,
                     clip_norm: float, noise_multiplier: float) -> Grads:
  """A FedAvg client's delta after DP-SGD local training: `fl.fedavg_update` in mini-batch
  `order` [steps, b] whose every step uses `dp_step_grad` (step s's noise from fold_in(key, s)).
  With E = 1 and b = B (one full-batch step) it is local.lr × `dp_client_update`'s formula."""
  grad = dp_step_grad(apply_fn, clip_norm=clip_norm, noise_multiplier=noise_multiplier, key=key)
  return fedavg_update(apply_fn, params, clips, labels, local=local, order=order,
                       step_grad=grad)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
  """ε of `steps` DP-SGD steps, each sampling examples with probability `sampling_rate` (Poisson)
  and adding Gaussian noise of std noise_multiplier × the clipping norm, at the given δ:
  dp-accounting's RDP accountant (add-or-remove-one neighbours, its default orders). inf when
  noise_multiplier is 0 (and sampling_rate > 0)."""
  check(noise_multiplier >= 0, "noise_multiplier", f"must be >= 0, got {noise_multiplier}")
  check(0 <= sampling_rate <= 1, "sampling_rate", f"must be in [0, 1], got {sampling_rate}")
  check(isinstance(steps, int) and steps >= 1, "steps", f"must be an integer >= 1, got {steps!r}")
  check(0 < delta < 1, "delta", f"must be in (0, 1), got {delta}")
  import dp_accounting  # pylint: disable=import-outside-toplevel  # ~2 s to import; CPU-side only

  accountant = dp_accounting.rdp.RdpAccountant()
  event = dp_accounting.PoissonSampledDpEvent(
      sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
  accountant.compose(event, steps)
  eps = float(accountant.get_epsilon(delta))
  return eps if not math.isnan(eps) else math.inf

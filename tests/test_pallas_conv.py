"""`pallas_conv`: the implicit-GEMM Pallas convolution equals lax's, with the same first- and
second-order gradients, under jit and vmap, and as the attack's conv mode "pallas" (in Pallas
interpret mode on CPU: small shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax
from jax.test_util import check_grads

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax.attack import pallas_conv
from vidleak_jax.attack.fast_convs import fast_convs

HIGHEST = lax.Precision.HIGHEST
# spatial dims -> (x [N, *S, C], w [*K, C, O]) shapes
SHAPES = {2: ((2, 9, 8, 3), (3, 3, 3, 4)), 3: ((2, 4, 7, 6, 3), (3, 3, 3, 3, 5))}
CASES = [(s, p) for s in (1, 2) for p in ("SAME", "VALID")]


def _lax_conv(x, w, strides, padding):
  sp = "DHW"[-(x.ndim - 2):]
  return lax.conv_general_dilated(x, w, strides, padding, precision=HIGHEST,
                                  dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"))


def _pallas_conv(x, w, strides, padding):
  return pallas_conv.conv_pallas(x, w, strides, padding, precision=HIGHEST)


def _inputs(d, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  xs, ws = SHAPES[d]
  return jax.random.normal(kx, xs), jax.random.normal(kw, ws) / 3


def _close(a, b, rtol=1e-5):
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))


def _matching(conv, strides, padding, w, target):
  """x -> || d/dw sum(tanh(conv(x, w))) - target ||^2: the shape of the attack's objective."""
  def loss(x):
    g = jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w, strides, padding))))(w)
    return jnp.sum(jnp.square(g - target))
  return loss


@pytest.mark.parametrize("d", [2, 3])
def test_forward_and_vjp_equal_lax(d):
  x, w = _inputs(d)
  # 3-D: the other two cases are in the second-order test below.
  cases = CASES if d == 2 else [(1, "SAME"), (2, "VALID")]

  @jax.jit
  def run(x, w):
    out = []
    for s, p in cases:
      for conv in (_pallas_conv, _lax_conv):
        f = lambda x, w, conv=conv: conv(x, w, (s,) * d, p)
        y, vjp = jax.vjp(f, x, w)
        out.append((y, *vjp(jnp.cos(y))))
    return out

  out = run(x, w)
  assert len(out) == 2 * len(cases)
  for i in range(0, len(out), 2):
    for a, b in zip(out[i], out[i + 1]):
      _close(a, b)


@pytest.mark.parametrize("d,strides,padding", [(2, 1, "SAME"), (3, 2, "SAME"), (3, 1, "VALID")])
def test_gradient_of_a_gradient_matching_loss_equals_lax(d, strides, padding):
  x, w = _inputs(d)
  target = 0.1 * jnp.ones_like(w)
  grads = jax.jit(lambda x: [jax.value_and_grad(_matching(c, (strides,) * d, padding, w, target))(x)
                             for c in (_pallas_conv, _lax_conv)])(x)
  (v1, g1), (v0, g0) = grads
  _close(v1, v0)
  _close(g1, g0, rtol=1e-4)


def test_check_grads_to_second_order():
  kx, kw = jax.random.split(jax.random.key(1))
  x, w = jax.random.normal(kx, (1, 5, 4, 2)), jax.random.normal(kw, (3, 2, 2, 2))
  f = jax.jit(lambda x, w: _pallas_conv(x, w, (2, 1), ((1, 0), (0, 1))))
  check_grads(f, (x, w), order=2, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_vmap_over_per_candidate_kernels_equals_a_loop():
  x, _ = _inputs(3)
  ws = jax.random.normal(jax.random.key(2), (3, *SHAPES[3][1])) / 3
  target = 0.1 * jnp.ones_like(ws[0])

  def value_and_grad(x, w):
    return jax.value_and_grad(_matching(_pallas_conv, (1, 2, 2), "SAME", w, target))(x)

  v, g = jax.jit(jax.vmap(value_and_grad, in_axes=(None, 0)))(x, ws)
  one = jax.jit(value_and_grad)
  for i in range(len(ws)):
    vi, gi = one(x, ws[i])
    _close(v[i], vi)
    _close(g[i], gi, rtol=1e-4)
  v0, g0 = jax.value_and_grad(_matching(_lax_conv, (1, 2, 2), "SAME", ws[0], target))(x)
  _close(v[0], v0)
  _close(g[0], g0, rtol=1e-4)


def test_gpu_tiling_padded_channels_and_chunks_in_interpret_mode(monkeypatch):
  # The GPU layout (channels padded to 16, output-channel tiles, chunked reduction, small row
  # tiles, unrolled taps), run by the interpreter: 2 output tiles, 2 reduction chunks, 5 row
  # tiles.
  monkeypatch.setattr(pallas_conv, "_tiles", lambda: pallas_conv.Tiles(
      rows=16, out=8, red=8, align=16, unroll=True, interpret=True))
  x, w = _inputs(2)
  target = 0.1 * jnp.ones_like(w)
  run = jax.jit(lambda x: [(conv(x, w, (1, 1), "SAME"),
                            *jax.value_and_grad(_matching(conv, (1, 1), "SAME", w, target))(x))
                           for conv in (_pallas_conv, _lax_conv)])
  for a, b, rtol in zip(*run(x), (1e-5, 1e-5, 1e-4)):
    _close(a, b, rtol)


def test_rewrite_uses_the_kernel_and_falls_back_to_patches():
  x, w = _inputs(2)
  dilated = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 1),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  plain = lambda x, w: _lax_conv(x, w, (2, 2), "VALID")
  for fn, kernels in ((plain, 1), (dilated, 0)):
    jaxpr = str(jax.make_jaxpr(fast_convs(fn, "pallas"))(x, w))
    assert jaxpr.count("pallas_call[") == kernels and "conv_general_dilated[" not in jaxpr
    _close(jax.jit(fast_convs(fn, "pallas"))(x, w), fn(x, w))
  nchw = lambda x, w: lax.conv_general_dilated(x, w, (1, 2), ((1, 2), (0, 1)), precision=HIGHEST)
  xt, wt = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)  # NCHW, OIHW: lax's default layout
  _close(jax.jit(fast_convs(nchw, "pallas"))(xt, wt), nchw(xt, wt))


def test_bad_shapes_are_refused():
  x, w = _inputs(2)
  with pytest.raises(ValueError, match="must agree"):
    pallas_conv.conv_pallas(x, w[..., :2, :])
  with pytest.raises(ValueError, match="empty output"):
    pallas_conv.conv_pallas(x[:, :2], w)
  with pytest.raises(ValueError, match="floating dtype"):
    pallas_conv.conv_pallas(x.astype(jnp.int32), w.astype(jnp.int32))


def test_attack_with_the_pallas_conv_matches_im2col():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  runs = {}
  for conv in ("im2col", "pallas"):  # restarts vmapped in pairs (the CPU default: lax.map of 2)
    config = vl.attack.AttackConfig(restarts=2, steps=3, log_every=3, conv=conv)
    runs[conv] = vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                                       clip_shape=clips.shape, labels=labels, config=config,
                                       mesh=None)
  # Same objective to float rounding (the kernel sums taps in another order than one matmul).
  np.testing.assert_allclose(runs["pallas"].history["loss"], runs["im2col"].history["loss"],
                             rtol=3e-5)
  np.testing.assert_allclose(runs["pallas"].loss, runs["im2col"].loss, rtol=3e-5)


def _lower_for_cuda(fn, *args) -> str:
  """StableHLO of jit(fn)(*args) lowered for CUDA: jax.export cross-lowers on any host, running
  Pallas's GPU lowering (here down to Triton IR) without a GPU."""
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
  return exported.mlir_module()


def test_gpu_path_lowers_to_triton_kernels(monkeypatch):
  # The attack step the GPU would run (C3D, 8x32x32, 4 candidates vmapped, conv "pallas", GPU
  # tiles) lowers for CUDA, every convolution and derivative a Triton kernel: Pallas's default on
  # GPU is Mosaic GPU, which stages whole blocks in shared memory and refuses these (0.77 MB >
  # 0.23 MB for the first layer's input).
  monkeypatch.setattr(pallas_conv, "_tiles", lambda: pallas_conv.GPU_TILES)
  model = vl.models.create("c3d", jax.random.key(0), frames=8, height=32, width=32, channels=3,
                           num_classes=4)
  apply_fn, params = vl.models.pure(model)
  clips, labels = vl.data.synthetic_clips(jax.random.key(1), 1, frames=8, height=32, width=32,
                                          channels=3, num_classes=4)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(restarts=4, batching="vmap", conv="pallas", log_every=2)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, tuple(clips.shape), config)
  state = jax.eval_shape(attack.init, jax.random.key(2))
  module = _lower_for_cuda(attack.run, state, jnp.int32(2))
  assert module.count("xla.gpu.triton") >= 5  # forward, input and kernel grads, and theirs
  assert "mosaic" not in module.lower()
  assert "convolution" not in module  # no XLA convolution left in the step

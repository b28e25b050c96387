"""`fast_convs`: convolutions rewritten as patches + matmuls compute the same function, with the same
first- and second-order gradients, for every convolution option and any model library."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import vidleak_jax as vl
from vidleak_jax.attack.fast_convs import conv_general_dilated_as_dot, fast_convs


def _count(fn, *args, name="conv_general_dilated") -> int:
  """Equations of primitive `name` in the jaxpr of fn(*args), sub-jaxprs included."""
  return str(jax.make_jaxpr(fn)(*args)).count(name + "[")


def _scalar(model, w, x):
  y = model(w, x)
  return jnp.sum(jnp.tanh(y) * jnp.cos(y))


def _assert_same_matching(model, w, x, candidates, rtol=1e-4):
  """`model` and `fast_convs(model)` give the same outputs, and the same gradient-matching-like
  loss (the squared distance of the weight gradient of a nonlinear scalar of the output to a
  fixed target) and d loss / d x, vmapped over `candidates` [R, *x.shape]: grad-of-grad."""
  fast = fast_convs(model, "im2col")

  @jax.jit
  def run(w, x, candidates):
    target = jax.tree.map(lambda t: 0.5 * t, jax.grad(lambda w: _scalar(model, w, x))(w))

    def matching(m, c):
      g = jax.grad(lambda w: _scalar(m, w, c))(w)
      return sum(jnp.sum(jnp.square(a - b))
                 for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(target)))

    return [(m(w, x), *jax.vmap(jax.value_and_grad(lambda c: matching(m, c)))(candidates))
            for m in (model, fast)]

  (y0, v0, g0), (y1, v1, g1) = run(w, x, candidates)
  np.testing.assert_allclose(y1, y0, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(v1, v0, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(g1, g0, rtol=10 * rtol, atol=10 * rtol * float(jnp.abs(g0).max()))


# (lhs shape, rhs shape, conv keyword arguments); dimension numbers default to lax's NC.../OI...
CONV_CASES = {
    "1d_same": ((2, 3, 11), (4, 3, 3), dict(window_strides=(1,), padding="SAME")),
    "1d_stride_valid": ((2, 3, 11), (4, 3, 4), dict(window_strides=(3,), padding="VALID")),
    "2d_same_strided": ((2, 3, 9, 8), (4, 3, 3, 3), dict(window_strides=(2, 1), padding="SAME")),
    "2d_same_lower": ((2, 3, 8, 8), (4, 3, 2, 4), dict(window_strides=(1, 2),
                                                       padding="SAME_LOWER")),
    "2d_explicit_negative": ((2, 3, 9, 8), (4, 3, 3, 2), dict(window_strides=(1, 1),
                                                              padding=((2, 1), (-1, 3)))),
    "2d_lhs_dilation": ((2, 3, 5, 6), (4, 3, 3, 3), dict(window_strides=(1, 1),
                                                         padding=((2, 2), (1, 1)),
                                                         lhs_dilation=(2, 3))),
    "2d_rhs_dilation": ((2, 3, 9, 10), (4, 3, 3, 2), dict(window_strides=(2, 1), padding="SAME",
                                                          rhs_dilation=(2, 3))),
    "2d_groups": ((2, 6, 7, 7), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                                   feature_group_count=2)),
    "2d_depthwise": ((2, 4, 7, 7), (8, 1, 3, 3), dict(window_strides=(2, 2), padding="SAME",
                                                      feature_group_count=4)),
    "2d_batch_groups": ((4, 3, 7, 7), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                                         batch_group_count=2)),
    "2d_nhwc": ((2, 9, 8, 3), (3, 3, 3, 4), dict(window_strides=(1, 2), padding="SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "2d_mixed_layouts": ((9, 3, 8, 2), (3, 4, 3, 3), dict(
        window_strides=(2, 1), padding="VALID", dimension_numbers=("HCWN", "OHIW", "WNHC"))),
    "3d_ndhwc": ((2, 5, 6, 7, 3), (3, 3, 3, 3, 4), dict(
        window_strides=(1, 2, 2), padding="SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
    "3d_all_options": ((2, 4, 5, 6, 5), (4, 2, 2, 3, 2), dict(
        window_strides=(2, 1, 2), padding=((1, 0), (2, 1), (0, 1)), lhs_dilation=(1, 2, 1),
        rhs_dilation=(2, 1, 1), feature_group_count=2)),
    "2d_highest_precision": ((2, 3, 6, 6), (4, 3, 3, 3), dict(
        window_strides=(1, 1), padding="SAME", precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32)),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad(case):
  lhs_shape, rhs_shape, kwargs = CONV_CASES[case]
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], lhs_shape)
  w = 0.5 * jax.random.normal(keys[1], rhs_shape)
  candidates = jax.random.normal(keys[2], (2, *lhs_shape))
  conv = lambda w, x: lax.conv_general_dilated(x, w, **kwargs)
  rewritten = jax.jit(lambda w, x: conv_general_dilated_as_dot(x, w, **kwargs))(w, x)
  np.testing.assert_allclose(rewritten, jax.jit(conv)(w, x), rtol=1e-5, atol=1e-5)
  assert _count(fast_convs(conv, "im2col"), w, x) == 0
  _assert_same_matching(conv, w, x, candidates)


def test_precision_and_preferred_element_type_are_carried_over():
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  w = jnp.ones((3, 3, 2, 3), jnp.bfloat16)
  conv = lambda w, x: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  jaxpr = str(jax.make_jaxpr(fast_convs(conv, "im2col"))(w, x))
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
  assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr
  assert "preferred_element_type=float32" in jaxpr
  out = fast_convs(conv, "im2col")(w, x)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, conv(w, x))


# A model with convolutions inside every kind of sub-program the interpreter recurses into.
def _conv(x, w, strides=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, "SAME")


@jax.custom_jvp
def _jvp_conv(x, w):
  return _conv(x, w)


@_jvp_conv.defjvp
def _jvp_conv_rule(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  return _jvp_conv(x, w), _conv(dx, w) + _conv(x, dw)


@jax.custom_vjp
def _vjp_conv(x, w):
  return _conv(x, w)


def _vjp_conv_fwd(x, w):
  return _conv(x, w), (x, w)


def _vjp_conv_bwd(residuals, g):
  return jax.vjp(_conv, *residuals)[1](g)


_vjp_conv.defvjp(_vjp_conv_fwd, _vjp_conv_bwd)


def _nested_model(w, x):
  w1, w2 = w
  h = jax.jit(lambda x: jax.nn.relu(_conv(x, w1)))(x)  # jit inside the model; relu is custom_jvp

  def body(c, _):
    return jnp.tanh(_conv(c, w2)), jnp.sum(c)

  h, _ = lax.scan(body, h, None, length=2)
  h = lax.cond(jnp.sum(h) > 0, lambda a: _jvp_conv(a, w2), lambda a: -_jvp_conv(a, w2), h)
  h = jax.checkpoint(lambda a: jnp.sin(_conv(a, w2, (2, 2))))(h)
  h = _vjp_conv(h, w2)
  return h.reshape(h.shape[0], -1)


def test_nested_jit_scan_cond_remat_custom_jvp_and_custom_vjp_models():
  keys = jax.random.split(jax.random.key(1), 4)
  w = (0.3 * jax.random.normal(keys[0], (4, 3, 3, 3)),
       0.3 * jax.random.normal(keys[1], (4, 4, 3, 3)))
  x = jax.random.normal(keys[2], (2, 3, 8, 8))
  candidates = jax.random.normal(keys[3], (2, 2, 3, 8, 8))
  fast = fast_convs(_nested_model, "im2col")
  assert _count(_nested_model, w, x) == 6
  assert _count(fast, w, x) == 0  # primal programs and custom rules alike
  # Under grad only the custom_vjp's bwd rule (kept as written) still holds XLA convolutions:
  # those of `jax.vjp(_conv, ...)` in it (the forward and the two transposes).
  assert _count(jax.grad(lambda w, x: jnp.sum(fast(w, x))), w, x) == 3
  _assert_same_matching(_nested_model, w, x, candidates)


def test_while_loops_and_static_arguments():
  w = 0.3 * jax.random.normal(jax.random.key(2), (3, 3, 3, 3))
  x = jax.random.normal(jax.random.key(3), (2, 3, 6, 6))

  def model(w, x, steps, scale=2.0):
    cond = lambda c: c[1] < steps
    body = lambda c: (jax.nn.sigmoid(scale * _conv(c[0], w)), c[1] + 1)
    return lax.while_loop(cond, body, (x, 0))[0]

  fast = fast_convs(model, "im2col")
  assert _count(lambda w, x: fast(w, x, 3), w, x) == 0
  np.testing.assert_allclose(fast(w, x, 3), model(w, x, 3), rtol=1e-5, atol=1e-6)
  batch = jnp.stack([x, -x])
  tangent = jax.vmap(lambda c: jax.jvp(lambda z: fast(w, z, 3, scale=1.5), (c,), (c,)))(batch)
  expected = jax.vmap(lambda c: jax.jvp(lambda z: model(w, z, 3, scale=1.5), (c,), (c,)))(batch)
  for a, b in zip(tangent, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_modes_and_programs_without_convolutions():
  fn = lambda w, x: _conv(x, w)
  assert fast_convs(fn, "xla") is fn
  with pytest.raises(KeyError, match="im2col"):
    fast_convs(fn, "winograd")

  def dense(w, x):  # sub-programs without a convolution are re-emitted as they are
    h = jax.jit(lambda x: jax.nn.relu(x @ w))(x)
    return lax.scan(lambda c, _: (jnp.tanh(c), None), h, None, length=2)[0]

  w, x = jnp.ones((3, 3)), jnp.ones((2, 3))
  assert str(jax.make_jaxpr(fast_convs(dense))(w, x)) == str(jax.make_jaxpr(dense)(w, x))


# The same small C3D-style classifier (3×3×3 convolutions with strides (1,2,2) and (2,2,2), a
# linear head) in flax.linen, nnx and plain lax (channels-first, lax's default layout).
class _LinenC3D(linen.Module):
  @linen.compact
  def __call__(self, x):
    for i, strides in enumerate([(1, 2, 2), (2, 2, 2)]):
      x = jax.nn.sigmoid(linen.Conv(5, (3, 3, 3), strides, name=f"conv{i + 1}")(x))
    return linen.Dense(4, name="head")(x.reshape(x.shape[0], -1))


class _NnxC3D(nnx.Module):
  def __init__(self, rngs):
    self.convs = nnx.List([nnx.Conv(c, 5, (3, 3, 3), strides=s, rngs=rngs)
                           for c, s in [(3, (1, 2, 2)), (5, (2, 2, 2))]])
    self.head = nnx.Linear(2 * 2 * 2 * 5, 4, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = jax.nn.sigmoid(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


def _lax_c3d(params, clips):
  x = clips.transpose(0, 4, 1, 2, 3)  # NCDHW
  for i, strides in enumerate([(1, 2, 2), (2, 2, 2)]):
    w, b = params[f"conv{i + 1}"]
    x = jax.nn.sigmoid(lax.conv_general_dilated(x, w, strides, "SAME") + b[:, None, None, None])
  return x.reshape(x.shape[0], -1) @ params["head"][0] + params["head"][1]


def _lax_params(key):
  keys = jax.random.split(key, 3)
  params = {f"conv{i + 1}": (0.3 * jax.random.normal(keys[i], (5, cin, 3, 3, 3)), jnp.zeros(5))
            for i, cin in enumerate([3, 5])}
  params["head"] = (0.1 * jax.random.normal(keys[2], (5 * 2 * 2 * 2, 4)), jnp.zeros(4))
  return params


def _linen_victim():
  model = _LinenC3D()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 8, 8, 3)))["params"]
  return lambda p, x: model.apply({"params": p}, x), params


def _equinox_victim():
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.key(0), 3)
  convs = [eqx.nn.Conv3d(3, 5, 3, stride=(1, 2, 2), padding=1, key=keys[0]),
           eqx.nn.Conv3d(5, 5, 3, stride=2, padding=1, key=keys[1])]
  model = (convs, eqx.nn.Linear(5 * 2 * 2 * 2, 4, key=keys[2]))
  params, static = eqx.partition(model, eqx.is_array)

  def apply_fn(p, clips):
    convs, head = eqx.combine(p, static)
    x = clips.transpose(0, 4, 1, 2, 3)  # [B, C, T, H, W]
    for conv in convs:
      x = jax.vmap(lambda v, conv=conv: jax.nn.sigmoid(conv(v)))(x)
    return jax.vmap(head)(x.reshape(x.shape[0], -1))

  return apply_fn, params


MODELS = {
    "equinox": _equinox_victim,
    "linen": _linen_victim,
    "nnx": lambda: vl.models.pure(_NnxC3D(nnx.Rngs(0))),
    "lax": lambda: (_lax_c3d, _lax_params(jax.random.key(0))),
}


@pytest.mark.parametrize("library", sorted(MODELS))
def test_gradient_matching_loss_is_the_same_with_and_without_the_rewrite(library):
  apply_fn, params = MODELS[library]()
  keys = jax.random.split(jax.random.key(4), 2)
  clips = jax.random.uniform(keys[0], (1, 4, 8, 8, 3))
  labels = jnp.array([1])
  target = jax.jit(vl.fl.client_update, static_argnums=0)(apply_fn, params, clips, labels)
  candidates = jax.random.uniform(keys[1], (2, 1, 4, 8, 8, 3))

  def run(conv):
    loss = lambda c: vl.attack.gradient_matching_loss(apply_fn, params, target, c, labels,
                                                      conv=conv)
    return jax.jit(jax.vmap(jax.value_and_grad(loss)))(candidates)

  assert _count(lambda c: vl.attack.gradient_matching_loss(
      apply_fn, params, target, c, labels, conv="auto"), candidates[0]) == 0
  (v0, g0), (v1, g1) = run("xla"), run("auto")
  np.testing.assert_allclose(v1, v0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g1, g0, rtol=1e-3, atol=1e-4 * float(jnp.abs(g0).max()))


@pytest.mark.parametrize("library", sorted(MODELS))
def test_the_attack_rewrites_the_convolutions_of_any_library(library):
  apply_fn, params = MODELS[library]()
  clips, labels = jnp.full((1, 4, 8, 8, 3), 0.5), jnp.array([1])
  target = jax.tree.map(jnp.zeros_like, params)
  for conv in ("auto", "im2col", "xla"):
    config = vl.attack.AttackConfig(restarts=2, steps=1, conv=conv)
    attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
    state = jax.eval_shape(attack.init, jax.random.key(0))
    convs = _count(lambda s: attack.run(s, 1), state)
    assert convs > 0 if conv == "xla" else convs == 0, conv

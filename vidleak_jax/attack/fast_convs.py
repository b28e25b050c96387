"""`fast_convs(fn)`: `fn` with every convolution computed as patches + one matrix product.

Why: the attack differentiates a gradient (grad-of-grad) and batches R candidates with `vmap`.
The per-candidate weight gradients of `lax.conv_general_dilated` then become grouped convolutions
(and their transposes), which XLA:CPU runs very slowly, and XLA's 3-D convolution gradients are
slow even unbatched. Written as strided slices stacked into patches and a `dot_general` with the
kernel, the same convolution differentiates (to any order) into slices, pads, concatenations and
batched matrix products, which XLA runs at matmul speed. This works for any JAX model (flax.linen,
nnx, equinox, plain `lax`): the rewrite happens on the traced program, not in the model's code.

How: `fast_convs(fn)(*args)` traces `fn` to a jaxpr (`jax.make_jaxpr`, once per call, i.e. once
per trace of the caller) and evaluates it with an interpreter that re-emits every equation under
the caller's transformations (jit, vmap, grad, ...), except that `conv_general_dilated` is replaced
by `conv_general_dilated_as_dot`. The result is an ordinary function: same values, and derivatives
of any order derived by JAX from the re-emitted primitives.

Sub-programs that hold a convolution are rewritten recursively (the others are re-bound untouched):
  jit (pjit)            re-bound with the rewritten jaxpr (name, shardings and options kept)
  closed_call/core_call inlined (evaluated in place)
  custom_jvp_call       the primal and the jvp rule's jaxpr are rewritten; the custom rule is kept
                        (JAX still differentiates through the rule, not the primal)
  custom_vjp_call       the primal and the fwd rule's jaxpr are rewritten; the bwd rule runs as
                        written (a Python function JAX calls when transposing: convolutions inside
                        it stay XLA's)
  scan / while / cond   re-emitted with `lax.scan` / `lax.while_loop` / `lax.switch` over the
                        rewritten bodies (scan's length, reverse and unroll kept)
  remat (checkpoint)    re-emitted with `jax.checkpoint` (policy and prevent_cse kept)
Not rewritten: other primitives that hold sub-programs (shard_map, pmap, custom_transpose, ...)
are re-bound unchanged, as are custom_jvp rules of a primal without convolutions.

The convolution rewrite covers 1-, 2- and 3-D (any number of spatial dims), window strides,
explicit / SAME / VALID padding (negative too), lhs and rhs dilation, `feature_group_count`,
`batch_group_count`, any `dimension_numbers`; `precision` and `preferred_element_type` go to the
`dot_general`. For channels-last convolutions without padding, dilation or groups of their own
(the project's victims) the patches are those of the earlier im2col layer (same slices, same tap
order, same matrix product): the attacks on those victims give bit-identical results.

"pallas" computes every convolution without dilation or groups (1-, 2-, 3-D, any strides,
padding and dimension numbers) by `pallas_conv.conv_pallas`, an implicit-GEMM Pallas kernel with
its own reverse-mode rules of any order, which never writes the patches to memory (compiled on
GPU, interpret mode elsewhere: slow on CPU, for correctness only); the others as "im2col". It
supports reverse-mode differentiation only (no `jax.jvp` through it).

"auto" rewrites every convolution, like "im2col". Measured on this project's 2-core CPU: the
value and input gradient of a gradient-matching loss (one conv layer + sigmoid + mean-pool +
linear head unless noted), `vmap`ped over R candidates, XLA's convolutions vs the rewrite:
  3×3, 3->16 ch (2 layers), 8 frames 32×32  R=1: 36 vs 21 ms     R=4: 1,304 vs 210 ms
  3×3, 64->64, 56×56                       R=1: 24 vs 20 ms     R=4: 68,600 vs 276 ms
  7×7 stride 2, 3->64, 112×112             R=1: 8.6 vs 5.9 ms   R=4: 9,100 vs 70 ms
  1×1, 64->128, 28×28                      R=1: 1,093 vs 1.6 ms R=4: 5,858 vs 5.8 ms
  3×3, 128->128, 4 frames 14×14            R=1: 72 vs 17 ms     R=4: 2,003 vs 124 ms
  3×3, 256->256, 28×28                     R=1: 156 vs 116 ms
  5×5, 32->32, 2 frames 64×64              R=1: 340 vs 210 ms
  3×3, 64->64, 112×112                     R=1: 148 vs 228 ms (the one case XLA wins, 1.5×)
XLA is ahead only for one candidate at a time (no grouped convolutions) on large 2-D feature
maps, by at most 1.5× here, and behind by 6–1,000× as soon as candidates are batched. Whether an
outer `vmap` will batch a convolution's weights is not known where it is rewritten (`vmap` of a
jitted loss batches the already-traced program), so "auto" does not gamble on it: to keep XLA's
kernels for such a model attacked one candidate at a time, pass "xla".
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend import linear_util as lu
from jax.extend import source_info_util

from vidleak_jax.attack import pallas_conv

CONV_MODES = ("auto", "im2col", "pallas", "xla")


# ----------------------------------------------------------------------------------------------
# One convolution as patches + dot_general.


def _conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) -> lax.ConvDimensionNumbers:
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers
  return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)


def _transpose(x: jax.Array, perm: Sequence[int]) -> jax.Array:
  perm = tuple(perm)
  return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)


def _patches(x: jax.Array, kernel: Sequence[int], strides: Sequence[int],
             rhs_dilation: Sequence[int]) -> jax.Array:
  """x [N, *S, C] (already padded and lhs-dilated) -> patches [N, *S_out, prod(kernel) * C],
  tap-major (the channel index runs over (k_0, ..., k_{d-1}, c), like kernel[*K, C, O] reshaped).

  Built one spatial axis at a time, last first, as k strided slices concatenated on the channel
  axis: on XLA:CPU a few small concatenations (and their transposes) run faster, and compile
  faster, than one concatenation of prod(k) slices.
  """
  for axis in reversed(range(len(kernel))):
    k, s, d = kernel[axis], strides[axis], rhs_dilation[axis]
    out = (x.shape[axis + 1] - (k - 1) * d - 1) // s + 1
    taps = [lax.slice_in_dim(x, o * d, o * d + (out - 1) * s + 1, s, axis=axis + 1)
            for o in range(k)]
    x = taps[0] if k == 1 else lax.concatenate(taps, x.ndim - 1)
  return x


def conv_general_dilated_as_dot(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                                padding: str | Sequence[tuple[int, int]],
                                lhs_dilation: Sequence[int] | None = None,
                                rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers=None, feature_group_count: int = 1,
                                batch_group_count: int = 1, precision=None,
                                preferred_element_type=None, **unused) -> jax.Array:
  """`lax.conv_general_dilated` with the same arguments, computed as patches + `dot_general`.

  Extra keyword arguments of the primitive (e.g. `out_sharding`) are ignored.
  """
  del unused
  nsp = lhs.ndim - 2
  dn = _conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_spec, rhs_spec, out_spec = dn
  strides = tuple(window_strides)
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  kernel = tuple(rhs.shape[d] for d in rhs_spec[2:])
  if isinstance(padding, str):
    in_spatial = [(lhs.shape[d] - 1) * ld + 1 for d, ld in zip(lhs_spec[2:], lhs_dilation)]
    eff_kernel = [(k - 1) * rd + 1 for k, rd in zip(kernel, rhs_dilation)]
    padding = lax.padtype_to_pads(in_spatial, eff_kernel, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  g, b = feature_group_count, batch_group_count
  if g > 1 and b > 1:
    raise ValueError("feature_group_count and batch_group_count cannot both exceed 1")

  x = _transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, *S, C]
  w = _transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [*K, I, O]
  n, c_in, c_out = x.shape[0], x.shape[-1], w.shape[-1]
  config = [(0, 0, 0), *[(lo, hi, ld - 1) for (lo, hi), ld in zip(padding, lhs_dilation)],
            (0, 0, 0)]
  if any(p != (0, 0, 0) for p in config):
    x = lax.pad(x, np.zeros((), x.dtype), config)
  out_spatial = tuple((x.shape[i + 1] - (k - 1) * d - 1) // s + 1
                      for i, (k, s, d) in enumerate(zip(kernel, strides, rhs_dilation)))
  dtype = preferred_element_type or lhs.dtype
  if min(out_spatial) <= 0 or n == 0:  # an empty output
    out_shape = [0] * (nsp + 2)
    for dim, size in zip(out_spec, (n // b, c_out, *[max(o, 0) for o in out_spatial])):
      out_shape[dim] = size
    return jnp.zeros(out_shape, dtype)
  patches = _patches(x, kernel, strides, rhs_dilation)  # [N, *S_out, P*C]
  taps = math.prod(kernel)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  last = patches.ndim - 1
  if g == 1 and b == 1:
    y = lax.dot_general(patches, w.reshape(taps * c_in, c_out), (((last,), (0,)), ((), ())), **kw)
  elif g > 1:  # group j: input channels [j·C/g, (j+1)·C/g) -> output channels [j·O/g, (j+1)·O/g)
    cg, og = c_in // g, c_out // g
    p = patches.reshape(n, *out_spatial, taps, g, cg)
    k = w.reshape(taps, cg, g, og)
    y = lax.dot_general(p, k, (((nsp + 1, nsp + 3), (0, 1)), ((nsp + 2,), (2,))), **kw)
    y = _transpose(y, (*range(1, nsp + 2), 0, nsp + 2)).reshape(n, *out_spatial, c_out)
  else:  # group j: batch rows [j·N/b, (j+1)·N/b) -> output channels [j·O/b, (j+1)·O/b)
    nb, ob = n // b, c_out // b
    p = patches.reshape(b, nb, *out_spatial, taps * c_in)
    k = w.reshape(taps * c_in, b, ob)
    y = lax.dot_general(p, k, (((nsp + 2,), (0,)), ((0,), (1,))), **kw)  # [b, nb, *S, ob]
    y = _transpose(y, (*range(1, nsp + 2), 0, nsp + 2)).reshape(nb, *out_spatial, c_out)
  where = {out_spec[0]: 0, out_spec[1]: nsp + 1, **{d: i + 1 for i, d in enumerate(out_spec[2:])}}
  return _transpose(y, [where[d] for d in range(nsp + 2)])


# ----------------------------------------------------------------------------------------------
# The jaxpr interpreter.


def _is_dynamic(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _bind(eqn, invals, params=None):
  prim = eqn.primitive
  bind_params = prim.get_bind_params(eqn.params if params is None else params)
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
    return prim.bind(*subfuns, *invals, **bind_params)
  return prim.bind(*invals, **bind_params)


def _as_fun(closed, conv) -> Callable:
  """The rewritten evaluation of ClosedJaxpr `closed` as a function of its inputs."""
  return lambda *args: _eval(closed.jaxpr, closed.consts, args, conv)


def _rewrite_closed(closed, conv):
  """ClosedJaxpr `closed` with its convolutions rewritten (same input and output types)."""
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in closed.in_avals]
  return jax.make_jaxpr(_as_fun(closed, conv))(*avals)


def _conv(eqn, invals, conv):
  return conv(*invals, **eqn.params)


def _conv_pallas_or_dot(lhs, rhs, **params) -> jax.Array:
  """The Pallas kernel (`pallas_conv`) where it applies (no dilation, no groups), else patches."""
  if pallas_conv.supports(lhs, rhs, **params):
    return pallas_conv.conv_general_dilated_pallas(lhs, rhs, **params)
  return conv_general_dilated_as_dot(lhs, rhs, **params)


_CONV_FNS = {"auto": conv_general_dilated_as_dot, "im2col": conv_general_dilated_as_dot,
             "pallas": _conv_pallas_or_dot}


def _has_conv(jaxpr) -> bool:
  """Whether open `jaxpr` or any program nested in it holds a convolution."""
  return any(eqn.primitive is lax.conv_general_dilated_p
             or any(_has_conv(sub) for sub in jex_core.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def _jit(eqn, invals, conv):
  return _bind(eqn, invals, {**eqn.params, "jaxpr": _rewrite_closed(eqn.params["jaxpr"], conv)})


def _call(eqn, invals, conv):
  jaxpr = eqn.params["call_jaxpr"]
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    return _eval(jaxpr.jaxpr, jaxpr.consts, invals, conv)
  return _eval(jaxpr, (), invals, conv)


def _custom_jvp(eqn, invals, conv):
  rule = eqn.params["jvp_jaxpr_fun"]

  @functools.lru_cache(maxsize=None)
  def rewritten_rule(*zeros):
    jaxpr, consts, out_zeros = rule.call_wrapped(*zeros)
    closed = _rewrite_closed(jex_core.ClosedJaxpr(jaxpr, consts), conv)
    return closed.jaxpr, closed.consts, out_zeros

  params = {**eqn.params, "call_jaxpr": _rewrite_closed(eqn.params["call_jaxpr"], conv),
            "jvp_jaxpr_fun": lu.wrap_init(rewritten_rule, debug_info=rule.debug_info)}
  return _bind(eqn, invals, params)


def _custom_vjp(eqn, invals, conv):
  fwd = eqn.params["fwd_jaxpr_thunk"]

  @functools.lru_cache(maxsize=None)
  def rewritten_fwd(*zeros):
    closed = _rewrite_closed(jex_core.ClosedJaxpr(*fwd.call_wrapped(*zeros)), conv)
    return closed.jaxpr, closed.consts

  params = {**eqn.params, "call_jaxpr": _rewrite_closed(eqn.params["call_jaxpr"], conv),
            "fwd_jaxpr_thunk": lu.wrap_init(rewritten_fwd, debug_info=fwd.debug_info)}
  return _bind(eqn, invals, params)


def _scan(eqn, invals, conv):
  p = eqn.params
  body = _as_fun(p["jaxpr"], conv)
  consts, carry, xs = (invals[:p["num_consts"]],
                       invals[p["num_consts"]:p["num_consts"] + p["num_carry"]],
                       invals[p["num_consts"] + p["num_carry"]:])

  def step(c, x):
    out = body(*consts, *c, *x)
    return tuple(out[:p["num_carry"]]), tuple(out[p["num_carry"]:])

  extra = {k: p[k] for k in ("_split_transpose",) if k in p}
  carry, ys = lax.scan(step, tuple(carry), tuple(xs), length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"], **extra)
  return [*carry, *ys]


def _while(eqn, invals, conv):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
  cond, body = _as_fun(p["cond_jaxpr"], conv), _as_fun(p["body_jaxpr"], conv)
  out = lax.while_loop(lambda c: cond(*cond_consts, *c)[0],
                       lambda c: tuple(body(*body_consts, *c)), tuple(init))
  return list(out)


def _cond(eqn, invals, conv):
  index, *ops = invals
  branches = [(lambda f: lambda *a: tuple(f(*a)))(_as_fun(b, conv))
              for b in eqn.params["branches"]]
  return list(lax.switch(index, branches, *ops))


def _remat(eqn, invals, conv):
  p = eqn.params
  fun = lambda *a: _eval(p["jaxpr"], (), a, conv)
  return jax.checkpoint(fun, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


_HANDLERS: dict[str, Callable] = {
    "conv_general_dilated": _conv,
    "jit": _jit, "pjit": _jit,
    "closed_call": _call, "core_call": _call,
    "custom_jvp_call": _custom_jvp,
    "custom_vjp_call": _custom_vjp,
    "scan": _scan, "while": _while, "cond": _cond,
    "remat2": _remat, "checkpoint": _remat,
}


def _eval(jaxpr, consts, args, conv: Callable) -> list[Any]:
  """Evaluates open `jaxpr` on `consts` and `args`, re-emitting every equation (rewritten where
  `_HANDLERS` says; convolutions by `conv`, with `lax.conv_general_dilated`'s arguments) under the
  current trace."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    handler = _HANDLERS.get(eqn.primitive.name)
    if handler is not None and eqn.primitive is not lax.conv_general_dilated_p and not any(
        _has_conv(sub) for sub in jex_core.jaxprs_in_params(eqn.params)):
      handler = None  # nothing to rewrite inside: re-bound untouched
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
          eqn.ctx.manager):
      out = _bind(eqn, invals) if handler is None else handler(eqn, invals, conv)
    if eqn.primitive.multiple_results:
      for var, val in zip(eqn.outvars, out):
        env[var] = val
    else:
      env[eqn.outvars[0]] = out
  return [read(v) for v in jaxpr.outvars]


def fast_convs(fn: Callable, mode: str = "auto") -> Callable:
  """`fn` with its convolutions computed as patches + matrix products (see the module docstring).

  The returned function takes the same arguments and returns the same values (to float rounding);
  it is traced, differentiated (to any order), jitted and vmapped like any JAX function. Array
  leaves of the arguments are inputs of the rewritten program; other leaves (Python numbers,
  strings, None) are passed to `fn` as they are. `fn` is traced again on every call: call the
  result inside `jax.jit` (or the caller's traced function), where that happens once per trace.
  mode: "auto" and "im2col" rewrite every convolution (see the module docstring for why "auto"
  does); "pallas" computes those without dilation or groups by the implicit-GEMM Pallas kernel
  (`pallas_conv`; the others as "im2col"); "xla" returns `fn` itself.
  """
  if mode not in CONV_MODES:
    raise KeyError(f"unknown conv mode {mode!r}; valid: {', '.join(CONV_MODES)}")
  if mode == "xla":
    return fn
  conv = _CONV_FNS[mode]

  @functools.wraps(fn)
  def rewritten(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]

    def flat_fn(*values):
      full = list(leaves)
      for i, value in zip(where, values):
        full[i] = value
      a, k = jax.tree.unflatten(treedef, full)
      return fn(*a, **k)

    values = [leaves[i] for i in where]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*values)
    out = _eval(closed.jaxpr, closed.consts, values, conv)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return rewritten

"""PyTorch peer of the attack engine, for side-by-side benchmarks against JAX.

`TorchVictim` rebuilds the `c3d` / `frame_cnn` victims from a JAX params dict (kernels copied and
transposed, XLA-exact SAME padding), so both frameworks compute the same function. `TorchAttack`
runs the `AttackConfig` objective (1 − cosine gradient matching + weighted priors), signed Adam
and the [0, 1] box, one candidate at a time ("loop") or batched with `torch.func` ("vmap").
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from experiments.host_memory import host_mark, host_peak_since
from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.objectives import leaf_paths, resolve_layer_weights
from vidleak_jax.attack.optimizers import SCHEDULES
from vidleak_jax.models.victims import POOLINGS, Preprocess

STRIDES = {  # per victim: conv layer -> strides (the JAX victims' layer sizes)
    "c3d": {"conv1": (1, 2, 2), "conv2": (2, 2, 2), "conv3": (1, 1, 1)},
    "frame_cnn": {"conv1": (2, 2), "conv2": (2, 2), "conv3": (1, 1)},
}
ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh,
               "gelu": lambda x: F.gelu(x, approximate="tanh")}  # jax.nn.gelu is the tanh form
MODES = ("auto", "loop", "vmap")
_EPS = 1e-12
_TO_TORCH = {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1), 2: (1, 0)}  # JAX kernel -> torch weight axes


def torch_name(path: str) -> str:
  """Torch name of JAX leaf `path` ("encoder/conv1/kernel" -> "encoder.conv1.weight")."""
  *mods, leaf = path.split("/")
  return ".".join([*mods, "weight" if leaf == "kernel" else leaf])


def to_torch_layout(x: Any) -> torch.Tensor:
  """JAX leaf (kernel [..spatial, Cin, Cout] / [in, out], or bias) as a torch float tensor."""
  a = np.array(x, np.float32)  # a writable copy
  return torch.from_numpy(np.ascontiguousarray(a.transpose(_TO_TORCH[a.ndim]) if a.ndim > 1
                                               else a))


def to_jax_layout(t: torch.Tensor) -> np.ndarray:
  """Inverse of `to_torch_layout`, as a numpy array."""
  a = t.detach().cpu().numpy()
  return a.transpose(np.argsort(_TO_TORCH[a.ndim])) if a.ndim > 1 else a


def same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> list[int]:
  """`F.pad` widths (last dim first) reproducing XLA SAME padding (extra pixel at the high end)."""
  pads: list[int] = []
  for n, k, s in reversed(list(zip(sizes, kernel, strides))):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads += [total // 2, total - total // 2]
  return pads


class SameConv(nn.Module):
  """2-D/3-D convolution with XLA SAME padding, on channels-first input."""

  def __init__(self, kernel: Any, bias: Any, strides: Sequence[int]):
    super().__init__()
    self.weight = nn.Parameter(to_torch_layout(kernel))
    self.bias = nn.Parameter(to_torch_layout(bias))
    self.strides = tuple(strides)
    self.conv = F.conv3d if len(self.strides) == 3 else F.conv2d

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.pad(x, same_pads(x.shape[2:], self.weight.shape[2:], self.strides))
    return self.conv(x, self.weight, self.bias, stride=self.strides)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
  """[n_out, n_in] matrix of `jax.image.resize(..., "linear")` along one axis (it is separable)."""
  return torch.from_numpy(np.array(
      jax.image.resize(jnp.eye(n_in, dtype=jnp.float32), (n_out, n_in), "linear")))


class TorchVictim(nn.Module):
  """`c3d` or `frame_cnn` from JAX `params`: clips [B,T,H,W,C] in [0, 1] -> logits [B, K]."""

  def __init__(self, victim: str, params: Mapping[str, Any], clip_hw: tuple[int, int],
               channels: int, *, activation: str = "sigmoid", pooling: str = "mean",
               input_size: tuple[int, int] | None = None):
    super().__init__()
    if victim not in STRIDES:
      raise KeyError(f"no torch peer for victim {victim!r}; valid: {', '.join(STRIDES)}")
    if pooling not in POOLINGS:
      raise KeyError(f"unknown pooling {pooling!r}")
    self.victim, self.pooling, self.act = victim, pooling, ACTIVATIONS[activation]
    convs = params["encoder"] if victim == "frame_cnn" else params
    layers = nn.ModuleDict({name: SameConv(convs[name]["kernel"], convs[name]["bias"], strides)
                            for name, strides in STRIDES[victim].items()})
    if victim == "frame_cnn":
      self.encoder = layers
    else:
      for name, layer in layers.items():
        self.add_module(name, layer)
    self.convs = list(layers.values())  # the same (registered) modules, in order
    kernel = np.asarray(params["head"]["kernel"])
    self.head = nn.Linear(*kernel.shape)  # weights replaced below: nnx.Linear's kernel is [in, out]
    self.head.weight.data, self.head.bias.data = (to_torch_layout(kernel),
                                                  to_torch_layout(params["head"]["bias"]))
    size = tuple(input_size or clip_hw)
    pre = Preprocess(1, channels, size)  # the JAX defaults for mean / std
    self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32))
    self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32))
    self.resize = size != tuple(clip_hw)
    if self.resize:
      self.register_buffer("resize_h", _resize_matrix(clip_hw[0], size[0]))
      self.register_buffer("resize_w", _resize_matrix(clip_hw[1], size[1]))

  def forward(self, clips: torch.Tensor) -> torch.Tensor:
    x = clips
    if self.resize:
      x = torch.einsum("ih,bthwc->btiwc", self.resize_h, x)
      x = torch.einsum("jw,btiwc->btijc", self.resize_w, x)
    x = (x - self.mean) / self.std
    b, t, h, w, c = x.shape
    if self.victim == "c3d":
      x = x.permute(0, 4, 1, 2, 3)  # NCTHW
      for conv in self.convs:
        x = self.act(conv(x))
      return self.head(x.permute(0, 2, 3, 4, 1).reshape(b, -1))  # JAX's channels-last flatten
    x = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # NCHW frames
    for conv in self.convs:
      x = self.act(conv(x))
    feats = x.permute(0, 2, 3, 1).reshape(b, t, -1)
    pooled = {"mean": lambda: feats.mean(1), "max": lambda: feats.amax(1),
              "concat": lambda: feats.reshape(b, -1)}[self.pooling]()
    return self.head(pooled)


def _cosine(grads: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            weights: Sequence[float]) -> torch.Tensor:
  dot = sum(w * torch.sum(g * t) for g, t, w in zip(grads, targets, weights))
  g_sq = sum(w * torch.sum(g * g) for g, w in zip(grads, weights))
  t_sq = sum(w * torch.sum(t * t) for t, w in zip(targets, weights))
  return 1.0 - dot / (torch.sqrt(g_sq + _EPS) * torch.sqrt(t_sq + _EPS))


def _tv_spatial(x: torch.Tensor) -> torch.Tensor:
  dy = (x[:, :, 1:] - x[:, :, :-1]).abs()
  dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs()
  return (dy.mean() if dy.numel() else 0.0) + (dx.mean() if dx.numel() else 0.0)


def _tv_temporal(x: torch.Tensor) -> torch.Tensor:
  return (x[:, 1:] - x[:, :-1]).abs().mean() if x.shape[1] > 1 else x.new_zeros(())


PRIORS = {"tv_spatial": _tv_spatial, "tv_temporal": _tv_temporal,
          "l2": lambda x: torch.square(x - 0.5).mean()}


class TorchAttack:
  """Candidates [R,B,T,H,W,C] optimised like `vl.attack.make_attack` (signed Adam, box)."""

  def __init__(self, model: TorchVictim, jax_params: Any, target_grads: Any, labels: Any,
               candidates: Any, config: AttackConfig, mode: str = "auto"):
    if config.metric != "cosine" or config.optimizer != "signed_adam":
      raise ValueError("the torch peer implements metric='cosine', optimizer='signed_adam' only")
    if mode not in MODES:
      raise KeyError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    self.model, self.config, dev = model, config, next(model.parameters()).device
    self.paths = leaf_paths(jax_params)
    self.names = [torch_name(p) for p in self.paths]
    self.weights = resolve_layer_weights(jax_params, config.layer_weights)
    self.targets = [to_torch_layout(t).to(dev) for t in jax.tree.leaves(target_grads)]
    lab = torch.as_tensor(np.array(labels), device=dev)  # int [B] or probabilities [B, K]
    self.labels = lab if lab.is_floating_point() else lab.long()
    self.params = {n: p.detach() for n, p in model.named_parameters()}
    self.priors = [(PRIORS[n], w) for n, w in sorted(config.priors.items()) if w > 0]
    self.candidates = torch.tensor(np.asarray(candidates), dtype=torch.float32, device=dev,
                                   requires_grad=True)
    r = self.candidates.shape[0]
    self.mode = ("loop" if r == 1 else "vmap") if mode == "auto" else mode
    self.opt = torch.optim.Adam([self.candidates], lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = SCHEDULES.get(config.schedule)(config.lr, config.steps)
    with jax.numpy_dtype_promotion("standard"):  # the optax lr at every step count, as floats
      self.lrs = np.asarray(sched(jnp.arange(config.steps + 1, dtype=jnp.int32)),
                            np.float32).tolist()
    self.step_count, self.best_loss = 0, torch.full((r,), float("inf"), device=dev)
    self.best_candidates = self.candidates.detach().clone()
    self._batched = vmap(grad_and_value(self._functional_objective, has_aux=True))

  def _total(self, grads: Sequence[torch.Tensor], x: torch.Tensor):
    match = _cosine(grads, self.targets, self.weights)
    return match + sum(w * fn(x) for fn, w in self.priors), match

  def _ce(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(self.model, params, (x,)), self.labels)

  def _functional_objective(self, x: torch.Tensor):
    g = grad(self._ce)(self.params, x)
    return self._total([g[n] for n in self.names], x)

  def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, grad-match term, d objective / d x) of one candidate x [B,T,H,W,C] (autograd)."""
    x = x.detach().requires_grad_(True)
    ps = [self.model.get_parameter(n) for n in self.names]
    gs = torch.autograd.grad(F.cross_entropy(self.model(x), self.labels), ps, create_graph=True)
    total, match = self._total(gs, x)
    (gx,) = torch.autograd.grad(total, x)
    return total.detach(), match.detach(), gx

  def step(self) -> torch.Tensor:
    """One optimizer step on every candidate; returns the loss [R] at the pre-update candidates."""
    x = self.candidates.detach().clone()
    if self.mode == "vmap":
      gx, (loss, _) = self._batched(x)
    else:
      outs = [self.value_and_grad(xr) for xr in x]
      loss, gx = torch.stack([o[0] for o in outs]), torch.stack([o[2] for o in outs])
    self.opt.param_groups[0]["lr"] = self.lrs[min(self.step_count, len(self.lrs) - 1)]
    self.candidates.grad = torch.sign(gx)
    self.opt.step()
    with torch.no_grad():
      if self.config.box:
        self.candidates.clamp_(0.0, 1.0)
      improved = loss < self.best_loss
      mask = improved.view(-1, *[1] * (x.ndim - 1))
      self.best_candidates = torch.where(mask, x, self.best_candidates)
      self.best_loss = torch.where(improved, loss, self.best_loss)
    self.step_count += 1
    return loss.detach()


def set_float32_precision(precision: str) -> None:
  """Mirror of jax.default_matmul_precision for the peer: "highest" turns TF32 off in CUDA matmuls
  and cuDNN convolutions; "default"/"high" restore PyTorch's defaults (TF32 convolutions only)."""
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = precision != "highest"


def make_torch_attack(victim: str, jax_params: Any, clip_shape: Sequence[int], target_grads: Any,
                      labels: Any, candidates: Any, config: AttackConfig | None = None,
                      mode: str = "auto", device: str | None = None,
                      **victim_kwargs) -> TorchAttack:
  """Torch peer of `make_attack` for clips (B,T,H,W,C), starting from `candidates` [R,...]."""
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  _, _, h, w, c = clip_shape
  model = TorchVictim(victim, jax_params, (h, w), c, **victim_kwargs).to(device)
  config = config or AttackConfig(restarts=int(np.shape(candidates)[0]))
  return TorchAttack(model, jax_params, target_grads, labels, candidates, config, mode)


def time_torch_attack(attack: TorchAttack, steps: int = 3, steps_per_dispatch: int = 1
                      ) -> dict[str, Any]:
  """Times `steps` groups of `steps_per_dispatch` steps after one warm-up group; one result dict."""
  dev = attack.candidates.device
  cuda = dev.type == "cuda"
  sync = torch.cuda.synchronize if cuda else lambda: None
  if cuda:
    torch.cuda.reset_peak_memory_stats(dev)
  mark, times = host_mark(), []
  for _ in range(steps + 1):
    sync()
    start = time.perf_counter()
    for _ in range(steps_per_dispatch):
      loss = attack.step()
    sync()
    times.append(time.perf_counter() - start)
  step_s, r = statistics.median(times[1:]) / steps_per_dispatch, attack.candidates.shape[0]
  return {
      "torch_mode": attack.mode, "torch_device": str(dev), "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(), "torch_compile_s": times[0],
      "torch_step_s": step_s, "torch_steps_per_s": 1.0 / step_s,
      "torch_candidate_steps_per_s": r / step_s, "torch_finite": bool(torch.isfinite(loss).all()),
      "torch_peak_mem_bytes": (torch.cuda.max_memory_allocated(dev) if cuda
                               else host_peak_since(mark)[0]),
      "torch_peak_mem_source": ("cuda_max_memory_allocated" if cuda
                                else "vmhwm_delta" if mark[1] else "maxrss_delta"),
  }

"""Matplotlib figures of a run or a sweep, returned as PNG bytes (Agg, no pyplot global state)."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from vidleak_jax.sweep import flag_text

DPI = 100


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # Agg via the png format
  return buf.getvalue()


def _figure(panels: int) -> tuple[Figure, list[Any]]:
  fig = Figure(figsize=(5.2 * panels, 3.4), layout="constrained")
  return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def curves_png(step: Sequence[float], objective: Any, psnr: Sequence[float] | None = None) -> bytes:
  """Objective vs step (objective [N] or [N, R]: one line per restart) and, if given, PSNR [N]."""
  objective = np.asarray(objective, dtype=np.float64)
  objective = objective[:, None] if objective.ndim == 1 else objective
  step = np.asarray(step, dtype=np.float64)
  fig, axes = _figure(1 if psnr is None else 2)
  ax = axes[0]
  for r in range(objective.shape[1]):
    ax.plot(step, objective[:, r], lw=1.2,
            label=f"restart {r}" if objective.shape[1] > 1 else None)
  finite = objective[np.isfinite(objective)]
  if finite.size and finite.min() > 0:
    ax.set_yscale("log")
  if objective.shape[1] > 1:
    ax.legend(fontsize=8)
  ax.set(title="attack objective", xlabel="step", ylabel="objective")
  ax.grid(alpha=0.3)
  if psnr is not None:
    axes[1].plot(step, np.asarray(psnr, dtype=np.float64), color="tab:green", lw=1.2)
    axes[1].set(title="PSNR of the best candidate", xlabel="step", ylabel="PSNR (dB)")
    axes[1].grid(alpha=0.3)
  return _png(fig)


def per_frame_png(psnr_per_frame: Any, ssim_per_frame: Any) -> bytes:
  """Grouped bars per frame: PSNR [B, T] and SSIM [B, T], one colour per clip."""
  fig, axes = _figure(2)
  for ax, values, title, unit in ((axes[0], psnr_per_frame, "PSNR per frame", "PSNR (dB)"),
                                  (axes[1], ssim_per_frame, "SSIM per frame", "SSIM")):
    values = np.asarray(values, dtype=np.float64)
    clips, frames = values.shape
    width = 0.8 / clips
    for b in range(clips):
      ax.bar(np.arange(frames) + (b - (clips - 1) / 2) * width, values[b], width,
             label=f"clip {b}")
    ax.set(title=title, xlabel="frame", ylabel=unit, xticks=np.arange(frames))
    ax.grid(axis="y", alpha=0.3)
    if clips > 1:
      ax.legend(fontsize=8)
  return _png(fig)


def _numeric(values: Sequence[Any]) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sweep_png(rows: Sequence[dict[str, Any]], flag: str, values: Sequence[Any],
              metrics: Sequence[str] = ("psnr_mean", "ssim_mean")) -> bytes:
  """Each metric against the swept `flag` (its grid `values`): mean ± std over the other flags.

  Numeric values sit on a numeric axis, others (names, booleans, lists) are categories in grid
  order. Rows without a metric are left out of that metric's points.
  """
  metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
  fig, axes = _figure(max(1, len(metrics)))
  numeric = _numeric(values)
  positions = np.asarray(values, dtype=np.float64) if numeric else np.arange(len(values))
  for ax, metric in zip(axes, metrics):
    xs, means, stds, counts = [], [], [], []
    for pos, value in sorted(zip(positions, values), key=lambda pv: pv[0]):  # lines go left→right
      found = [r[metric] for r in rows if r.get(flag) == value and r.get(metric) is not None]
      if found:
        xs.append(pos)
        means.append(np.mean(found))
        stds.append(np.std(found))
        counts.append(len(found))
    ax.errorbar(xs, means, yerr=stds, fmt="o-" if numeric else "o", capsize=4, lw=1.5)
    for x, m, n in zip(xs, means, counts):
      ax.annotate(f"n={n}", (x, m), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set(title=f"{metric} vs {flag}", xlabel=flag, ylabel=metric)
    if numeric and positions.min() > 0 and positions.max() >= 100 * positions.min():
      ax.set_xscale("log")  # e.g. learning rates or prior weights over decades
    if not numeric:
      ax.set_xlim(-0.5, len(values) - 0.5)
    if not numeric or len(values) <= 12:  # a tick at every swept value
      ax.set_xticks(positions, [flag_text(v) for v in values])
      ax.minorticks_off()
    ax.grid(alpha=0.3)
  return _png(fig)


def study_png(panels: dict[str, dict[str, list[tuple[str, Sequence[float]]]]],
              ylabel: str) -> bytes:
  """One panel per axis of a study: for each series (e.g. victim and data source) the mean ± std
  of its values at every setting of the axis, settings as categories in the given order.

  panels: axis title -> series name -> [(setting label, values over seeds), ...].
  """
  fig, axes = _figure(max(1, len(panels)))
  for ax, (title, series) in zip(axes, panels.items()):
    labels = list(dict.fromkeys(label for points in series.values() for label, _ in points))
    for offset, (name, points) in enumerate(series.items()):
      shift = 0.08 * (offset - (len(series) - 1) / 2)  # side by side, not on top of each other
      found = [(labels.index(label) + shift, np.mean(v), np.std(v)) for label, v in points if v]
      if found:
        xs, means, stds = zip(*found)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, lw=1.2, label=name)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _png(fig)


def tradeoff_png(curves: dict[str, list[tuple[str, Sequence[float], dict[str, Sequence[float]]]]],
                 panels: Sequence[tuple[str, str]]) -> bytes:
  """Leakage against utility, one panel per leakage metric: per curve (a defence family over its
  strength) the mean ± std (both axes, over seeds) of every setting, labelled, joined in order.

  curves: family -> [(point label, utility values, {metric key: leakage values}), ...];
  panels: [(metric key, y label), ...].
  """
  fig, axes = _figure(len(panels))
  fig.set_size_inches(6.4 * len(panels), 4.6)
  for ax, (key, ylabel) in zip(axes, panels):
    for name, points in curves.items():
      found = [(label, np.mean(u), np.std(u), np.mean(v[key]), np.std(v[key]))
               for label, u, v in points if len(u) and len(v.get(key, ()))]
      if not found:
        continue
      labels, ux, us, vy, vs = zip(*found)
      line = ax.errorbar(ux, vy, xerr=us, yerr=vs, fmt="o-", capsize=3, lw=1.2, ms=4, label=name)
      for label, x, y in zip(labels, ux, vy):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                    color=line[0].get_color())
    ax.set(xlabel="utility: test accuracy of the model trained under the defence",
           ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return _png(fig)

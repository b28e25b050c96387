"""Self-contained HTML reports of a run or a sweep (every image inline as a data: URI).

A run report shows truth / reconstruction / super-resolved clips as GIFs, the attack curves,
per-frame PSNR/SSIM and the run's settings; a sweep report shows the results table, each metric
against each swept flag and a thumbnail section per point. Both open offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
import urllib.parse
from typing import Any, Collection, Sequence

import numpy as np

from vidleak_jax import sweep
from vidleak_jax.report import plots
from vidleak_jax.io import load_npz, write_text
from vidleak_jax.report.frames import encode_gif, frame_grid

REPORT_FILE = "report.html"
CLIP_HEIGHT = 128  # on-screen pixels per clip in the GIFs (integer upscaling, nearest neighbour)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222;
  padding: 0 16px; }
h1 { font-size: 1.5em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.9em; color: #555; margin-top: 4px; }
img.pixels { image-rendering: pixelated; border: 1px solid #ddd; }
img.plot { max-width: 100%; }
.points { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; }
.point { border: 1px solid #ddd; border-radius: 6px; padding: 4px 12px 8px; }
.point h3 { font-size: 1em; word-break: break-all; }
"""
# Marks <body> with how many images decoded, for headless checks of the embedded data.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesDecoded = images.filter(function (im) {
    return im.complete && im.naturalWidth > 0; }).length;
});
"""


def _esc(value: Any) -> str:
  return html.escape(_text(value), quote=True)


def _text(value: Any) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, list):
    return ", ".join(_text(v) for v in value)
  return sweep.flag_text(value) if isinstance(value, bool) else str(value)


def _img(data: bytes, mime: str, alt: str, *, css_class: str, style: str = "") -> str:
  uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
  style = f' style="{_esc(style)}"' if style else ""
  return f'<img class="{css_class}" src="{uri}" alt="{_esc(alt)}"{style}>'


def _gif_figure(gif: bytes, caption: str, height: int) -> str:
  """A GIF shown `height` CSS pixels tall (sharp pixels), captioned."""
  image = _img(gif, "image/gif", caption, css_class="pixels", style=f"height:{height}px")
  return f"<figure>{image}<figcaption>{_esc(caption)}</figcaption></figure>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """An HTML table; cells are escaped unless given as `_Html` (already safe markup)."""
  def cell(value: Any) -> str:
    if isinstance(value, _Html):
      return f"<td>{value}</td>"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_esc(value)}</td>' if numeric else f"<td>{_esc(value)}</td>"
  head = "".join(f"<th>{_esc(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


class _Html(str):
  """Markup that `_table` inserts as is."""


def _page(title: str, body: Sequence[str]) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f"<title>{_esc(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script>"
          f"</head><body>\n<h1>{_esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in obj.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _clips_gif(clips: np.ndarray, fps: float) -> tuple[bytes, int]:
  """clips [B,T,H,W,C] → (GIF bytes: clips stacked vertically, one GIF frame per t; height)."""
  scale = max(1, round(CLIP_HEIGHT / clips.shape[2]))
  frames = np.stack([frame_grid(clips[:, t:t + 1], scale=scale, pad=2)
                     for t in range(clips.shape[1])])
  return encode_gif(frames, fps=fps), frames.shape[1]


def _clips_section(run_dir: str, metrics: dict[str, Any], fps: float) -> list[str]:
  truth = load_npz(os.path.join(run_dir, "data.npz"))
  rec = load_npz(os.path.join(run_dir, "reconstruction.npz"))
  perm = np.asarray(metrics.get("assignment", range(len(truth["clips"]))), dtype=np.int64)
  sources = [("ground truth", truth["clips"]), ("reconstruction", rec["clips"][perm])]
  sr_path = os.path.join(run_dir, "sr.npz")
  if os.path.exists(sr_path):  # super-resolved reconstructions, in reconstruction.npz order
    sources.append(("super-resolved", load_npz(sr_path)["clips"][perm]))
  gifs = [(name, *_clips_gif(clips, fps)) for name, clips in sources]
  height = gifs[0][2]  # every source shown at the height of the ground truth
  figures = [_gif_figure(gif, name, height) for name, gif, _ in gifs]
  labels = truth["labels"], rec["labels"][perm]
  rows = [[b, int(labels[0][b]), int(labels[1][b]), metrics["psnr"][b], metrics["ssim"][b],
           (metrics.get("psnr_init") or [None] * len(perm))[b]] for b in range(len(perm))]
  return [f'<div class="row">{"".join(figures)}</div>',
          _table(["clip", "true label", "recovered label", "PSNR (dB)", "SSIM", "PSNR init (dB)"],
                 rows)]


def _curves_png(run_dir: str, metrics: dict[str, Any]) -> bytes:
  curve = metrics.get("curve")
  if isinstance(curve, dict) and curve.get("step") and curve.get("objective"):
    return plots.curves_png(curve["step"], curve["objective"], curve.get("psnr") or None)
  loss = load_npz(os.path.join(run_dir, "reconstruction.npz"))["history_loss"]  # [steps, R]
  return plots.curves_png(np.arange(1, len(loss) + 1), loss)


def _sr_table(sr: dict[str, Any]) -> str:
  """SR settings (scalars) in a line, then each scalar score before and after SR."""
  settings = ", ".join(f"{k} {_text(v)}" for k, v in sorted(sr.items())
                       if not isinstance(v, (dict, list)))
  before, after = sr.get("before"), sr.get("after")
  if not (isinstance(before, dict) and isinstance(after, dict)):
    return f"<p>{_esc(settings)}</p>" + _table(["metric", "value"], sorted(_flatten(sr).items()))
  rows = [(k, before[k], after.get(k)) for k in sorted(before)
          if isinstance(before[k], (int, float))]
  return f"<p>{_esc(settings)}</p>" + _table(["score", "before SR", "after SR"], rows)


def run_report_html(run_dir: str, *, hidden: Collection[str] = ()) -> str:
  """The report of one run directory (after its eval stage) as an HTML string; the settings named
  in `hidden` (e.g. a CLI's housekeeping flags) are left out of its settings table."""
  metrics = _read_json(os.path.join(run_dir, "metrics.json"))
  config_path = os.path.join(run_dir, "config.json")
  config = _flatten(_read_json(config_path)) if os.path.exists(config_path) else {}
  scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
  clips = _clips_section(run_dir, metrics, float(config.get("gif_fps") or 4.0))
  body = ["<h2>Clips and scores</h2>", '<div class="row">',
          _table(["metric", "value"], sorted(scalars.items())), f"<div>{''.join(clips)}</div>",
          "</div>"]
  if isinstance(metrics.get("sr_metrics"), dict):
    body += ["<h2>Super-resolution</h2>", _sr_table(metrics["sr_metrics"])]
  body += ["<h2>Attack curves</h2>",
           _img(_curves_png(run_dir, metrics), "image/png", "attack curves", css_class="plot")]
  if metrics.get("psnr_per_frame") and metrics.get("ssim_per_frame"):
    body += ["<h2>Per-frame quality</h2>",
             _img(plots.per_frame_png(metrics["psnr_per_frame"], metrics["ssim_per_frame"]),
                  "image/png", "per-frame PSNR and SSIM", css_class="plot")]
  settings = sorted((k, v) for k, v in config.items() if k not in set(hidden))
  if settings:
    third = -(-len(settings) // 3)
    body += ["<h2>Settings</h2>", '<div class="row">',
             *(_table(["setting", "value"], settings[i:i + third])
               for i in range(0, len(settings), third)), "</div>"]
  return _page(f"vidleak_jax run: {os.path.basename(os.path.abspath(run_dir))}", body)


def _point_section(workdir: str, row: dict[str, Any], columns: Sequence[str],
                   first_metric: int) -> str:
  point_dir = os.path.join(workdir, row["point_id"])
  parts = [f'<section class="point" id="{_esc(row["point_id"])}"><h3>{_esc(row["point_id"])}</h3>',
           '<div class="row">']
  gif = os.path.join(point_dir, "comparison.gif")
  if os.path.exists(gif):
    with open(gif, "rb") as f:
      parts.append(_gif_figure(f.read(), "truth | reconstruction", 96))
  parts.append(_table(["metric", "value"], [(c, row.get(c)) for c in columns[first_metric:]]))
  parts.append("</div>")
  if os.path.exists(os.path.join(point_dir, REPORT_FILE)):
    href = urllib.parse.quote(f"{row['point_id']}/{REPORT_FILE}")
    parts.append(f'<p><a href="{_esc(href)}">full report of this point</a></p>')
  return "".join(parts) + "</section>"


def sweep_report_html(workdir: str) -> str:
  """The report of a sweep directory (its results.json and point directories) as HTML."""
  results = _read_json(os.path.join(workdir, sweep.RESULTS_JSON))
  columns, rows, grid = results["columns"], results["rows"], results["grid"]
  settings = [(f"grid: {k}", v) for k, v in grid.items()]
  settings += [(f"fixed: {k}", v) for k, v in results.get("fixed", {}).items()]
  body = [f"<p>{len(rows)} finished point(s) of "
          f"{int(np.prod([len(v) for v in grid.values()]))}.</p>",
          _table(["sweep setting", "value"], settings), "<h2>Results</h2>"]
  linked = [[_Html(f'<a href="#{_esc(r["point_id"])}">{_esc(r["point_id"])}</a>'),
             *(r.get(c) for c in columns[1:])] for r in rows]
  body.append(_table(columns, linked))
  for flag, values in grid.items():
    if len(values) > 1 and rows:
      body += [f"<h2>Against {_esc(flag)}</h2>",
               _img(plots.sweep_png(rows, flag, values), "image/png", f"metrics vs {flag}",
                    css_class="plot")]
  body += ["<h2>Points</h2>", '<div class="points">',
           *(_point_section(workdir, r, columns, 1 + len(grid)) for r in rows), "</div>"]
  return _page(f"vidleak_jax sweep: {results.get('name') or os.path.basename(workdir)}", body)


def write_run_report(run_dir: str, *, hidden: Collection[str] = ()) -> str:
  """Writes `run_dir/report.html` atomically (see `run_report_html`); returns its path."""
  path = os.path.join(run_dir, REPORT_FILE)
  write_text(path, run_report_html(run_dir, hidden=hidden))
  return path


def write_sweep_report(workdir: str) -> str:
  """Writes `workdir/report.html` for a sweep atomically; returns its path."""
  path = os.path.join(workdir, REPORT_FILE)
  write_text(path, sweep_report_html(workdir))
  return path


def write_report(directory: str, *, hidden: Collection[str] = ()) -> str:
  """Writes the report of a sweep (results.json) or a run (metrics.json) directory; `hidden` as in
  `run_report_html`."""
  if os.path.exists(os.path.join(directory, sweep.RESULTS_JSON)):
    return write_sweep_report(directory)
  if os.path.exists(os.path.join(directory, "metrics.json")):
    return write_run_report(directory, hidden=hidden)
  raise FileNotFoundError(f"{directory} holds neither a sweep ({sweep.RESULTS_JSON}) nor an "
                          f"evaluated run (metrics.json): run the 'eval' stage first")

"""Where an attack step's time goes, read from a `jax.profiler` trace.

`trace(directory)` wraps the timed dispatches (`jax.profiler.trace` with a Perfetto trace);
`summarize(directory)` reads the newest `perfetto_trace.json.gz` under it and returns the busy
time of the device per kind of work and per op; `markdown(summary)` formats that.

On a GPU the events are the device's kernels (processes named "/device:GPU:N", one thread per
stream, kernel names like `loop_transpose_fusion` or `sm90_xmma_gemm_...`); on a CPU the executable
runs on XLA's host threads ("tf_XLA...") and reports whole fusions, so the kinds say little there.
The kinds are read from kernel names (`KINDS`): a guide, not a measurement of what a fusion holds.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
from typing import Any, Iterator

import jax

# (kind, substrings of a lower-cased kernel name), first match wins; everything else is "other".
KINDS = (
    ("pallas convolution", ("_conv_kernel", "_wgrad_kernel")),
    ("matmul / convolution", ("gemm", "xmma", "cutlass", "cublas", "dot", "conv")),
    ("layout (transpose / copy / pad / slice)", ("transpose", "copy", "concatenate", "pad",
                                                 "slice", "gather", "scatter")),
    ("reduction", ("reduce",)),
    ("memset / memcpy", ("memset", "memcpy")),
)
# Lines of a device that repeat its kernels' time per module / step / scope.
_DERIVED = ("module", "step", "scope", "launch")


@contextlib.contextmanager
def trace(directory: str) -> Iterator[None]:
  """Profiles the block into `directory` (a Perfetto trace that `summarize` reads)."""
  os.makedirs(directory, exist_ok=True)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    yield


def kind(name: str) -> str:
  """The kind of work a kernel / op name suggests (`KINDS`), else "other"."""
  lower = name.lower()
  return next((k for k, keys in KINDS if any(s in lower for s in keys)), "other")


def _busy_union(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def _leaves(events: list[dict]) -> list[dict]:
  """The events that contain no other event of their thread (a thread's events nest properly:
  XLA:CPU's executor, control flow and fusions; a GPU stream's kernels never nest)."""
  by_thread: dict[tuple[int, int], list[dict]] = collections.defaultdict(list)
  for e in events:
    by_thread[e["pid"], e["tid"]].append(e)
  out = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    out += [e for e, nxt in zip(thread, thread[1:] + [None])
            if nxt is None or nxt["ts"] >= e["ts"] + e["dur"]]
  return out


def _work_threads(events: list[dict]) -> tuple[str, set[tuple[int, int]]]:
  """("gpu" | "cpu", the (pid, tid) of the threads that run the device's work)."""
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, name in procs.items() if "/device:" in name}
  if device:  # kernels on stream threads; else every line but the derived per-module ones
    on_device = {key: name.lower() for key, name in threads.items() if key[0] in device}
    streams = {key for key, name in on_device.items() if "stream" in name}
    return "gpu", streams or {key for key, name in on_device.items()
                              if not any(s in name for s in _DERIVED)}
  return "cpu", {key for key, name in threads.items() if name.startswith("tf_XLA")}


def summarize(directory: str, *, top: int = 12) -> dict[str, Any]:
  """The newest trace under `directory`, from the innermost events of the threads that run the
  work (XLA's ops where events carry an "hlo_op", waits left out), as {"device": "gpu" | "cpu",
  "span_s": first event start to last event end, "busy_s": the union of the events, "busy_fraction":
  busy ÷ span (below 1: the device waits for launches or the host), "kernel_s": summed event time
  (above busy when streams or threads overlap), "kinds": {kind: fraction of kernel_s}, "top":
  [{name, kind, total_ms, calls, fraction}] of the `top` ops by time}.
  FileNotFoundError without a trace."""
  paths = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  device, keep = _work_threads(events)
  work = [e for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) in keep
          and "wait" not in e["name"].lower()]
  ops = [e for e in work if "hlo_op" in e.get("args", {})]  # XLA's ops, where events name them
  work = _leaves(ops or work)
  if not work:
    return {"device": device, "span_s": 0.0, "busy_s": 0.0, "busy_fraction": 0.0,
            "kernel_s": 0.0, "kinds": {}, "top": []}
  intervals = [(e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6) for e in work]
  span = max(b for _, b in intervals) - min(a for a, _ in intervals)
  busy = _busy_union(intervals)
  per_op, calls = collections.Counter(), collections.Counter()
  for e in work:
    per_op[e["name"]] += e["dur"] * 1e-6
    calls[e["name"]] += 1
  kernel_s = sum(per_op.values())
  kinds = collections.Counter()
  for name, seconds in per_op.items():
    kinds[kind(name)] += seconds / kernel_s
  return {
      "device": device, "span_s": span, "busy_s": busy,
      "busy_fraction": busy / span if span > 0 else 0.0, "kernel_s": kernel_s,
      "kinds": dict(kinds.most_common()),
      "top": [{"name": name, "kind": kind(name), "total_ms": 1e3 * s, "calls": calls[name],
               "fraction": s / kernel_s} for name, s in per_op.most_common(top)],
  }


def markdown(summary: dict[str, Any], title: str = "") -> str:
  """A summary as a few lines of markdown: busy fraction, time per kind, the top ops."""
  head = f"**{title}** " if title else ""
  lines = [f"{head}{summary['device']}: busy {summary['busy_s'] * 1e3:.1f} ms of "
           f"{summary['span_s'] * 1e3:.1f} ms traced ({100 * summary['busy_fraction']:.0f} %); "
           + ", ".join(f"{k} {100 * v:.0f} %" for k, v in summary["kinds"].items()), "",
           "| op | kind | ms | calls | share |", "|---|---|---|---|---|"]
  for op in summary["top"]:
    name = op["name"] if len(op["name"]) <= 60 else op["name"][:57] + "..."
    lines.append(f"| `{name}` | {op['kind']} | {op['total_ms']:.2f} | {op['calls']} | "
                 f"{100 * op['fraction']:.1f} % |")
  return "\n".join(lines)

"""Host peak-memory measurement for benchmarks (Linux VmHWM reset, else ru_maxrss)."""

from __future__ import annotations

import resource


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:  # Linux only; callers fall back to ru_maxrss
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def host_mark() -> tuple[int, bool]:
  """Resets Linux's peak-RSS mark if allowed; returns (baseline bytes, whether it was reset)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return _status_kb("VmRSS") * 1024, True
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False


def host_peak_since(mark: tuple[int, bool]) -> tuple[int, str]:
  """(peak RSS growth in bytes since `host_mark()`, how it was measured)."""
  base, reset = mark
  peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return max(peak * 1024 - base, 0), "vmhwm_delta" if reset else "maxrss_delta"

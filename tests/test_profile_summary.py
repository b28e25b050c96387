"""The profile summary: device time per op and kind from a Perfetto trace, checked against traces
written by hand (GPU streams, nested CPU executor events) and against a real jax.profiler trace."""

from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_summary


def _write(directory, events):
  path = os.path.join(directory, "plugins", "profile", "run")
  os.makedirs(path)
  with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as f:
    json.dump({"traceEvents": events}, f)


def _meta(kind, pid, name, tid=0):
  return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _op(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_gpu_kernels_on_streams_are_summed_per_op_and_kind(tmp_path):
  events = [
      _meta("process_name", 1, "/host:CPU"), _meta("thread_name", 1, "python", 5),
      _meta("process_name", 2, "/device:GPU:0"),
      _meta("thread_name", 2, "Stream #13(Compute)", 13),
      _meta("thread_name", 2, "XLA Modules", 99),
      _op(1, 5, "PjitFunction(run)", 0, 1000),  # host: not device time
      _op(2, 99, "jit_run", 0, 1000),  # derived line: repeats the kernels' time
      # Kernels (µs): gemm 0-300 and 500-600, transpose 300-400, pallas 700-800.
      _op(2, 13, "sm90_xmma_gemm_f32f32", 0, 300),
      _op(2, 13, "loop_transpose_fusion", 300, 100),
      _op(2, 13, "sm90_xmma_gemm_f32f32", 500, 100),
      _op(2, 13, "_conv_kernel", 700, 100),
  ]
  _write(tmp_path, events)
  s = profile_summary.summarize(str(tmp_path))
  assert s["device"] == "gpu"
  assert s["span_s"] == pytest.approx(800e-6) and s["busy_s"] == pytest.approx(600e-6)
  assert s["busy_fraction"] == pytest.approx(0.75) and s["kernel_s"] == pytest.approx(600e-6)
  assert s["kinds"] == pytest.approx({"matmul / convolution": 4 / 6, "pallas convolution": 1 / 6,
                                      "layout (transpose / copy / pad / slice)": 1 / 6})
  top = s["top"][0]
  assert (top["name"], top["calls"], top["total_ms"]) == ("sm90_xmma_gemm_f32f32", 2,
                                                          pytest.approx(0.4))
  text = profile_summary.markdown(s, "c3d R=2")
  assert "**c3d R=2** gpu: busy 0.6 ms of 0.8 ms traced (75 %)" in text
  assert text.count("\n| `") == 3


def test_cpu_executor_events_count_only_innermost_ops(tmp_path):
  # XLA:CPU nests ops in control flow on its threads and marks waits and op ends: only the
  # innermost op events count, and two threads' overlapping ops are busy time once.
  events = [
      _meta("process_name", 1, "/host:CPU"),
      _meta("thread_name", 1, "tf_XLAEigen/1", 7), _meta("thread_name", 1, "tf_XLAEigen/2", 8),
      _op(1, 7, "ThunkExecutor::Execute", 0, 100),
      _op(1, 7, "while.3", 0, 100, hlo_op="while.3"),
      _op(1, 7, "dot.1", 10, 40, hlo_op="dot.1"),
      _op(1, 7, "end: dot.1", 49, 1),
      _op(1, 7, "copy.2", 60, 20, hlo_op="copy.2"),
      _op(1, 8, "reduce.4", 70, 30, hlo_op="reduce.4"),
      _op(1, 8, "SlinkyThreadPool::Await", 0, 500),
  ]
  _write(tmp_path, events)
  s = profile_summary.summarize(str(tmp_path))
  assert s["device"] == "cpu"
  assert [op["name"] for op in s["top"]] == ["dot.1", "reduce.4", "copy.2"]
  assert s["kernel_s"] == pytest.approx(90e-6) and s["busy_s"] == pytest.approx(80e-6)
  assert s["span_s"] == pytest.approx(90e-6)


def test_a_real_trace_is_read(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with profile_summary.trace(str(tmp_path)):
    for _ in range(3):
      f(x).block_until_ready()
  s = profile_summary.summarize(str(tmp_path))
  assert s["device"] == jax.default_backend()
  assert 0 < s["busy_s"] <= s["span_s"] and sum(s["kinds"].values()) == pytest.approx(1.0)
  assert all(op["calls"] % 3 == 0 for op in s["top"])  # each op once per call


def test_no_trace_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    profile_summary.summarize(str(tmp_path))

"""JAX's persistent compilation cache as the entry points set it: kept, reused, off, bad values."""

from __future__ import annotations

import os
import subprocess
import sys

from experiments import benchmark_core, cli
from tests.conftest import ROOT, run_main

# Compiles one small program after `cli.enable_compilation_cache(argv[1])` in a fresh process (JAX
# opens its cache once per process) and prints the persistent-cache hits and writes it saw.
_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from experiments import benchmark_core, cli
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
cli.enable_compilation_cache(sys.argv[1])
jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))))
print(events.count("/jax/compilation_cache/cache_hits"),
      events.count("/jax/compilation_cache/cache_misses"))
"""


def _compile_once(path: str, env: dict[str, str]) -> tuple[int, int]:
  """(hits, writes) of the persistent cache in a fresh process compiling `_PROGRAM`."""
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, path], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  hits, writes = proc.stdout.split()
  return int(hits), int(writes)


def _entries(path) -> list[str]:
  return sorted(n for n in os.listdir(path) if n.endswith("-cache")) if os.path.isdir(path) else []


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  # A tiny program compiles in milliseconds: cache it anyway.
  return {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def test_a_later_process_loads_what_the_first_compiled(tmp_path):
  cache = tmp_path / "xla"
  hits, writes = _compile_once(str(cache), _env())
  assert hits == 0 and writes >= 1
  entries = _entries(cache)
  assert len(entries) == writes
  hits, writes = _compile_once(str(cache), _env())
  assert hits >= 1 and writes == 0
  assert _entries(cache) == entries


def test_an_empty_value_turns_the_cache_off_even_when_the_environment_names_one(tmp_path):
  from_env = tmp_path / "from_env"
  hits, writes = _compile_once("", _env(JAX_COMPILATION_CACHE_DIR=str(from_env)))
  assert hits == writes == 0 and not _entries(from_env)


def test_the_default_is_the_environments_cache_else_a_per_user_one(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "tests"))
  assert cli.default_compilation_cache_dir() == str(tmp_path / "tests")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.default_compilation_cache_dir() == str(tmp_path / "xdg" / "vidleak_jax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cli.default_compilation_cache_dir() == str(tmp_path / "home" / ".cache" / "vidleak_jax"
                                                     / "xla")
  assert "compilation_cache_dir" in cli.housekeeping_flags()  # not a setting of the experiment


def test_a_file_as_the_cache_is_one_clear_error_naming_the_flag(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  workdir = tmp_path / "run"
  proc = run_main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}",
                  f"--compilation_cache_dir={not_a_dir}")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --compilation_cache_dir: cannot keep the compilation cache in {not_a_dir}: it is "
      "a file, not a directory (an empty value disables the cache)")
  assert "Traceback" not in proc.stderr and not workdir.exists()


def test_the_benchmark_reports_warm_compiles_beside_cold_ones():
  def row(compile_s, compile_warm_s):
    return {"victim": "c3d", "clip": [8, 32, 32, 3], "restarts": 1, "batching": "vmap",
            "conv": "im2col", "backend": "cpu", "compile_s": compile_s,
            "compile_warm_s": compile_warm_s, "step_s": 0.01, "steps_per_s": 100.0,
            "candidate_steps_per_s": 100.0, "candidate_step_gflop": 0.05}

  (combined,) = benchmark_core.combine_rounds([[row(4.0, 0.5)], [row(6.0, 0.7)],
                                               [row(5.0, 0.4)]])
  assert (combined["compile_s"], combined["compile_warm_s"]) == (5.0, 0.5)
  header, _, line = benchmark_core.markdown_table([combined]).splitlines()
  assert "| compile s | warm compile s |" in header and "| 5.00 | 0.50 |" in line

"""The experiment pipeline: stages pretrain → train → data → attack → sr → eval reading and writing
one run directory (see README's table of files).

  config          RunConfig / FeatureConfig and the stage list, validated in one place
  rundir          keyed streams, save / require, the references reader, the lock, progress
  clients         the attacked round's clients (batches, orders, defences, aggregated update)
                  and the attacker's model of them (replay, penalty scale, label trajectory)
  weights, train  the attacked model's weights; the train stage (FedAvg rounds)
  victim          the run's victim as (apply_fn, params); feature_victim: extractor + head
  frames          data and raw-frame attack stages; features: the feature pipeline's attack
  sr, evaluate    the sr and eval stages
  run             all selected stages in order (multi-process aware)
  reuse           run, or reuse a finished run with identical settings (sweeps, studies)
  logs            attack progress: tqdm, metrics.jsonl, TensorBoard
"""

from vidleak_jax.pipeline.config import (FEATURE_ATTACKS, MATMUL_PRECISIONS, PIPELINES, STAGES,
                                         FeatureConfig, RunConfig)
from vidleak_jax.pipeline.reuse import run_or_reuse
from vidleak_jax.pipeline.run import init_distributed, run
from vidleak_jax.pipeline.rundir import RunDirBusy
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.settings import InvalidSetting

__all__ = ["FEATURE_ATTACKS", "MATMUL_PRECISIONS", "PIPELINES", "STAGES", "FeatureConfig",
           "InvalidSetting", "RunConfig", "RunDirBusy", "build_victim", "init_distributed", "run",
           "run_or_reuse"]

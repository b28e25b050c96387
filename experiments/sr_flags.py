"""Flags of the `sr` stage (--sr, --sr_scale, ...); `run_config_kwargs()` feeds RunConfig."""

from __future__ import annotations

from typing import Any

from absl import flags

from vidleak_jax import sr

_DEFAULTS = sr.SRConfig()
FLAGS = flags.FLAGS

flags.DEFINE_enum("sr", "none", ["none", *sr.SR_METHODS.names()],
                  "Super-resolution of the reconstruction (stage sr): bicubic | lanczos3 | "
                  "espcn | edsr (generic training) | adapted (fine-tuned on the --references "
                  "frames) | restoration (fine-tuned on simulated attacks) | none.")
flags.DEFINE_integer("sr_scale", None, "Upscaling factor 1, 2 or 4 (default --attack_scale).")
flags.DEFINE_enum("sr_model", _DEFAULTS.model, sr.SR_MODELS.names(),
                  "Network of --sr=adapted / restoration.")
flags.DEFINE_integer("sr_steps", _DEFAULTS.steps, "Generic SR training steps.", lower_bound=1)
flags.DEFINE_integer("sr_finetune_steps", _DEFAULTS.finetune_steps,
                     "Fine-tuning steps of --sr=adapted / restoration.", lower_bound=1)
flags.DEFINE_string("sr_checkpoint", None, "Orbax directory of the generic SR network: restored "
                    "if it holds one, else trained and saved there (resumable).")
flags.DEFINE_integer("sr_temporal_radius", _DEFAULTS.temporal_radius, "Neighbouring frames on "
                     "each side given to the SR network as extra channels.", lower_bound=0)
flags.DEFINE_integer("sr_simulations", _DEFAULTS.simulations,
                     "Simulated attacks of --sr=restoration.", lower_bound=1)
flags.DEFINE_integer("sr_simulation_steps", _DEFAULTS.simulation_steps,
                     "Attack steps of each simulated attack.", lower_bound=1)


def run_config_kwargs() -> dict[str, Any]:
  """{"sr": SRConfig} from the flags; ValueError/KeyError naming the bad value."""
  return {"sr": sr.SRConfig(
      method=FLAGS.sr, scale=FLAGS.sr_scale, model=FLAGS.sr_model, steps=FLAGS.sr_steps,
      finetune_steps=FLAGS.sr_finetune_steps, checkpoint=FLAGS.sr_checkpoint,
      temporal_radius=FLAGS.sr_temporal_radius, simulations=FLAGS.sr_simulations,
      simulation_steps=FLAGS.sr_simulation_steps)}

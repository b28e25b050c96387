"""Flags generated from the config dataclasses: one per field, built back into the same config."""

from __future__ import annotations

import dataclasses

import pytest
from absl import app, flags

from experiments import config_flags
from vidleak_jax import attack, pipeline, settings
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.settings import setting

# Flags of experiments.main that are not settings of a run (how and where it runs).
NOT_SETTINGS = {"compilation_cache_dir", "coordinator_address", "num_processes", "process_id",
                "sweep", "sweep_shard"}


def _fresh_flags() -> flags.FlagValues:
  values = flags.FlagValues()
  config_flags.define_flags(values)
  return values


def _parse(values: flags.FlagValues, *args: str) -> flags.FlagValues:
  values(["prog", *args])
  return values


def _nested_paths(cls: type, prefix: str = "") -> set[str]:
  """Dotted paths of every nested config dataclass below `cls`."""
  paths = set()
  parent = config_flags._get(config_flags._DEFAULTS, prefix)  # pylint: disable=protected-access
  for field in dataclasses.fields(cls):
    value = getattr(parent, field.name)
    if dataclasses.is_dataclass(value):
      path = f"{prefix}.{field.name}" if prefix else field.name
      paths |= {path} | _nested_paths(type(value), path)
  return paths


def test_every_nested_config_has_a_section_and_every_field_a_flag_or_a_reason():
  assert _nested_paths(pipeline.RunConfig) | {""} == {s.path for s in config_flags.SECTIONS}
  values = _fresh_flags()
  for section in config_flags.SECTIONS:
    for field, _ in config_flags.section_fields(section):
      assert field.metadata.get("help"), f"{section.path}.{field.name} has no help"
      if field.name in section.exempt:
        assert section.exempt[field.name], f"{section.path}.{field.name}: exempt without reason"
        continue
      name = config_flags.flag_name(section, field.name)
      assert name in values, f"{section.path}.{field.name} has no flag --{name}"
      assert values[name].help.endswith(field.metadata["help"])  # enums prefix their choices


def test_every_generated_flag_sets_a_field_or_an_option():
  values = _fresh_flags()
  generated = {f.name for module, fs in values.flags_by_module_dict().items()
               if module.startswith("experiments.config") for f in fs}
  fields = {config_flags.flag_name(s, f.name) for s in config_flags.SECTIONS
            for f, _ in config_flags.section_fields(s) if f.name not in s.exempt}
  options = {o.flag for opts in config_flags.OPTIONS.values() for o in opts}
  assert generated == fields | options
  assert not fields & options


def test_the_entry_point_defines_only_generated_flags_and_the_run_placement_ones():
  from experiments import main  # pylint: disable=import-outside-toplevel,unused-import
  defined = {f.name for f in flags.FLAGS.get_flags_for_module("experiments.main")}
  assert defined == NOT_SETTINGS


def test_defaults_build_the_default_config():
  cfg = config_flags.config_from_flags(_parse(_fresh_flags()))
  default = pipeline.RunConfig(workdir="runs/default")
  assert cfg.attack == default.attack and cfg.sr == default.sr
  assert cfg.features == default.features
  assert cfg.victim_kwargs == {"features": 12, "activation": "sigmoid"}  # the option flags


def test_flags_of_every_section_reach_their_field():
  cfg = config_flags.config_from_flags(_parse(
      _fresh_flags(), "--steps=7", "--match_steps=9", "--invert_lr=0.5", "--pretrain_batch=3",
      "--sr=bicubic", "--sr_scale=2", "--feature_attack=subspace", "--head=mlp1",
      "--clip_shape=2,8,8,3", "--stages=data,attack,eval", "--tv_spatial=0.5",
      "--head_hidden=16", "--pooling=max", "--victim=frame_cnn", "--attack_scale=2"))
  assert cfg.attack.steps == 7 and cfg.attack.attack_scale == 2
  assert cfg.features.matching.steps == 9 and cfg.features.inversion.lr == 0.5
  assert cfg.features.inversion.optimizer == "lbfgs"  # stage 2's own default, not StageConfig's
  assert cfg.features.pretrain.batch_size == 3 and cfg.features.attack == "subspace"
  assert cfg.sr == dataclasses.replace(cfg.sr, method="bicubic", scale=2)
  assert cfg.clip_shape == (2, 8, 8, 3) and cfg.stages == ("data", "attack", "eval")
  assert cfg.attack.priors == {"tv_spatial": 0.5, "tv_temporal": 1e-2}
  assert cfg.features.head_kwargs == {"hidden": 16}
  assert cfg.victim_kwargs["pooling"] == "max"


def test_a_field_added_to_attack_config_becomes_a_flag_with_no_other_edit(monkeypatch):
  extended = dataclasses.make_dataclass(
      "ExtendedAttackConfig", [("new_knob", float, setting(0.5, help="A new knob."))],
      bases=(attack.AttackConfig,), frozen=True, kw_only=True)
  monkeypatch.setattr(config_flags, "_DEFAULTS", dataclasses.replace(
      config_flags._DEFAULTS, attack=extended()))  # pylint: disable=protected-access
  values = _fresh_flags()
  assert values["new_knob"].default == 0.5 and values["new_knob"].help == "A new knob."
  cfg = config_flags.config_from_flags(_parse(values, "--new_knob=0.25", "--lr=0.3"))
  assert cfg.attack.new_knob == 0.25 and cfg.attack.lr == 0.3


@pytest.mark.parametrize("args, message", [
    (("--steps=0",), "--steps must be >= 1, got 0"),
    (("--match_steps=0",), "--match_steps"),
    (("--lr=nan",), "--lr must be > 0"),
    (("--pretrain_batch=0",), "--pretrain_batch must be >= 1"),
    (("--sr=bicubic", "--sr_scale=3"), "--sr_scale: unknown scale 3"),
    (("--pooling=mean",), "--pooling applies to victim='frame_cnn'"),
    (("--extractor_layer=2",), "--extractor_layer applies to alexnet/vgg16"),
    (("--feature_attack=analytic", "--pipeline=features", "--head=gru"), "--feature_attack"),
    (("--clip_shape=4,16,16",), "--clip_shape expects 4 positive integers"),
    (("--data=bogus:",), "--data: data='bogus:' is not one of"),
])
def test_invalid_values_name_their_flag(args, message):
  with pytest.raises(app.UsageError) as error:
    config_flags.config_from_flags(_parse(_fresh_flags(), *args))
  assert message in str(error.value)


def test_library_errors_name_the_field_not_a_flag():
  with pytest.raises(settings.InvalidSetting) as error:
    attack.AttackConfig(steps=0)
  assert error.value.field == "steps" and "--" not in str(error.value)
  with pytest.raises(KeyError, match="unknown metric 'cosin'; valid: cosine, l1, l2"):
    attack.AttackConfig(metric="cosin")
  with pytest.raises(settings.InvalidSetting) as error:
    pipeline.RunConfig(workdir="w", pipeline="features", features=pipeline.FeatureConfig(
        attack="analytic", head="gru"))
  assert error.value.field == "features.attack" and "--" not in str(error.value)
  with pytest.raises(ValueError) as error:
    feature_attack.StageConfig(steps=0)
  assert "--" not in str(error.value)

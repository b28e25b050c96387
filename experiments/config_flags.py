"""Command-line flags generated from the run's config dataclasses, and the config built from them.

Every field of `RunConfig` and its nested configs that is declared with `vidleak_jax.settings.
setting(...)` becomes one flag: its name (the section's prefix + the field name, or a rename kept
for the existing presets), type, default (taken from a default `RunConfig`, so nested defaults such
as stage 2's optimizer are right), help and choices. A field added to a config becomes a flag with
no edit here. Fields that hold a dict of model options are set by the option flags below; a field
without a flag of its own is listed in its section's `exempt` with the reason.

Validation happens once, in the dataclasses; their `InvalidSetting` errors name a field, which
`flag_error` turns into the flag's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, NamedTuple, Sequence

from absl import app, flags

from vidleak_jax import models, pipeline, settings
from vidleak_jax.models import heads
from vidleak_jax.models import victims as victim_models

NESTED = "a nested config: its own section of flags"


@dataclasses.dataclass(frozen=True)
class Section:
  """How one (nested) config's fields become flags: `path` in RunConfig ("" = RunConfig itself),
  flag name = prefix + field name unless `renames` says otherwise, `exempt` fields -> why they
  have no flag of their own."""

  path: str
  prefix: str = ""
  renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
  exempt: Mapping[str, str] = dataclasses.field(default_factory=dict)


SECTIONS = (
    Section("", exempt={"attack": NESTED, "features": NESTED, "sr": NESTED, "local": NESTED,
                        "train": NESTED,
                        "victim_kwargs": "option flags --victim_features, --activation, "
                                         "--pooling, --input_size"}),
    Section("attack", exempt={"priors": "option flags --tv_spatial, --tv_temporal",
                              "layer_weights": "library only (parameter-path prefixes)"}),
    Section("features", renames={"attack": "feature_attack"},
            exempt={"extractor_kwargs": "option flags --extractor_layer, --extractor_input_size",
                    "head_kwargs": "option flags --head_hidden, --head_pooling, "
                                   "--head_activation",
                    "matching": NESTED, "inversion": NESTED, "pretrain": NESTED}),
    Section("features.matching", prefix="match_",
            exempt={"tv_spatial": "stage 1 has no image priors",
                    "tv_temporal": "stage 1 has no image priors"}),
    Section("features.inversion", prefix="invert_",
            exempt={"metric": "stage 2 matches features in squared error",
                    **dict.fromkeys(("restarts", "restart_noise", "batching", "map_batch_size"),
                                    "stage 2 starts once, from stage 1's result")}),
    Section("features.pretrain", prefix="pretrain_", renames={"batch_size": "pretrain_batch"}),
    Section("sr", prefix="sr_", renames={"method": "sr"}),
    Section("local", prefix="local_"),
    Section("train", prefix="fl_"),
)


class Option(NamedTuple):
  """A flag that sets one key of a dict-of-options field (`None` = key left out)."""

  flag: str
  key: str
  kind: str  # "integer" | "float" | "enum" | "pair"
  default: Any
  help: str
  choices: Sequence[str] = ()


OPTIONS: dict[str, tuple[Option, ...]] = {
    "victim_kwargs": (
        Option("victim_features", "features", "integer", 12, "Channels of the victim's conv "
               "layers."),
        Option("activation", "activation", "enum", "sigmoid", "Victim activation.",
               models.ACTIVATIONS.names()),
        Option("pooling", "pooling", "enum", None, "frame_cnn temporal pooling.",
               victim_models.POOLINGS),
        Option("input_size", "input_size", "pair", None, "Victim input H,W (frames are resized "
               "in the model).")),
    "attack.priors": (
        Option("tv_spatial", "tv_spatial", "float", 1e-2, "Weight of the spatial "
               "total-variation prior."),
        Option("tv_temporal", "tv_temporal", "float", 1e-2, "Weight of the temporal "
               "total-variation prior.")),
    "features.extractor_kwargs": (
        Option("extractor_layer", "layer", "integer", None, "alexnet/vgg16: LPIPS ReLU tap 1..5 "
               "(default 5)."),
        Option("extractor_input_size", "input_size", "pair", None, "Extractor input H,W (frames "
               "resized inside).")),
    "features.head_kwargs": (
        Option("head_hidden", "hidden", "integer", None, "Hidden width of the head (default "
               "64)."),
        Option("head_pooling", "pooling", "enum", None, "linear/mlp heads: time-mean of the "
               "features or all of them flattened.", heads.POOLINGS),
        Option("head_activation", "activation", "enum", None, "Activation of the "
               "linear/mlp/conv1d/transformer head.", ("relu", "sigmoid", "tanh", "gelu"))),
}
_DEFAULTS = pipeline.RunConfig(workdir="runs/default")


def _get(obj: Any, path: str) -> Any:
  for name in filter(None, path.split(".")):
    obj = getattr(obj, name)
  return obj


def flag_name(section: Section, field: str) -> str:
  return section.renames.get(field, section.prefix + field)


def _base_type(hint: Any) -> tuple[Any, bool]:
  """(type without None, whether None is allowed) of a field's type hint."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0], len(args) < len(typing.get_args(hint))
  return hint, False


def section_fields(section: Section) -> list[tuple[dataclasses.Field, Any]]:
  """(field, type hint) of the section's config class, in declaration order."""
  cls = type(_get(_DEFAULTS, section.path))
  hints = typing.get_type_hints(cls)
  return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _define_field(section: Section, field: dataclasses.Field, hint: Any,
                  flag_values: flags.FlagValues) -> None:
  name, default = flag_name(section, field.name), getattr(_get(_DEFAULTS, section.path), field.name)
  base, _ = _base_type(hint)
  help_text = field.metadata.get("help") or field.name
  module = f"experiments.config{'.' + section.path if section.path else ''}"
  common = dict(flag_values=flag_values, module_name=module)
  choices = settings.choices_of(field)
  if base is bool:
    flags.DEFINE_bool(name, default, help_text, **common)
  elif base is int:
    flags.DEFINE_integer(name, default, help_text, **common)
  elif base is float:
    flags.DEFINE_float(name, default, help_text, **common)
  elif base is str and choices is not None:
    flags.DEFINE_enum(name, default, list(choices), help_text, **common)
  elif base is str:
    flags.DEFINE_string(name, default, help_text, **common)
  elif typing.get_origin(base) in (tuple, Sequence, list, typing.get_origin(Sequence[str])):
    flags.DEFINE_list(name, [str(v) for v in default], help_text, **common)
  else:
    raise TypeError(f"{section.path or 'RunConfig'}.{field.name}: no flag type for {hint}; "
                    f"exempt it in config_flags.SECTIONS")


def _define_option(option: Option, module: str, flag_values: flags.FlagValues) -> None:
  common = dict(flag_values=flag_values, module_name=module)
  if option.kind == "integer":
    flags.DEFINE_integer(option.flag, option.default, option.help, **common)
  elif option.kind == "float":
    flags.DEFINE_float(option.flag, option.default, option.help, **common)
  elif option.kind == "enum":
    flags.DEFINE_enum(option.flag, option.default, list(option.choices), option.help, **common)
  else:
    flags.DEFINE_list(option.flag, option.default, option.help, **common)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per config field (and option) in `flag_values`."""
  for section in SECTIONS:
    for field, hint in section_fields(section):
      if field.name not in section.exempt:
        _define_field(section, field, hint, flag_values)
  for path, options in OPTIONS.items():
    for option in options:
      _define_option(option, f"experiments.config.{path}", flag_values)


def flag_for(path: str) -> str | None:
  """The flag that sets the config field (or option key) at dotted `path`, if any."""
  parent, _, name = path.rpartition(".")
  for section in SECTIONS:
    if section.path == parent and name not in section.exempt:
      return flag_name(section, name)
  for option_path, options in OPTIONS.items():
    for option in options:
      if path == f"{option_path}.{option.key}":
        return option.flag
  return None


def flag_error(error: settings.InvalidSetting) -> app.UsageError:
  """A UsageError that names the flag of the field `error` is about: a message that starts with
  the field's path or name gets the flag in its place, any other is prefixed with it."""
  name, message = flag_for(error.field), str(error)
  if name is None:
    return app.UsageError(message)
  parts = error.field.split(".")
  for field in (".".join(parts[i:]) for i in range(len(parts))):  # longest path first
    if message.startswith((f"{field} ", f"{field}:")):
      return app.UsageError(f"--{name}{message[len(field):]}")
  return app.UsageError(f"--{name}: {message}")


def _ints(flag: str, values: Sequence[str], count: int) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    out = ()
  if len(out) != count or min(out) < 1:
    raise app.UsageError(f"--{flag} expects {count} positive integers separated by commas, "
                         f"got {','.join(values)!r}")
  return out


def _value(flag: str, hint: Any, raw: Any) -> Any:
  base, _ = _base_type(hint)
  if raw is None or base in (bool, int, float, str):
    return raw
  if typing.get_origin(base) is tuple:  # a fixed-length tuple of ints (clip_shape)
    return _ints(flag, raw, len(typing.get_args(base)))
  return tuple(raw)


def _options(path: str, flag_values: flags.FlagValues) -> dict[str, Any]:
  out = {}
  for option in OPTIONS[path]:
    raw = flag_values[option.flag].value
    if raw is not None:
      out[option.key] = _ints(option.flag, raw, 2) if option.kind == "pair" else raw
  return out


def _build(section_path: str, flag_values: flags.FlagValues) -> Any:
  """The config at `section_path` from its flags, its nested configs built the same way."""
  section = next(s for s in SECTIONS if s.path == section_path)
  cls = type(_get(_DEFAULTS, section_path))
  kwargs = {}
  for field, hint in section_fields(section):
    if section.exempt.get(field.name) == NESTED:
      kwargs[field.name] = _build(f"{section_path}.{field.name}".lstrip("."), flag_values)
    elif field.name not in section.exempt:
      name = flag_name(section, field.name)
      kwargs[field.name] = _value(name, hint, flag_values[name].value)
  for path in OPTIONS:
    parent, _, name = path.rpartition(".")
    if parent == section_path:
      kwargs[name] = _options(path, flag_values)
  try:
    return cls(**kwargs)
  except settings.InvalidSetting as e:
    raise flag_error(e.within(section_path)) from None
  except (ValueError, KeyError) as e:  # a check that names no field: name the section
    raise app.UsageError(f"{section.prefix or section_path or 'settings'}: "
                         f"{str(e).strip(chr(39))}") from None


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> pipeline.RunConfig:
  """The RunConfig the flags describe; a bad value raises app.UsageError naming its flag."""
  return _build("", flag_values)

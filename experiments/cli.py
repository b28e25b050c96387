"""What the entry points share about absl flags: those that say nothing about an experiment."""

from __future__ import annotations

from absl import flags

# Flags of these modules describe the experiment; every other module's (absl, chex, orbax, ...)
# are housekeeping.
EXPERIMENT_MODULES = ("experiments.", "__main__")


def housekeeping_flags(flag_values: flags.FlagValues = flags.FLAGS) -> frozenset[str]:
  """Names (and short names) of the flags registered by library modules, not by experiments."""
  names = set()
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if not module.startswith(EXPERIMENT_MODULES):
      names.update(n for f in module_flags for n in (f.name, f.short_name) if n)
  return frozenset(names)

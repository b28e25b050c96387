"""Config fields that document themselves, and the error that names the field a value is wrong for.

Every config dataclass declares its fields with `setting(default, help=..., choices=...)`; the
entry point turns these into command-line flags (name, type, default, help, choices) without
restating them. Validation stays in the dataclass's `__post_init__` and raises `InvalidSetting`
naming the field; the entry point translates the field to its flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Iterable

_MISSING: Any = dataclasses.MISSING


class InvalidSetting(ValueError):
  """A setting's value is invalid. `field`: its dotted path in the config that was being built
  (e.g. "steps", "attack.init"); the message names it too."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field

  def __str__(self) -> str:
    return str(self.args[0])

  def within(self, section: str) -> InvalidSetting:
    """The same error with `field` prefixed by the section path of a nested config."""
    return type(self)(f"{section}.{self.field}" if section else self.field, str(self))


class InvalidChoice(InvalidSetting, KeyError):
  """A setting names an unknown choice (a KeyError too, like every registry lookup)."""


def setting(default: Any = _MISSING, *, help: str,  # pylint: disable=redefined-builtin
            choices: Collection[str] | Callable[[], Iterable[str]] | None = None,
            default_factory: Callable[[], Any] | None = None) -> Any:
  """A dataclass field with a one-line `help` and, for names, its valid `choices` (a collection
  or a callable returning one, e.g. a registry's `names`)."""
  metadata = {"help": help, "choices": choices}
  if default_factory is not None:
    return dataclasses.field(default_factory=default_factory, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def choices_of(field: dataclasses.Field) -> tuple[str, ...] | None:
  """The valid choices of a field declared with `setting(..., choices=...)`, else None."""
  choices = field.metadata.get("choices")
  if choices is None:
    return None
  return tuple(choices() if callable(choices) else choices)


def check_choice(field: str, value: Any, valid: Iterable[Any]) -> None:
  """InvalidChoice naming `field` and the valid values unless `value` is one of them."""
  valid = tuple(valid)
  if value not in valid:
    raise InvalidChoice(field, f"unknown {field} {value!r}; valid: {', '.join(map(str, valid))}")


def check(condition: bool, field: str, message: str) -> None:
  """InvalidSetting(field, f"{field} {message}") unless `condition`."""
  if not condition:
    raise InvalidSetting(field, f"{field} {message}")


def validate_fields(config: Any) -> None:
  """Checks every field declared with `choices` holds one of them (None allowed when the default
  is None)."""
  for field in dataclasses.fields(config):
    valid = choices_of(field)
    value = getattr(config, field.name)
    if valid is not None and not (value is None and field.default is None):
      check_choice(field.name, value, valid)

"""Argument checks shared by the data modules."""

from __future__ import annotations

import operator
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int; raises ValueError naming `name` unless it is an integer >= minimum."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  try:
    ivalue = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
  if ivalue < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return ivalue

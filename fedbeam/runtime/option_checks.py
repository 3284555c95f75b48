"""The range rules of training's integer and number settings, written once.

`fedbeam train`'s flag parser (`parse_int`, `parse_number` as argparse
types), `fedbeam.runtime.train.TrainOptions` and
`fedbeam.runtime.simulation.SimulationConfig` (`check_int`, `check_number`)
all apply these rules, so a value is refused with the same words wherever it
comes from. Imports nothing heavy: the CLI's parser uses it.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

__all__ = ["check_int", "check_number", "parse_int", "parse_number"]


def _int_words(minimum: int) -> str:
  if minimum == 1:
    return "a positive integer"
  if minimum == 0:
    return "a nonnegative integer"
  return f"an integer of at least {minimum}"


def _number_words(positive: bool) -> str:
  return "a positive number" if positive else "a nonnegative number"


def _number_fault(value: float, positive: bool) -> Optional[str]:
  if not math.isfinite(value):
    return "a finite number"
  if value < 0 or (positive and value == 0):
    return _number_words(positive)
  return None


def check_int(name: str, value: object, minimum: int) -> int:
  """Returns `value` if it is an int (not a bool) of at least `minimum`.

  Args:
    name: What the value is called in the message (a field or a flag).
    value: The value to check.
    minimum: The smallest allowed value.

  Raises:
    ValueError: `"{name}: expected a positive integer, got {value!r}"` (or
      nonnegative, or at least `minimum`).
  """
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}: expected {_int_words(minimum)}, got {value!r}")
  return value


def check_number(name: str, value: object, *, positive: bool) -> float:
  """Returns `value` as a float if it is a finite real number in range.

  Args:
    name: What the value is called in the message.
    value: An int or float (not a bool).
    positive: True: must be > 0; False: must be >= 0.

  Raises:
    ValueError: naming `name`, the rule and the value.
  """
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name}: expected {_number_words(positive)}, got {value!r}")
  fault = _number_fault(float(value), positive)
  if fault:
    raise ValueError(f"{name}: expected {fault}, got {value!r}")
  return float(value)


def parse_int(text: str, minimum: int) -> int:
  """Parses a flag value as an int of at least `minimum` (an argparse type).

  Raises:
    argparse.ArgumentTypeError: `"expected a positive integer, got '0'"`.
  """
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise argparse.ArgumentTypeError(f"expected {_int_words(minimum)}, got {text!r}")
  return value


def parse_number(text: str, *, positive: bool) -> float:
  """Parses a flag value as a finite float in range (an argparse type).

  Raises:
    argparse.ArgumentTypeError: `"expected a finite number, got 'nan'"` and
      the like.
  """
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  fault = _number_fault(value, positive)
  if fault:
    raise argparse.ArgumentTypeError(f"expected {fault}, got {text!r}")
  return value

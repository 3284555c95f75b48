"""option_checks: one set of range rules for training's flags, options and config."""

import argparse
import math

import pytest

from fedbeam.runtime.option_checks import check_int, check_number, parse_int, parse_number


def test_check_int_returns_ints_in_range():
  assert check_int("--rounds", 3, 1) == 3
  assert check_int("seed", 0, 0) == 0


@pytest.mark.parametrize(
  "value,minimum,words",
  [
    (0, 1, "a positive integer"),
    (-1, 0, "a nonnegative integer"),
    (True, 0, "a nonnegative integer"),
    (1.5, 1, "a positive integer"),
    ("3", 1, "a positive integer"),
    (1, 2, "an integer of at least 2"),
  ],
)
def test_check_int_refuses_other_values_naming_the_setting(value, minimum, words):
  with pytest.raises(ValueError) as info:
    check_int("--rounds", value, minimum)
  assert str(info.value) == f"--rounds: expected {words}, got {value!r}"


def test_check_number_accepts_ints_and_floats_in_range():
  assert check_number("--client-lr", 1, positive=True) == 1.0
  assert check_number("--delta-l2", 0.0, positive=False) == 0.0


@pytest.mark.parametrize(
  "value,positive,words",
  [
    (0.0, True, "a positive number"),
    (-0.5, False, "a nonnegative number"),
    (math.nan, False, "a finite number"),
    (math.inf, True, "a finite number"),
    (True, True, "a positive number"),
    ("0.1", True, "a positive number"),
  ],
)
def test_check_number_refuses_other_values_naming_the_setting(value, positive, words):
  with pytest.raises(ValueError, match=f"^--x: expected {words}, got "):
    check_number("--x", value, positive=positive)


def test_parse_int_reads_flag_text_with_the_same_rules():
  assert parse_int("7", 1) == 7
  with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer, got '0'"):
    parse_int("0", 1)
  with pytest.raises(argparse.ArgumentTypeError, match="expected a nonnegative integer, got 'x'"):
    parse_int("x", 0)


def test_parse_number_reads_flag_text_with_the_same_rules():
  assert parse_number("0.25", positive=True) == 0.25
  with pytest.raises(argparse.ArgumentTypeError, match="expected a number, got 'x'"):
    parse_number("x", positive=True)
  with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number, got 'nan'"):
    parse_number("nan", positive=False)
  with pytest.raises(argparse.ArgumentTypeError, match="expected a positive number, got '-1'"):
    parse_number("-1", positive=True)

"""The command-line parser: no abbreviated flags, help on every argument."""

import argparse

import pytest

from fedbeam import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return dict(action.choices)
  return {}


def test_no_parser_accepts_abbreviated_flags():
  parser = cli.build_parser()
  parsers = {"fedbeam": parser, **_subparsers(parser)}
  assert {"prepare", "inspect", "validate", "train"} <= set(parsers)
  assert {name: p.allow_abbrev for name, p in parsers.items()} == {name: False for name in parsers}


def test_abbreviated_prepare_flag_is_refused_not_taken_for_the_full_one(tmp_path, capsys):
  code = cli.main(
    [
      "prepare",
      "--input",
      str(tmp_path / "in.tfrecord"),
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "id",
      "--output",
      str(tmp_path / "out"),
      "--num-test-client",
      "10",
    ]
  )
  err = capsys.readouterr().err
  assert code == 2
  assert "--num-test-client" in err
  assert not (tmp_path / "out").exists()


def test_abbreviated_train_flag_is_a_usage_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(
      [
        "train",
        str(tmp_path),
        "--model",
        "digits-cnn",
        "--rounds",
        "3",
        "--clients-per-round",
        "2",
        "--output",
        str(tmp_path / "run"),
        "--round",
        "3",
      ]
    )
  assert exit_info.value.code == 2
  assert "unrecognized arguments: --round 3" in capsys.readouterr().err


def test_every_argument_has_help():
  parser = cli.build_parser()
  missing = [
    f"{name} {action.dest}"
    for name, p in {"fedbeam": parser, **_subparsers(parser)}.items()
    for action in p._actions  # pylint: disable=protected-access
    if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))  # pylint: disable=protected-access
    and not action.help
  ]
  assert missing == []

"""The `fedbeam` command's logging: Beam quiet, fedbeam's error first, nothing left behind."""

import logging
import os
import re

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.command_logging import CommandLogging

BEAM = logging.getLogger("apache_beam.runners.test_only")


def _beam_failure():
  try:
    raise RuntimeError("bundle failed")
  except RuntimeError:
    BEAM.exception("Error processing instruction")


def test_logging_is_restored_after_the_command():
  root = logging.getLogger()
  level, handlers, filters = root.level, list(root.handlers), list(root.filters)
  with CommandLogging(verbose=True, keep_file=True):
    assert root.level == logging.INFO
  assert (root.level, root.handlers, root.filters) == (level, handlers, filters)


def test_beam_info_is_hidden_unless_verbose(capsys):
  with CommandLogging(verbose=False):
    BEAM.info("beam chatter")
    BEAM.warning("beam warning")
  err = capsys.readouterr().err
  assert "beam chatter" not in err and "beam warning" in err
  with CommandLogging(verbose=True):
    BEAM.info("beam chatter")
  assert "beam chatter" in capsys.readouterr().err


def test_beam_tracebacks_are_held_back_and_kept_in_the_log_file(capsys):
  with CommandLogging(verbose=False, keep_file=True) as log:
    _beam_failure()
    assert capsys.readouterr().err == ""
    assert len(log.deferred) == 1
  with open(log.path, encoding="utf-8") as f:
    text = f.read()
  assert "Error processing instruction" in text and "RuntimeError: bundle failed" in text
  os.remove(log.path)


def test_log_file_is_removed_when_nothing_failed():
  with CommandLogging(verbose=False, keep_file=True) as log:
    BEAM.warning("a warning, no failure")
  assert not os.path.exists(log.path)


def _failing_prepare(tmp_path, *flags):
  path = testing.write_tfrecord_input(
    tmp_path / "in.tfrecord", {"a": [{"x": 1.0}]}, client_id_key="user"
  )
  return main(
    [
      *flags,
      "prepare",
      "--input",
      path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(tmp_path / "out"),
    ]
  )


def test_failed_job_prints_fedbeams_error_first_and_names_the_log_file(tmp_path, capsys):
  assert _failing_prepare(tmp_path) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0].startswith("fedbeam prepare: error: ") and "client_id" in lines[0]
  assert lines[1] == "fedbeam prepare: no store was committed"
  match = re.fullmatch(
    r"fedbeam prepare: Beam's log of the failure, with its traceback, is in "
    r"(\S+) \(rerun with fedbeam --verbose to see it here\)",
    lines[2],
  )
  assert match and len(lines) == 3, lines
  with open(match.group(1), encoding="utf-8") as f:
    assert "Traceback" in f.read()
  os.remove(match.group(1))


def test_failed_job_with_verbose_shows_the_traceback_after_the_error(tmp_path, capsys):
  assert _failing_prepare(tmp_path, "--verbose") == 1
  err = capsys.readouterr().err
  error = err.index("fedbeam prepare: error: ")
  assert err.index("Traceback", error) > error
  assert "Traceback" not in err[:error]

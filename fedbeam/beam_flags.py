"""The flags Beam's pipeline options accept, and the check of pass-through arguments against them.

Beam builds one argparse parser from the `_add_argparse_args` of every loaded
`PipelineOptions` subclass (`PipelineOptions.get_all_options`) and silently
discards what that parser does not know. `beam_flags` returns that parser's own
option strings (`--experiment`, `--no_use_public_ips`, `--job-server-timeout`,
...), not the option *destinations* they set (`experiments`, `use_public_ips`,
...), after importing the module of the runner named by `--runner`: runner
modules may define options of their own (Beam's `dask_runner` defines
`DaskOptions`). `check_beam_args` walks a pass-through argument list the way
argparse would and names the first argument Beam would not use.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import re
from typing import Optional, Sequence

__all__ = ["BeamFlagError", "beam_flags", "check_beam_args", "load_runner_class", "runner_argument"]

# argparse reads a token that starts with '-' as a flag unless it looks like a
# negative number (Beam's parser defines no flag that does) or holds a space.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class BeamFlagError(ValueError):
  """`--runner` names a runner that cannot be loaded."""


def runner_argument(args: Sequence[str]) -> Optional[str]:
  """The value of the last `--runner=R` or `--runner R` in `args` (argparse keeps the last), or None."""
  runner = None
  for i, arg in enumerate(args):
    if arg.startswith("--runner="):
      runner = arg.split("=", 1)[1]
    elif arg == "--runner" and i + 1 < len(args):
      runner = args[i + 1]
  return runner


def load_runner_class(runner: str) -> type:
  """Imports the runner class `--runner` names, as Beam will when it builds the pipeline.

  `runner` is one of Beam's runner names (`DataflowRunner`, `dataflow`, ...,
  resolved as Beam's `create_runner` does), a `module.Class` path, or a
  `module:Class` path.

  Raises:
    BeamFlagError: the name is neither, the module cannot be imported, or it
      holds no such PipelineRunner class; the message names the runner.
  """
  from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.runner import PipelineRunner  # pylint: disable=g-import-not-at-top

  known = {path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}
  path = known.get(runner.lower(), known.get(runner.lower() + "runner", runner))
  if ":" in path:
    module_name, _, class_name = path.partition(":")
  elif "." in path:
    module_name, class_name = path.rsplit(".", 1)
  else:
    raise BeamFlagError(
      f"--runner {runner}: not a Beam runner name ({', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}) "
      "nor a module.Class path"
    )
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except
    # Any import failure (a missing dependency, an error in the module) stops
    # the job before it starts; say which module and why.
    hint = (
      "; the Dataflow runner needs fedbeam's gcp extra (docs/dataflow.md)"
      if "dataflow" in module_name
      else ""
    )
    raise BeamFlagError(
      f"--runner {runner}: cannot import module {module_name} ({type(e).__name__}: {e}){hint}"
    ) from None
  cls = getattr(module, class_name, None)
  if not (isinstance(cls, type) and issubclass(cls, PipelineRunner)):
    raise BeamFlagError(
      f"--runner {runner}: module {module_name} has no PipelineRunner class {class_name}"
    )
  return cls


def beam_flags(runner: Optional[str] = None) -> dict[str, argparse.Action]:
  """Every `--flag` spelling Beam's option parser accepts, mapped to its argparse action.

  With `runner`, its module is imported first (`load_runner_class`), so the
  options it defines are included. The table is Beam's own parser, captured
  through `get_all_options(add_extra_args_fn=...)`; `--help` is left out.

  Raises:
    BeamFlagError: `runner` cannot be loaded.
  """
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  if runner is not None:
    load_runner_class(runner)
  parsers: list[argparse.ArgumentParser] = []
  PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
  (parser,) = parsers
  # argparse keeps no public map from option strings to actions.
  return {
    name: action
    for name, action in parser._option_string_actions.items()  # pylint: disable=protected-access
    if name.startswith("--") and not isinstance(action, argparse._HelpAction)
  }  # pylint: disable=protected-access


def _value_counts(action: argparse.Action) -> tuple[int, float]:
  """(fewest, most) values the flag takes after it, from argparse's `nargs`."""
  nargs = action.nargs
  if nargs is None:
    return 1, 1
  if nargs == argparse.OPTIONAL:
    return 0, 1
  if nargs == argparse.ZERO_OR_MORE:
    return 0, math.inf
  if nargs == argparse.ONE_OR_MORE:
    return 1, math.inf
  return int(nargs), int(nargs)


def _looks_like_flag(arg: str) -> bool:
  return arg.startswith("-") and len(arg) > 1 and " " not in arg and not _NEGATIVE_NUMBER.match(arg)


def _hint(name: str, flags: Sequence[str]) -> Optional[str]:
  """The flag `name` was most likely meant to be: same words with '_' for '-', else the closest."""
  words = name[2:].replace("-", "_")
  for flag in flags:
    if flag[2:].replace("-", "_") == words:
      return flag
  close = difflib.get_close_matches(name, flags, n=1)
  return close[0] if close else None


def check_beam_args(args: Sequence[str]) -> Optional[str]:
  """Returns an error message for the first pass-through argument Beam would not use, else None.

  Beam silently discards flags its parser does not know (including dashed
  spellings of its underscored flags) and stray words; both are refused here so
  a typo never changes a job quietly. Flags are read as argparse reads them:
  `--flag=value` or `--flag value` for a flag that takes a value, `--flag`
  alone for one that takes none (store_true/store_false), and any flag may be
  repeated (`--experiment a --experiment b`). An unloadable `--runner` is an
  error too (see `load_runner_class`).
  """
  try:
    flags = beam_flags(runner_argument(args))
  except BeamFlagError as e:
    return str(e)
  i = 0
  previous: Optional[str] = None  # the flag before a stray word, for the message
  while i < len(args):
    arg = args[i]
    if arg == "--" or not (arg.startswith("--") and _looks_like_flag(arg)):
      after = f" (after {previous}, which takes no value)" if previous else ""
      return f"unexpected argument {arg!r}{after}"
    name, has_value, _ = arg.partition("=")
    action = flags.get(name)
    if action is None:
      hint = _hint(name, sorted(flags))
      return (
        f"unknown flag {name} (neither a fedbeam prepare flag nor a Beam pipeline option"
        + (f"; did you mean {hint}?" if hint else "")
        + ")"
      )
    fewest, most = _value_counts(action)
    i += 1
    if has_value:
      if most < 1:
        return f"{name} takes no value (got {arg!r})"
      if fewest > 1:
        return f"{name} takes {fewest} values (got {arg!r})"
      previous = None
      continue
    taken = 0
    while taken < most and i < len(args) and not _looks_like_flag(args[i]):
      i += 1
      taken += 1
    if taken < fewest:
      return f"{name} needs a value ({name}=VALUE or {name} VALUE)"
    previous = name if most == 0 else None
  return None

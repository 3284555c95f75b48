"""What the loop raises when a client's data cannot be read, and how it names the client.

TensorFlow's errors name a file path (or not even that); `ClientReadError`
names the client and the round, and carries the original error.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from typing import Optional

import tensorflow as tf

__all__ = ["READ_ERRORS", "ClientReadError", "error_cause", "reading_client"]

# What reading a client's file raises: TensorFlow's errors from graph-mode
# readers (a missing file, a CRC failure, a directory in its place, a record
# that does not parse) and, from eager readers, `ClientFileError` (an OSError).
READ_ERRORS = (
  tf.errors.NotFoundError,
  tf.errors.DataLossError,
  tf.errors.FailedPreconditionError,
  tf.errors.PermissionDeniedError,
  tf.errors.InvalidArgumentError,
  OSError,
)


def error_cause(error: BaseException) -> str:
  """One line of what went wrong, without TensorFlow's graph trace and node names."""
  if isinstance(error, tf.errors.OpError):
    # "Graph execution error:\n\nDetected at node ...\n\n<cause>\n\t [[{{node X}}]] [Op:Y]"
    text = error.message.rsplit("\n\n", 1)[-1].split("\n\t [[")[0]
    text = f"{type(error).__name__}: {text.split(' [Op:')[0]}"
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())


class ClientReadError(RuntimeError):
  """A sampled client's data could not be read (or trained on) in a round.

  Raised by `SimulationLoop` at the round boundary instead of TensorFlow's
  raw error, which names a file path (or not even that) but not the client.

  Attributes:
    client_id: The client, or None when evaluation failed and no single
      test client could be found at fault.
    round_num: The round, or None while the loop was being built.
    cause: The original exception.
    evaluating: True for a test client (read for evaluation), False for a
      training client.
  """

  def __init__(
    self,
    client_id: Optional[str],
    round_num: Optional[int],
    cause: BaseException,
    evaluating: bool = False,
  ):
    self.client_id = client_id
    self.round_num = round_num
    self.cause = cause
    self.evaluating = evaluating
    when = "building the loop" if round_num is None else f"round {round_num}"
    if client_id is None:
      what = "evaluation on the test data failed"
    elif evaluating:
      what = f"test client {client_id!r} could not be read"
    else:
      what = f"client {client_id!r} could not be read or trained on"
    super().__init__(f"{when}: {what}: {error_cause(cause)}")


@contextlib.contextmanager
def reading_client(client_id: str, round_num: Optional[int]) -> Iterator[None]:
  """Turns a read error inside the block into a `ClientReadError` naming the client."""
  try:
    yield
  except READ_ERRORS as error:
    raise ClientReadError(client_id, round_num, error) from error

"""Stable integers from SHA-256 of a key: every seeded choice fedbeam makes.

Python's `hash()` of a str is salted per process, and worker order and time
differ between runs; a choice seeded from `seeded_int` of (seed, ids) is the
same in every process, on every runner and after a resume. Imports neither
TensorFlow nor Beam.

Two key forms exist because the digests must not change once stores, splits
and training runs depend on them:

- `"nul"`: the parts' `str()` joined by NUL bytes (pseudo-client transforms,
  the hash split);
- `"json"`: a JSON list of the parts' `str()` (the simulation loop's client
  sampling, shuffles and initial weights).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

__all__ = ["KeyForm", "seeded_int"]

KeyForm = Literal["nul", "json"]


def seeded_int(*parts: object, bits: int = 64, key_form: KeyForm = "nul") -> int:
  """A nonnegative integer of `bits` bits from SHA-256 of the parts.

  Args:
    *parts: What the number depends on (seed, ids, indices, a salt); each is
      taken as `str(part)`.
    bits: Width of the result, 1 to 64: the top `bits` bits of the digest's
      first 8 bytes read big-endian.
    key_form: How the parts become the hashed key (module docstring).

  Returns:
    An int in `[0, 2**bits)`.

  Raises:
    ValueError: If `bits` is outside 1..64 or `key_form` is unknown.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
    raise ValueError(f"bits must be an int from 1 to 64, got {bits!r}")
  texts = [str(part) for part in parts]
  if key_form == "nul":
    key = "\x00".join(texts)
  elif key_form == "json":
    key = json.dumps(texts)
  else:
    raise ValueError(f"key_form must be 'nul' or 'json', got {key_form!r}")
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") >> (64 - bits)

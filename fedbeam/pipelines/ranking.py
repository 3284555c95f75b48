"""A Top-N-smallest combiner whose N is only known at run time.

`beam.combiners.Top` needs N when the pipeline is built; the remainder of an
expansion and the number of test clients of a `--test-fraction` split depend
on counts computed by the same pipeline. Each element carries N, as
`(n, item)`, so the combiner needs no side input and stays liftable.
"""

from __future__ import annotations

from typing import Any, Iterable

import apache_beam as beam

__all__ = [
  "SmallestN",
]


class SmallestN(beam.CombineFn):
  """(n, item) -> the n smallest items, sorted ([] when there is no input).

  Inputs are appended and the buffer is cut back to the n smallest once it
  holds 2n items, so adding m items costs O(m log n) (inserting each one in
  sorted order would cost O(m * n)).
  """

  def create_accumulator(self) -> tuple[int, list[Any]]:
    return (0, [])

  def add_input(
    self, acc: tuple[int, list[Any]], element: tuple[int, Any]
  ) -> tuple[int, list[Any]]:
    n, item = element
    acc_n, items = acc
    n = max(n, acc_n)
    items.append(item)
    if len(items) >= 2 * n + 16:
      items.sort()
      del items[n:]
    return (n, items)

  def merge_accumulators(self, accs: Iterable[tuple[int, list[Any]]]) -> tuple[int, list[Any]]:
    n, items = 0, []
    for a_n, a_items in accs:
      n = max(n, a_n)
      items.extend(a_items)
    items.sort()
    del items[n:]
    return (n, items)

  def compact(self, acc: tuple[int, list[Any]]) -> tuple[int, list[Any]]:
    n, items = acc
    items.sort()
    del items[n:]
    return (n, items)

  def extract_output(self, acc: tuple[int, list[Any]]) -> list[Any]:
    n, items = acc
    return sorted(items)[:n]

"""A Top-N-smallest combiner whose N is only known at run time.

`beam.combiners.Top` needs N when the pipeline is built; the remainder of an
expansion and the number of test clients of a `--test-fraction` split depend
on counts computed by the same pipeline. Each element carries N, as
`(n, item)`, so the combiner needs no side input and stays liftable.
"""

from __future__ import annotations

import bisect

import apache_beam as beam


class SmallestN(beam.CombineFn):
  """(n, item) -> the n smallest items, sorted ([] when there is no input)."""

  def create_accumulator(self):
    return (0, [])

  def add_input(self, acc, element):
    n, item = element
    _, items = acc
    bisect.insort(items, item)
    if len(items) > n:
      items.pop()
    return (n, items)

  def merge_accumulators(self, accs):
    n, items = 0, []
    for a_n, a_items in accs:
      n = max(n, a_n)
      items.extend(a_items)
    return (n, sorted(items)[:n])

  def extract_output(self, acc):
    return acc[1]

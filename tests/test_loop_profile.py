"""bench/loop_profile.py: the input/compute split of a simulation round."""

import os
import sys

import numpy as np
import tensorflow as tf
import test_simulation as helpers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import loop_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_measure_input_and_compute_leaves_the_loop_unchanged():
  loop = helpers.make_loop()
  before = loop.state
  split = loop_profile.measure_input_and_compute(loop)
  assert set(split) == {"input_seconds", "compute_seconds", "produce_seconds", "num_clients"}
  assert split["num_clients"] == 3.0
  assert split["compute_seconds"] > 0 and split["produce_seconds"] > 0
  assert split["input_seconds"] >= 0
  assert loop.state.round_num == before.round_num
  tf.nest.map_structure(
    np.testing.assert_array_equal, loop.state.model_weights, before.model_weights
  )
  # The measured round then runs exactly as in a loop that was not measured.
  unmeasured = helpers.make_loop()
  loop.run_round()
  unmeasured.run_round()
  tf.nest.map_structure(
    np.testing.assert_array_equal, loop.state.model_weights, unmeasured.state.model_weights
  )

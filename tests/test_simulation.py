"""SimulationLoop: same weights as TFF's runtime, determinism, devices, edge cases."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime import client_data, client_work, models, simulation

NUM_CLASSES = 4
INPUT_SPEC = collections.OrderedDict(
  x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None], tf.int32)
)


def tiny_model_fn():
  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input([3]),
      tf.keras.layers.Dense(5, activation="relu"),
      tf.keras.layers.Dense(NUM_CLASSES),
    ]
  )
  return tff.learning.models.from_keras_model(
    keras_model,
    input_spec=INPUT_SPEC,
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
  )


def tiny_client_data(num_clients=6, seed=0, first_size=4):
  """Clients c0..c{n-1} with 4, 5, 6... examples; deterministic."""
  rng = np.random.default_rng(seed)
  data = {}
  for i in range(num_clients):
    n = first_size + i
    data[f"c{i}"] = collections.OrderedDict(
      x=rng.normal(size=(n, 3)).astype(np.float32),
      y=rng.integers(0, NUM_CLASSES, size=n).astype(np.int32),
    )
  return tff.simulation.datasets.TestClientData(data)


def tff_learning_process(
  model_fn, client_optimizer, server_optimizer, weighting, mu, simulation_loop
):
  """The same algorithm assembled from TFF's own building blocks."""
  work = client_work.build_model_delta_client_work(
    model_fn,
    client_optimizer,
    weighting,
    delta_l2_regularizer=mu,
    use_experimental_simulation_loop=simulation_loop,
  )
  with tf.Graph().as_default():
    weights_type = tff.learning.models.weights_type_from_model(model_fn())

  @tff.tensorflow.computation
  def initial_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  return tff.learning.templates.compose_learning_process(
    initial_weights_fn,
    tff.learning.templates.build_broadcast_process(weights_type),
    work,
    tff.aggregators.MeanFactory().create(weights_type.trainable, tff.TensorType(np.float32)),
    tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type),
  )


CLIENT_OPTIMIZERS = {
  "tff-sgd": lambda: tff.learning.optimizers.build_sgdm(0.1),
  "keras-adam": lambda: lambda: tf.keras.optimizers.Adam(0.05),
}


@pytest.mark.parametrize("simulation_loop", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.5])
@pytest.mark.parametrize("optimizer_kind", sorted(CLIENT_OPTIMIZERS))
def test_loop_matches_tff_runtime(optimizer_kind, mu, simulation_loop):
  client_optimizer = CLIENT_OPTIMIZERS[optimizer_kind]()
  # Server momentum makes the server optimizer state matter across rounds.
  server_optimizer = tff.learning.optimizers.build_sgdm(0.7, momentum=0.9)
  weighting = tff.learning.ClientWeighting.NUM_EXAMPLES
  config = simulation.SimulationConfig(
    clients_per_round=3,
    client_epochs=2,
    batch_size=2,
    shuffle_buffer=10,
    seed=3,
    eval_every=0,
    client_weighting=weighting,
    delta_l2_regularizer=mu,
    use_experimental_simulation_loop=simulation_loop,
  )
  loop = simulation.SimulationLoop(
    tiny_model_fn,
    client_optimizer,
    server_optimizer,
    tiny_client_data(),
    config,
    devices=["/device:CPU:0"],
  )
  process = tff_learning_process(
    tiny_model_fn, client_optimizer, server_optimizer, weighting, mu, simulation_loop
  )
  state = process.set_model_weights(process.initialize(), loop.state.model_weights)
  for round_num in (1, 2, 3):
    # The same clients and the same seeded example order in both runtimes.
    datasets = [loop.client_dataset(c, round_num) for c in loop.sample_clients(round_num)]
    output = process.next(state, datasets)
    state = output.state
    result = loop.run_round()
    tff_train = output.metrics["client_work"]["train"]
    assert result.train_metrics["num_examples"] == tff_train["num_examples"]
    np.testing.assert_allclose(result.train_metrics["loss"], tff_train["loss"], rtol=1e-5)
  expected = process.get_model_weights(state)
  actual = loop.state.model_weights
  assert len(actual.trainable) == len(expected.trainable) == 4
  for a, e in zip(actual.trainable, expected.trainable):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  # Sanity: training moved the weights, so the comparison means something.
  initial = simulation.initial_model_weights(tiny_model_fn, 3)
  assert not np.allclose(actual.trainable[0], initial.trainable[0])


def test_uniform_weighting_matches_tff_runtime():
  client_optimizer = tff.learning.optimizers.build_sgdm(0.1)
  server_optimizer = tff.learning.optimizers.build_sgdm(1.0)
  weighting = tff.learning.ClientWeighting.UNIFORM
  config = simulation.SimulationConfig(
    clients_per_round=4,
    batch_size=3,
    shuffle_buffer=0,
    seed=1,
    eval_every=0,
    client_weighting=weighting,
  )
  loop = simulation.SimulationLoop(
    tiny_model_fn,
    client_optimizer,
    server_optimizer,
    tiny_client_data(),
    config,
    devices=["/device:CPU:0"],
  )
  process = tff_learning_process(
    tiny_model_fn, client_optimizer, server_optimizer, weighting, 0.0, True
  )
  state = process.set_model_weights(process.initialize(), loop.state.model_weights)
  datasets = [loop.client_dataset(c, 1) for c in loop.sample_clients(1)]
  state = process.next(state, datasets).state
  result = loop.run_round()
  assert [c.weight for c in result.clients] == [1.0] * 4
  for a, e in zip(loop.state.model_weights.trainable, process.get_model_weights(state).trainable):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def make_loop(data=None, seed=5, devices=("/device:CPU:0",), **overrides):
  settings = dict(
    clients_per_round=3, client_epochs=2, batch_size=2, shuffle_buffer=8, seed=seed, eval_every=0
  )
  settings.update(overrides)
  return simulation.SimulationLoop(
    tiny_model_fn,
    tff.learning.optimizers.build_sgdm(0.1),
    tff.learning.optimizers.build_sgdm(1.0, momentum=0.9),
    data if data is not None else tiny_client_data(),
    simulation.SimulationConfig(**settings),
    devices=list(devices),
  )


def assert_same_weights(a, b):
  for x, y in zip(a.trainable + a.non_trainable, b.trainable + b.non_trainable):
    np.testing.assert_array_equal(x, y)


def test_sampling_is_a_function_of_seed_and_round():
  loop = make_loop(seed=5)
  again = make_loop(seed=5)
  other = make_loop(seed=6)
  rounds = range(1, 9)
  assert [loop.sample_clients(r) for r in rounds] == [again.sample_clients(r) for r in rounds]
  assert [loop.sample_clients(r) for r in rounds] != [other.sample_clients(r) for r in rounds]
  for r in rounds:
    chosen = loop.sample_clients(r)
    assert len(set(chosen)) == 3 and set(chosen) <= {f"c{i}" for i in range(6)}
  # Order of the ClientData's ids does not matter: they are sorted first.
  assert loop.shuffle_seed("c1", 2) == again.shuffle_seed("c1", 2)
  assert loop.shuffle_seed("c1", 2) != loop.shuffle_seed("c1", 3)


def test_client_dataset_shuffles_each_epoch_reproducibly():
  loop = make_loop(client_epochs=3, batch_size=100)
  first = list(loop.client_dataset("c5", 1))[0]["y"].numpy()
  again = list(loop.client_dataset("c5", 1))[0]["y"].numpy()
  np.testing.assert_array_equal(first, again)
  assert len(first) == 3 * 9
  stored = tiny_client_data().create_tf_dataset_for_client("c5")
  labels = np.array([e["y"] for e in stored.as_numpy_iterator()])
  for epoch in range(3):
    # Every epoch is a permutation of the client's examples.
    np.testing.assert_array_equal(np.sort(first[epoch * 9 : (epoch + 1) * 9]), np.sort(labels))


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
  """A store of 8x8 digit-like clients with 1, 8, 15 and 22 examples."""
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(4)
  clients = {
    f"w{i}": [
      {"pixels": (rng.random((8, 8)) * 16).astype(np.float32), "label": int(rng.integers(0, 10))}
      for _ in range(1 + 7 * i)
    ]
    for i in range(4)
  }
  return testing.prepare_store(clients, tmp_path_factory.mktemp("digits"))


def digits_loop(data, preprocess, **overrides):
  settings = dict(clients_per_round=2, batch_size=4, eval_every=0, seed=2)
  settings.update(overrides)
  return simulation.SimulationLoop(
    models.get_model("digits-cnn").model_fn,
    tff.learning.optimizers.build_sgdm(0.1),
    tff.learning.optimizers.build_sgdm(1.0),
    data,
    simulation.SimulationConfig(**settings),
    preprocess=preprocess,
    devices=["/device:CPU:0"],
  )


@pytest.mark.parametrize("shuffle_buffer,client_epochs", [(1000, 1), (5, 3), (0, 2)])
def test_store_batches_from_a_batch_preprocess_equal_per_element_batches(
  digits_store, shuffle_buffer, client_epochs
):
  data = client_data.load_client_data(digits_store)
  spec = models.get_model("digits-cnn")
  settings = dict(shuffle_buffer=shuffle_buffer, client_epochs=client_epochs)
  # The batch form on the store's stacked tensors; the per-element form on
  # the same tensors (the wrapper has no batch form); the per-element form
  # on the records read one by one (ClientData.preprocess hides
  # client_tensors_fn).
  loops = [
    digits_loop(data, spec.preprocess, **settings),
    digits_loop(data, lambda dataset: spec.preprocess(dataset), **settings),
    digits_loop(data.preprocess(lambda dataset: dataset), spec.preprocess, **settings),
  ]
  for round_num in (1, 2):
    for client_id in data.client_ids:
      expected = list(loops[0].client_dataset(client_id, round_num))
      assert sum(len(b["y"]) for b in expected) == (data.num_examples(client_id) * client_epochs)
      for loop in loops[1:]:
        batches = list(loop.client_dataset(client_id, round_num))
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected):
          for key in ("x", "y"):
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_batch_preprocess_replaces_the_per_element_map_on_store_tensors(digits_store):
  data = client_data.load_client_data(digits_store)
  image_preprocess = models.get_model("digits-cnn").preprocess
  calls = collections.Counter()

  def preprocess(dataset):
    calls["per_element"] += 1
    return image_preprocess(dataset)

  def batch_fn(elements):
    calls["batch"] += 1
    return image_preprocess.fedbeam_batch_fn(elements)

  preprocess.fedbeam_batch_fn = batch_fn
  digits_loop(data, preprocess).run_round()
  assert calls["per_element"] == 0 and calls["batch"] > 0
  # Without client_tensors_fn there are no stacked tensors to give it.
  calls.clear()
  digits_loop(data.preprocess(lambda dataset: dataset), preprocess).run_round()
  assert calls["per_element"] > 0 and calls["batch"] == 0


def test_runs_are_reproducible_and_round_limited_resume_is_exact(tmp_path):
  full = make_loop()
  full.run(4)

  first = make_loop()
  results = first.run(2)
  assert [r.round_num for r in results] == [1, 2]
  path = str(tmp_path / "state.npz")
  simulation.save_state(path, first.state, metadata={"seed": 5})

  resumed = make_loop()
  state, metadata = simulation.load_state(path, resumed.state)
  assert metadata == {"seed": 5} and state.round_num == 2
  resumed.set_state(state)
  assert [r.round_num for r in resumed.run(4)] == [3, 4]
  assert resumed.state.round_num == full.state.round_num == 4
  assert_same_weights(resumed.state.model_weights, full.state.model_weights)
  for a, b in zip(
    tf.nest.flatten(resumed.state.server_optimizer_state),
    tf.nest.flatten(full.state.server_optimizer_state),
  ):
    np.testing.assert_array_equal(a, b)


def test_concurrent_clients_per_device_give_the_same_weights():
  sequential = make_loop(clients_per_round=5)
  concurrent = make_loop(clients_per_round=5, clients_per_device=3)
  sequential.run(2)
  results = concurrent.run(2)
  assert_same_weights(concurrent.state.model_weights, sequential.state.model_weights)
  assert [c.client_id for c in results[0].clients] == sequential.sample_clients(1)


def test_save_state_leaves_no_temporary_file(tmp_path):
  loop = make_loop()
  path = tmp_path / "state.npz"
  simulation.save_state(str(path), loop.state)
  simulation.save_state(str(path), loop.state)
  assert sorted(os.listdir(tmp_path)) == ["state.npz"]


def test_initial_weights_depend_only_on_the_seed():
  a = simulation.initial_model_weights(tiny_model_fn, 1)
  b = simulation.initial_model_weights(tiny_model_fn, 1)
  c = simulation.initial_model_weights(tiny_model_fn, 2)
  assert_same_weights(a, b)
  assert not np.array_equal(a.trainable[0], c.trainable[0])


def test_evaluation_matches_keras_on_all_test_examples():
  test_data = tiny_client_data(num_clients=3, seed=9)
  loop = simulation.SimulationLoop(
    tiny_model_fn,
    tff.learning.optimizers.build_sgdm(0.1),
    tff.learning.optimizers.build_sgdm(1.0),
    tiny_client_data(),
    simulation.SimulationConfig(clients_per_round=2, eval_every=2, eval_batch_size=4),
    test_data=test_data,
    devices=["/device:CPU:0"],
  )
  assert loop.run_round().eval_metrics is None
  result = loop.run_round()
  assert result.eval_metrics is not None

  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input([3]),
      tf.keras.layers.Dense(5, activation="relu"),
      tf.keras.layers.Dense(NUM_CLASSES),
    ]
  )
  keras_model.set_weights(loop.state.model_weights.trainable)
  x = np.concatenate(
    [
      test_data.create_tf_dataset_for_client(c).batch(100).get_single_element()["x"]
      for c in test_data.client_ids
    ]
  )
  y = np.concatenate(
    [
      test_data.create_tf_dataset_for_client(c).batch(100).get_single_element()["y"]
      for c in test_data.client_ids
    ]
  )
  logits = keras_model(x).numpy()
  loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy().mean()
  accuracy = np.mean(np.argmax(logits, axis=1) == y)
  eval_loss, eval_accuracy = simulation.loss_and_accuracy(result.eval_metrics)
  np.testing.assert_allclose(eval_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(eval_accuracy, accuracy, rtol=1e-6)
  assert result.eval_metrics["num_examples"] == len(y) == 4 + 5 + 6


def test_non_finite_clients_leave_the_server_weights_unchanged():
  bad = {
    f"c{i}": collections.OrderedDict(
      x=np.full((3, 3), np.nan, np.float32),
      y=np.zeros(3, np.int32),
    )
    for i in range(3)
  }
  loop = make_loop(data=tff.simulation.datasets.TestClientData(bad))
  before = loop.state
  result = loop.run_round()
  assert not result.update_applied
  assert [c.weight for c in result.clients] == [0.0, 0.0, 0.0]
  assert loop.state.round_num == 1
  assert_same_weights(loop.state.model_weights, before.model_weights)


def test_too_many_clients_per_round_is_rejected():
  with pytest.raises(ValueError, match="clients_per_round=7 exceeds the 6"):
    make_loop(clients_per_round=7)


def test_data_that_does_not_fit_the_model_is_rejected():
  wrong = tff.simulation.datasets.TestClientData(
    {
      "a": collections.OrderedDict(
        pixels=np.zeros((2, 3), np.float32), label=np.zeros(2, np.int32)
      ),
    }
  )
  with pytest.raises(ValueError, match="does not match the model's input"):
    make_loop(data=wrong, clients_per_round=1)


@pytest.mark.parametrize(
  "field,value",
  [
    ("clients_per_round", 0),
    ("batch_size", -1),
    ("seed", -3),
    ("client_epochs", 1.5),
    ("delta_l2_regularizer", -1.0),
  ],
)
def test_bad_config_is_rejected(field, value):
  settings = dict(clients_per_round=2)
  settings[field] = value
  with pytest.raises(ValueError, match=field):
    simulation.SimulationConfig(**settings)


DEVICE_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    from fedbeam.runtime.tff_worker import register_worker_cleanup
    register_worker_cleanup()
    import test_simulation as helpers

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("fedbeam.runtime.simulation")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    # prefetch_to_device is on for GPUs only by default; force it here so
    # the copy to each device is exercised too.
    # Two clients at a time per device: clients still alternate devices.
    two = helpers.make_loop(devices=("/device:CPU:0", "/device:CPU:1"),
                            clients_per_round=5, prefetch_to_device=True,
                            clients_per_device=2)
    results = two.run(2)
    one = helpers.make_loop(devices=("/device:CPU:0",), clients_per_round=5)
    one.run(2)
    same = all(
        (a == b).all() for a, b in zip(two.state.model_weights.trainable,
                                       one.state.model_weights.trainable))
    json.dump({
        "logical_devices": [d.name for d in tf.config.list_logical_devices()],
        "rounds": [[[c.client_id, c.device, c.ran_on] for c in r.clients]
                   for r in results],
        "same_weights_as_one_device": bool(same),
        "messages": messages,
    }, open(sys.argv[2], "w"))
""")


def test_clients_alternate_over_logical_devices(tmp_path):
  # Logical devices must be configured before TensorFlow initializes its
  # devices, which this test process already did: use a fresh interpreter.
  out = tmp_path / "devices.json"
  script = tmp_path / "devices.py"
  script.write_text(DEVICE_SCRIPT)
  log = tmp_path / "devices.log"
  with open(log, "w") as log_file:
    completed = subprocess.run(
      [sys.executable, str(script), os.path.dirname(__file__), str(out)],
      stdout=log_file,
      stderr=subprocess.STDOUT,
      timeout=300,
    )
  assert completed.returncode == 0, log.read_text()[-3000:]
  report = json.loads(out.read_text())
  assert report["logical_devices"] == ["/device:CPU:0", "/device:CPU:1"]
  full = "/job:localhost/replica:0/task:0/device:CPU:{}"
  for clients in report["rounds"]:
    assert [c[1] for c in clients] == [
      "/device:CPU:0",
      "/device:CPU:1",
      "/device:CPU:0",
      "/device:CPU:1",
      "/device:CPU:0",
    ]
    assert [c[2] for c in clients] == [full.format(i) for i in (0, 1, 0, 1, 0)]
  # Placement does not change the numbers.
  assert report["same_weights_as_one_device"]
  first_round = report["rounds"][0]
  for client_id, _, ran_on in first_round:
    assert any(f"round 1: client {client_id!r} ran on {ran_on}" in m for m in report["messages"])


def test_client_update_fn_gives_the_round_update_without_changing_the_state():
  loop = make_loop(clients_per_round=1)
  before = loop.state
  (client_id,) = loop.sample_clients(1)
  output = loop.client_update_fn()(loop.client_dataset(client_id, 1))
  assert_same_weights(loop.state.model_weights, before.model_weights)
  loop.run_round()
  # One client: the mean delta is its delta, and the first SGD step (lr 1.0,
  # momentum from zero) subtracts it from the weights.
  for w, d, new in zip(
    before.model_weights.trainable,
    tf.nest.flatten(output.update),
    loop.state.model_weights.trainable,
  ):
    np.testing.assert_allclose(new, w - d, rtol=1e-5, atol=1e-6)

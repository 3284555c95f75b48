"""Rounds per second: fedbeam's simulation loop vs TFF's own runtime, same rounds.

One process, same data, same model, same clients and example order every
round, same client update (`fedbeam.runtime.client_work`, dataset-iterator
loop), same server optimizer, on the CPU:

- TFF runtime: `tff.learning.templates.compose_learning_process` (broadcast,
  the client work, `tff.aggregators.MeanFactory`,
  `build_apply_optimizer_finalizer`) executed by TFF's C++ `worker_binary`,
  fed `SimulationLoop.client_dataset` for the round's clients;
- fedbeam loop: `fedbeam.runtime.simulation.SimulationLoop` on
  `/device:CPU:0`, one client at a time (the default);
- fedbeam loop with `clients_per_device=2`: two clients at a time.

Data: scikit-learn's 1,797 handwritten 8x8 digits split into 40 equal
clients, prepared into a fedbeam store and read with `load_client_data`;
model `digits-cnn`. Building a round's client datasets counts in every row.
Contenders take turns within each round; the first round (tracing) is not
counted. The loop's round is also split with
`bench.loop_profile.measure_input_and_compute()`, one client after another:
compute (the clients' updates on their batches already in memory) and input
(how much longer the same updates take on their datasets as the round builds
them).

    .venv/bin/python -m bench.bench_simulation > /tmp/bench_simulation.log 2>&1

Writes bench/results/simulation.json and the "Simulation loop" section of
bench/README.md. Not a test: one run, the numbers depend on the machine and
its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "bench", "README.md")
# Per model: (results file, README section, description of the data).
OUTPUTS = {
  "digits-cnn": (
    os.path.join(ROOT, "bench", "results", "simulation.json"),
    "## Simulation loop",
    "`digits-cnn` on scikit-learn's 1,797 digits",
  ),
  "emnist-cnn": (
    os.path.join(ROOT, "bench", "results", "simulation_emnist.json"),
    "## Simulation loop (EMNIST CNN)",
    "`emnist-cnn` on EMNIST-like 28x28 clients (lognormal sizes, mean ~90)",
  ),
}
RESULTS, SECTION, DATA = OUTPUTS["digits-cnn"]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=15, help="timed rounds, after one warm-up round")
  p.add_argument("--clients", type=int, default=40)
  p.add_argument("--clients-per-round", type=int, default=10)
  p.add_argument("--client-epochs", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument(
    "--model",
    choices=["digits-cnn", "emnist-cnn"],
    default="digits-cnn",
    help="digits-cnn on load_digits, or emnist-cnn on EMNIST-like 28x28 "
    "clients with lognormal sizes (mean ~90)",
  )
  p.add_argument("--no-write", action="store_true", help="do not write results and README")
  return p.parse_args(argv)


def digits_store(num_clients: int, directory: str) -> str:
  """load_digits split into `num_clients` equal clients, prepared as a store."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  clients = {
    f"writer_{i:02d}": [
      {"pixels": digits.images[j].astype(np.float32), "label": int(digits.target[j])} for j in idx
    ]
    for i, idx in enumerate(np.array_split(order, num_clients))
  }
  return testing.prepare_store(clients, directory)


def emnist_like_store(num_clients: int, directory: str) -> str:
  """EMNIST-like clients (`pixels` float32[28,28], `label` int32), lognormal sizes, as a store."""
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  sizes = np.clip(rng.lognormal(np.log(90) - 0.5, 1.0, num_clients).astype(int), 1, 1500)
  clients = {
    f"f{i:04d}": [
      {"pixels": rng.random((28, 28), dtype=np.float32), "label": np.int32(rng.integers(10))}
      for _ in range(n)
    ]
    for i, n in enumerate(sizes)
  }
  return testing.prepare_store(
    clients,
    directory,
    element_spec={
      "label": {"dtype": "int32", "shape": []},
      "pixels": {"dtype": "float32", "shape": [28, 28]},
    },
  )


def tff_process(spec, client_optimizer, server_optimizer, weighting):
  """The same algorithm assembled from TFF's building blocks."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime import client_work  # pylint: disable=g-import-not-at-top

  work = client_work.build_model_delta_client_work(
    spec.model_fn, client_optimizer, weighting, use_experimental_simulation_loop=True
  )
  with tf.Graph().as_default():
    weights_type = tff.learning.models.weights_type_from_model(spec.model_fn())

  @tff.tensorflow.computation
  def initial_weights_fn():
    return tff.learning.models.ModelWeights.from_model(spec.model_fn())

  return tff.learning.templates.compose_learning_process(
    initial_weights_fn,
    tff.learning.templates.build_broadcast_process(weights_type),
    work,
    tff.aggregators.MeanFactory().create(weights_type.trainable, tff.TensorType(np.float32)),
    tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type),
  )


def machine() -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  import fedbeam  # pylint: disable=g-import-not-at-top

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return {
    "cpus": os.cpu_count(),
    "cpu": cpu,
    "platform": platform.platform(),
    "load_average_at_start": list(os.getloadavg()),
    "gpus": len(tf.config.list_physical_devices("GPU")),
    "versions": {
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
      "tensorflow_federated": tff.__version__,
      "numpy": np.__version__,
      "fedbeam": fedbeam.__version__,
    },
  }


def summarize(seconds: list[float]) -> dict:
  timed = seconds[1:]
  median = statistics.median(timed)
  return {
    "median_seconds_per_round": median,
    "rounds_per_second": 1.0 / median,
    "min_seconds_per_round": min(timed),
    "max_seconds_per_round": max(timed),
    "seconds_per_round_including_warmup": seconds,
  }


def readme_section(result: dict) -> str:
  setup, mach = result["setup"], result["machine"]
  rows = result["contenders"]
  tff_median = rows["tff_runtime"]["median_seconds_per_round"]
  names = {
    "tff_runtime": "TFF runtime (`compose_learning_process`, C++ worker)",
    "fedbeam_loop": "fedbeam `SimulationLoop`, 1 client at a time",
    "fedbeam_loop_2_per_device": "fedbeam `SimulationLoop`, `clients_per_device=2`",
  }
  split = result["loop_round_split"]
  v = mach["versions"]
  lines = [
    SECTION,
    "",
    f"Rounds per second of the same FedAvg rounds through TFF's runtime and "
    f"through `fedbeam.runtime.simulation.SimulationLoop`, on the CPU "
    f"(`/device:CPU:0`): {DATA} in a "
    f"fedbeam store of {setup['clients']} clients, "
    f"{setup['clients_per_round']} clients per round, "
    f"{setup['client_epochs']} local epochs, batch {setup['batch_size']}; "
    f"the same clients, example order and client update in every row; "
    f"{setup['timed_rounds']} rounds after one warm-up round, contenders "
    f"taking turns within each round.",
    "",
    "| contender | rounds/s | median s/round | min–max s/round | vs. TFF |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for key, label in names.items():
    r = rows[key]
    lines.append(
      f"| {label} | {r['rounds_per_second']:.2f} | "
      f"{r['median_seconds_per_round']:.3f} | "
      f"{r['min_seconds_per_round']:.3f}–{r['max_seconds_per_round']:.3f} | "
      f"{tff_median / r['median_seconds_per_round']:.2f}x |"
    )
  lines += [
    "",
    f"Loop round split (median over rounds, measured apart, one client "
    f"after another, `bench.loop_profile.measure_input_and_compute()`): "
    f"compute {split['median_compute_seconds']:.3f} s (the clients' "
    f"updates on their batches already in memory), input "
    f"{split['median_input_seconds']:.3f} s (how much longer the same "
    f"updates take on their datasets as the round builds them: reading, "
    f"preprocessing, shuffling, batching); input is "
    f"{100 * split['input_fraction']:.0f}% of the two.",
    "",
    f"After all {setup['timed_rounds'] + 1} rounds the largest weight "
    f"difference between TFF's runtime and the loop is "
    f"{result['max_abs_weight_difference_tff_vs_loop']:.1e}; the two loop "
    f"rows end with identical weights: "
    f"{result['loop_rows_identical_weights']}.",
    "",
    "Reading: on a CPU, TFF's C++ runtime runs a round's clients "
    "concurrently, while the loop trains one client at a time per model "
    "copy; the loop exists for GPUs, which TFF's PyPI runtime cannot use, "
    "and on several GPUs it trains one client per device at a time (or "
    "`clients_per_device` of them). "
    + (
      "No GPU was available for this run."
      if not mach["gpus"]
      else f"This machine has {mach['gpus']} GPU(s); the rows above use the CPU only."
    ),
    "",
    "Command (from the repository root):",
    "",
    "```sh",
    f".venv/bin/python -m bench.bench_simulation --model {result['setup']['model']} "
    "> /tmp/bench_simulation.log 2>&1",
    "```",
    "",
    f"Machine: {mach['cpus']} CPUs ({mach['cpu']}), {mach['platform']}; "
    f"load average at start "
    f"{', '.join(f'{x:.2f}' for x in mach['load_average_at_start'])}. "
    f"Versions: Python {v['python']}, TensorFlow {v['tensorflow']}, "
    f"TensorFlow Federated {v['tensorflow_federated']}, numpy {v['numpy']}, "
    f"fedbeam {v['fedbeam']}. Raw numbers: `bench/results/{os.path.basename(RESULTS)}`.",
    "",
  ]
  return "\n".join(lines)


def write_readme_section(section: str) -> None:
  """Replaces (or appends) this benchmark's section; other sections stay."""
  text = ""
  if os.path.exists(README):
    with open(README, encoding="utf-8") as f:
      text = f.read()
  if not text.strip():
    text = (
      "# Benchmarks\n\nBenchmarks against peers (not tests). Each "
      "section is written by its script.\n\n"
    )
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  with open(README, "w", encoding="utf-8") as f:
    f.write(text.rstrip("\n") + "\n")


def main(argv=None) -> int:
  global RESULTS, SECTION, DATA  # pylint: disable=global-statement
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  RESULTS, SECTION, DATA = OUTPUTS[args.model]
  mach = machine()
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from bench import loop_profile  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime import (
    models,  # pylint: disable=g-import-not-at-top
    simulation,  # pylint: disable=g-import-not-at-top
  )
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.tff_worker import register_worker_cleanup  # pylint: disable=g-import-not-at-top

  register_worker_cleanup()
  workdir = tempfile.mkdtemp(prefix="fedbeam-bench-simulation-")
  try:
    build = digits_store if args.model == "digits-cnn" else emnist_like_store
    data = load_client_data(build(args.clients, workdir))
    spec = models.get_model(args.model)
    client_optimizer = tff.learning.optimizers.build_sgdm(0.1)
    server_optimizer = tff.learning.optimizers.build_sgdm(1.0)
    weighting = tff.learning.ClientWeighting.NUM_EXAMPLES

    def make_loop(clients_per_device):
      config = simulation.SimulationConfig(
        clients_per_round=args.clients_per_round,
        client_epochs=args.client_epochs,
        batch_size=args.batch_size,
        shuffle_buffer=100,
        seed=0,
        eval_every=0,
        client_weighting=weighting,
        use_experimental_simulation_loop=True,
        clients_per_device=clients_per_device,
      )
      return simulation.SimulationLoop(
        spec.model_fn,
        client_optimizer,
        server_optimizer,
        data,
        config,
        preprocess=spec.preprocess,
        devices=["/device:CPU:0"],
      )

    loops = {"fedbeam_loop": make_loop(1), "fedbeam_loop_2_per_device": make_loop(2)}
    reference = loops["fedbeam_loop"]
    process = tff_process(spec, client_optimizer, server_optimizer, weighting)
    state = process.set_model_weights(process.initialize(), reference.state.model_weights)

    seconds = {"tff_runtime": [], **{k: [] for k in loops}}
    splits = []
    for round_num in range(1, args.rounds + 2):
      start = time.perf_counter()
      datasets = [
        reference.client_dataset(c, round_num) for c in reference.sample_clients(round_num)
      ]
      state = process.next(state, datasets).state
      seconds["tff_runtime"].append(time.perf_counter() - start)
      for name, loop in loops.items():
        start = time.perf_counter()
        loop.run_round()
        seconds[name].append(time.perf_counter() - start)
      if round_num > 1:
        splits.append(loop_profile.measure_input_and_compute(reference))
      print(
        f"round {round_num}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in seconds.items()),
        flush=True,
      )

    tff_weights = process.get_model_weights(state).trainable
    max_difference = max(
      float(np.max(np.abs(a - b)))
      for a, b in zip(reference.state.model_weights.trainable, tff_weights)
    )
    identical = all(
      np.array_equal(a, b)
      for a, b in zip(
        reference.state.model_weights.trainable,
        loops["fedbeam_loop_2_per_device"].state.model_weights.trainable,
      )
    )
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  input_median = statistics.median(s["input_seconds"] for s in splits)
  compute_median = statistics.median(s["compute_seconds"] for s in splits)
  result = {
    "benchmark": "simulation loop vs TFF runtime, same rounds",
    "machine": mach,
    "setup": {
      "model": args.model,
      "data": DATA + " in a fedbeam store",
      "clients": args.clients,
      "clients_per_round": args.clients_per_round,
      "client_epochs": args.client_epochs,
      "batch_size": args.batch_size,
      "timed_rounds": args.rounds,
      "warmup_rounds": 1,
      "loop_implementation": "DATASET_ITERATOR",
      "device": "/device:CPU:0",
    },
    "contenders": {k: summarize(v) for k, v in seconds.items()},
    "loop_round_split": {
      "median_input_seconds": input_median,
      "median_compute_seconds": compute_median,
      "input_fraction": input_median / (input_median + compute_median),
      "per_round": splits,
    },
    "max_abs_weight_difference_tff_vs_loop": max_difference,
    "loop_rows_identical_weights": identical,
  }
  tff_median = result["contenders"]["tff_runtime"]["median_seconds_per_round"]
  for name, summary in result["contenders"].items():
    print(
      f"{name:28s} {summary['rounds_per_second']:6.2f} rounds/s  "
      f"median {summary['median_seconds_per_round']:.3f} s  "
      f"vs TFF {tff_median / summary['median_seconds_per_round']:.2f}x"
    )
  print(f"loop split: input {input_median:.3f} s, compute {compute_median:.3f} s")
  print(
    f"max |weight difference| TFF vs loop: {max_difference:.2e}; loop rows identical: {identical}"
  )
  if not args.no_write:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    temporary = RESULTS + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    os.replace(temporary, RESULTS)
    write_readme_section(readme_section(result))
    print(f"wrote {RESULTS} and the {SECTION!r} section of {README}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

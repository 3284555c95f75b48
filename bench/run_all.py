"""Runs every benchmark, draws the charts and writes the summary of targets in bench/README.md.

    .venv/bin/python -m bench.run_all            # `make bench`; ~30 minutes on 2 CPUs
    .venv/bin/python -m bench.run_all --full     # + the slowest pipelines at 10x (~55 minutes)
    .venv/bin/python -m bench.run_all --quick    # smoke run of every script; writes nothing
    .venv/bin/python -m bench.run_all --summary-only   # README summary + charts from results/

Steps, each a subprocess whose output goes to build/bench/logs/<step>.log
(never to a pipe: a process that ran a TFF computation leaves a
`worker_binary` child holding its stdout):

1. `bash bench/grouper_env.sh` (dataset_grouper's virtualenv, once);
2. bench_pipeline (writes the stores the next steps read), bench_input_formats;
3. bench_loading (per-round reading, expansion, streaming, training input);
4. bench_expansion and bench_simulation;
5. bench_scale and bench_inputs (Parquet input next to TFRecord);
6. beam_data_plane_loss (the local runner's data-plane race, guarded and not; ~2 minutes);
7. plot, then the "Summary" section at the top of bench/README.md.

The first run also builds the cached workload files under build/bench
(~5 minutes more). bench/results/run_all.json records each step's wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

from bench import workload as wl

SUMMARY = "## Summary"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run; writes no results")
  p.add_argument("--full", action="store_true", help="every pipeline contender at 10x data")
  p.add_argument(
    "--skip",
    default="",
    help="comma-separated steps to skip: "
    + ", ".join(s for s, _ in steps(argparse.Namespace(quick=False, full=False))),
  )
  p.add_argument("--summary-only", action="store_true")
  return p.parse_args(argv)


def steps(args) -> list[tuple[str, list[str]]]:
  py = [wl.PYTHON, "-m"]
  q = args.quick
  return [
    ("grouper_env", ["bash", os.path.join(wl.ROOT, "bench", "grouper_env.sh")]),
    (
      "bench_pipeline",
      py
      + ["bench.bench_pipeline"]
      + (["--scales", "0.1", "--no-write"] if q else (["--full"] if args.full else [])),
    ),
    (
      "bench_input_formats",
      py
      + ["bench.bench_input_formats"]
      + (["--clients", "30", "--repeat", "1", "--no-write"] if q else []),
    ),
    ("bench_loading", py + ["bench.bench_loading"] + (["--quick", "--no-write"] if q else [])),
    (
      "bench_expansion",
      py
      + ["bench.bench_expansion"]
      + (
        ["--raw-clients", "30", "--rounds", "2", "--clients-per-round", "10", "--no-write"]
        if q
        else []
      ),
    ),
    (
      "bench_simulation",
      py + ["bench.bench_simulation"] + (["--rounds", "2", "--no-write"] if q else []),
    ),
    ("bench_scale", py + ["bench.bench_scale"] + (["--quick", "--no-write"] if q else [])),
    (
      "bench_inputs",
      py
      + ["bench.bench_inputs"]
      + (["--clients", "60", "--repeat", "1", "--no-write"] if q else []),
    ),
    (
      "beam_data_plane_loss",
      py
      + ["bench.beam_data_plane_loss"]
      + (["--runs", "1", "--files", "4", "--per-file", "1000", "--no-write"] if q else []),
    ),
    ("plot", py + ["bench.plot"]),
  ]


# --- summary -----------------------------------------------------------------------------


def _verdict(ok) -> str:
  return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


def _x(v: float) -> str:
  return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def summary_rows() -> tuple[list[list[str]], list[str]]:
  """[target, measured, verdict] rows and notes, from bench/results/*.json."""
  rows, notes = [], []
  loading = wl.read_json("loading.json") or {}
  lp = (loading.get("loading") or {}).get("per_round")
  if lp:

    def fastest(prefix):
      cands = {
        k: v["median_s"]
        for k, v in lp.items()
        if k.startswith(prefix + "_") and k.split(prefix + "_")[1] in ("eager", "graph")
      }
      name = min(cands, key=cands.get)
      return name, cands[name]

    rec = lp["fedbeam_tensors"]["median_s"]
    for prefix, what, need in (
      ("sql", "TFF SQLite as `save_to_sql_client_data` writes it", 10),
      ("sql_indexed", "TFF SQLite with an index on `client_id`", 3),
      ("per_user", "TFF `FilePerUserClientData`", 3),
    ):
      name, t = fastest(prefix)
      mode = name.rsplit("_", 1)[1]
      rows.append(
        [
          f"Per round, fedbeam tensors path ≥ {need}x faster than {what}",
          f"{_x(t / rec)} ({rec:.3f} s vs {t:.3f} s, TFF's faster mode: {mode})",
          _verdict(t / rec >= need),
        ]
      )
    lim = lp["limit"]["median_s"]
    rows.append(
      [
        "Per round, fedbeam tensors path within 2x of the limit",
        f"{_x(rec / lim)} of the limit ({rec:.3f} s vs {lim:.3f} s)",
        _verdict(rec / lim <= 2),
      ]
    )
    for mode in ("eager", "graph"):
      t = lp[f"fedbeam_{mode}"]["median_s"]
      parts = []
      oks = []
      for prefix, need in (("sql", 10), ("sql_indexed", 3), ("per_user", 3)):
        _, peer = fastest(prefix)
        parts.append(f"{_x(peer / t)} vs {prefix.replace('_', ' ')} (need {need}x)")
        oks.append(peer / t >= need)
      parts.append(f"{_x(t / lim)} of the limit (need ≤ 2x)")
      oks.append(t / lim <= 2)
      how = (
        "`create_tf_dataset_for_client(id).batch(20)` iterated in Python"
        if mode == "eager"
        else "`serializable_dataset_fn(id).batch(20).reduce` in a `tf.function`"
      )
      # The targets bind the recommended path (the tensors row above, what
      # `fedbeam train` uses); the other paths are measured to show that the
      # default is the fast one.
      rows.append(
        [
          f"Same targets, fedbeam {mode} path ({how}; not the recommended path)",
          "; ".join(parts),
          f"info: would be {_verdict(all(oks))} ({sum(oks)}/4)",
        ]
      )
  ex = (loading.get("expansion") or {}).get("per_round")
  if ex:
    f = ex["fedbeam_expanded_tensors"]["median_s"]
    tff_rows = {k: v["median_s"] for k, v in ex.items() if k.startswith("tff_")}
    best = min(tff_rows, key=tff_rows.get)
    rows.append(
      [
        "Expansion: precomputed store ≥ 5x faster per round than on-the-fly "
        "`TransformingClientData` (1,000 raw clients, 3x)",
        f"{_x(tff_rows[best] / f)} (fedbeam tensors {f:.3f} s vs {tff_rows[best]:.3f} s, "
        f"TFF over {'indexed SQLite' if 'sql' in best else 'per-client files'}); fedbeam "
        f"eager path {_x(tff_rows[best] / ex['fedbeam_expanded_eager']['median_s'])}",
        _verdict(tff_rows[best] / f >= 5),
      ]
    )
  colleague = wl.read_json("expansion.json")
  if colleague:
    r = colleague["ratio_vs_fedbeam_median"]
    rows.append(
      [
        "Expansion (bench_expansion.py: 300 raw clients, eager numpy batches, TFF over "
        "unindexed SQLite) ≥ 5x",
        f"{_x(r['tff_transforming_sql'])}",
        _verdict(r["tff_transforming_sql"] >= 5),
      ]
    )
  st = (loading.get("streaming") or {}).get("per_pass")
  if st and "grouper_stream_eager" in st:
    for name, peer in (
      ("fedbeam_all_clients_eager", "grouper_stream_eager"),
      ("fedbeam_all_clients_graph", "grouper_stream_graph"),
      ("fedbeam_datasets_eager", "grouper_stream_eager"),
    ):
      a, b = st[name]["ms_per_client"], st[peer]["ms_per_client"]
      api = "create_tf_dataset_from_all_clients" if "all_clients" in name else "datasets()"
      mode = name.rsplit("_", 1)[1]
      rows.append(
        [
          f"Streaming every client, `{api}` ({mode}) ≥ 2x faster per client than "
          f"dataset_grouper's group stream ({peer.rsplit('_', 1)[1]})",
          f"{_x(b / a)} ({a:.2f} vs {b:.2f} ms/client)",
          _verdict(b / a >= 2),
        ]
      )
  scale = wl.read_json("scale.json") or {}
  load_rows = (scale.get("load") or {}).get("rows", [])
  big = [r for r in load_rows if r["loader"] == "fedbeam" and r["clients"] >= 100_000]
  if big:
    r = big[-1]
    rows.append(
      [
        f"`load_client_data` on a {r['clients']:,}-client store: `client_ids` ready < 1 s",
        f"{r['load_s']:.3f} s",
        _verdict(r["load_s"] < 1),
      ]
    )
    rows.append(
      [
        "... memory < 200 MB (RSS growth in a fresh process)",
        f"{r['rss_growth_mb']:.0f} MB after, {r['peak_rss_growth_mb']:.0f} MB peak",
        _verdict(max(r["rss_growth_mb"], r["peak_rss_growth_mb"]) < 200),
      ]
    )
    tff_big = [t for t in load_rows if t["loader"] == "tff_sql" and t["clients"] == r["clients"]]
    ref = (
      (
        f"; TFF SqlClientData {tff_big[0]['create_first_ms']:.3f} / "
        f"{tff_big[0]['create_last_ms']:.3f} ms, its list scan alone "
        f"{tff_big[0]['list_scan_last_ms']:.3f} ms for the last id"
      )
      if tff_big
      else ""
    )
    ok = r["create_last_ms"] <= 1.25 * r["create_first_ms"] + 0.05
    rows.append(
      [
        "... `create_tf_dataset_for_client` does not scan the ids (first vs last id)",
        f"{r['create_first_ms']:.3f} vs {r['create_last_ms']:.3f} ms{ref}",
        _verdict(ok),
      ]
    )
    p = scale["load"]["prepare_tiny"]
    notes.append(
      f"The {p['clients']:,}-client store was built by `fedbeam prepare` on 2 workers "
      f"in {p['pipeline_s']:.0f} s (peak PSS {p.get('peak_pss_mb', p['peak_rss_mb']):,.0f} MB)."
    )
  # Where the eager path's time goes: dataset creation vs iteration.
  one_k = [r for r in load_rows if r["loader"] == "fedbeam" and r["clients"] == 1000]
  creation = (loading.get("loading") or {}).get("create_ms") or {}
  if lp and (one_k or "fedbeam" in creation):
    # The Client loading section times creation in the same run as the rounds;
    # the Scale section's figure is the fallback.
    if "fedbeam" in creation and "sql" in creation:
      create, where = creation["fedbeam"]["median_ms"], "Client loading section"
      tff_create = [{"create_first_ms": creation["sql"]["median_ms"]}]
    else:
      create, where = one_k[0]["create_first_ms"], "Scale section"
      tff_create = [r for r in load_rows if r["loader"] == "tff_sql" and r["clients"] == 1000]
    eager = lp["fedbeam_eager"]["ms_per_client"]
    notes.append(
      f"Where fedbeam's eager time goes: `create_tf_dataset_for_client` alone costs "
      f"{create:.2f} ms per call (1,000-client store, {where}; TFF's SqlClientData: "
      f"{tff_create[0]['create_first_ms']:.1f} ms) of the eager path's "
      f"{eager:.1f} ms per client; the graph path spends "
      f"{lp['fedbeam_graph']['ms_per_client']:.1f} ms per client building and draining the "
      f"per-client tf.data pipeline inside the function, while the tensors path "
      f"({lp['fedbeam_tensors']['ms_per_client']:.2f} ms) is one read and one parse, like the "
      f"limit ({lp['limit']['ms_per_client']:.2f} ms)."
      if tff_create
      else ""
    )
  pipe = (wl.read_json("pipeline.json") or {}).get("rows", {})
  lost = [
    f"{k}: {wl.failure_reason(r)}"
    for k, r in sorted(pipe.items())
    if "failed" in r and k.startswith("fedbeam")
  ]
  if lost:
    plain_ok = [
      k.split("@")[1] + "x"
      for k, r in sorted(pipe.items())
      if k.startswith("plain_beam@") and "pipeline_s" in r
    ]
    build = (scale.get("rounds") or {}).get("store_build") or {}
    in_process = (
      "; the same 10x group + write job completed on the in-process runner in "
      f"{build['wall_s']:.0f} s (Scale section)"
      if build.get("two_worker_failure")
      else ""
    )
    notes.append(
      "`fedbeam prepare` did not complete at every scale on the local runner with 2 "
      "workers: " + "; ".join(lost) + ". The plain Beam pipeline on the same runner "
      f"and input wrote every record at {', '.join(plain_ok)} (its counts are "
      f"checked){in_process}. See the Pipeline section."
    )
  for scale_key in ("1", "3", "10"):
    plain = pipe.get(f"plain_beam@{scale_key}")
    if not plain or ("pipeline_s" not in plain and "failed" not in plain):
      continue
    for name, what in (
      ("fedbeam_full", "group + 3x expand + split + write"),
      ("fedbeam_group", "group + write only, like for like"),
    ):
      r = pipe.get(f"{name}@{scale_key}")
      if r and "failed" in r:
        rows.append(
          [
            f"Pipeline {scale_key}x: `fedbeam prepare` ({what}) at least as fast as "
            "plain Beam GroupByKey + write",
            f"did not complete: {wl.failure_reason(r)}; plain Beam "
            + (
              f"{plain['examples_per_s']:,.0f} ex/s"
              if "failed" not in plain
              else f"did not complete either ({plain['failed']})"
            ),
            "**FAIL**",
          ]
        )
        continue
      if not r or "pipeline_s" not in r:
        continue
      others = []
      for peer, label in (
        ("plain_beam_tuned", "plain Beam with fedbeam's runner settings"),
        ("tff_sqlite", "tff sqlite"),
        ("grouper", "grouper"),
      ):
        o = pipe.get(f"{peer}@{scale_key}")
        if o and "pipeline_s" in o:
          others.append(
            f"{label} {o['examples_per_s']:,.0f} ex/s "
            f"({_x(r['examples_per_s'] / o['examples_per_s'])})"
          )
      rows.append(
        [
          f"Pipeline {scale_key}x ({r['input_examples']:,} examples): `fedbeam prepare` "
          f"({what}) at least as fast as plain Beam GroupByKey + write",
          f"{r['examples_per_s']:,.0f} vs {plain['examples_per_s']:,.0f} ex/s "
          f"({_x(r['examples_per_s'] / plain['examples_per_s'])}); peak PSS "
          f"{r.get('peak_pss_mb', r['peak_rss_mb']) / 1024:.1f} vs "
          f"{plain.get('peak_pss_mb', plain['peak_rss_mb']) / 1024:.1f} GiB"
          + (f"; vs {', '.join(others)}" if others else ""),
          _verdict(r["examples_per_s"] >= plain["examples_per_s"])
          if name == "fedbeam_full"
          else f"{_verdict(r['examples_per_s'] >= plain['examples_per_s'])} (info)",
        ]
      )
  training = loading.get("training")
  if training and "input_fraction" in training:
    rows.append(
      [
        "Training input share < 10% of round time, EMNIST CNN (`SimulationLoop`, "
        "50 clients, batch 20)",
        f"{100 * training['input_fraction']:.1f}% (input {training['median_input_s']:.2f} s, "
        f"compute {training['median_compute_s']:.2f} s)",
        _verdict(training["input_fraction"] < 0.10),
      ]
    )
  _input_format_rows(wl.read_json("input_formats.json"), rows)
  _data_plane_rows(wl.read_json("data_plane_loss.json"), rows)
  _before_after_rows(wl.read_json("before_after.json"), rows)
  _dask_rows(wl.read_json("dask.json"), rows)
  sim = wl.read_json("simulation.json")
  try:
    _simulation_rows(sim, rows)
  except (KeyError, TypeError) as e:
    notes.append(f"bench/results/simulation.json could not be summarized ({e!r}).")
  _input_rows(wl.read_json("inputs.json"), rows)
  return rows, notes


def _input_rows(inputs, rows) -> None:
  if inputs:
    t, p = inputs["rows"]["tfrecord"], inputs["rows"]["parquet"]
    rows.append(
      [
        f"Parquet input vs the same records as TFRecord (bench_inputs.py, "
        f"{inputs['examples']:,} examples, 2 workers)",
        f"{p['examples_per_s']:,.0f} vs {t['examples_per_s']:,.0f} ex/s "
        f"({_x(p['examples_per_s'] / t['examples_per_s'])}); client files identical: "
        f"{inputs['identical_client_files']}",
        "info",
      ]
    )


def _input_format_rows(result, rows) -> None:
  """TFF SQLite input against the same data as TFRecord (input_formats.json)."""
  if not result:
    return
  r = result["rows"]
  sqlite, tfrecord = r["tff-sqlite"], r["tfrecord"]
  base = r.get("tff-sqlite-baseline")
  rows.append(
    [
      f"`fedbeam prepare` of TFF SQLite input ≥ 0.7x the examples/s of the same data as "
      f"TFRecord ({result['workload']['examples']:,} examples; Input formats section)",
      f"{_x(result['sqlite_vs_tfrecord'])} ({sqlite['median_examples_per_s']:,.0f} vs "
      f"{tfrecord['median_examples_per_s']:,.0f} ex/s)"
      + (
        f"; before rows travelled as bytes {base['median_examples_per_s']:,.0f} ex/s"
        if base
        else ""
      ),
      _verdict(result["sqlite_vs_tfrecord"] >= 0.7),
    ]
  )


def _data_plane_rows(result, rows) -> None:
  """An info row: elements the local runner dropped, unguarded vs guarded (data_plane_loss.json)."""
  for g_u in (result or {}).get("groups", []):
    if g_u["guard"] or not g_u["completed"]:
      continue
    g_g = next(
      (g for g in result["groups"] if g["guard"] and g["mode"] == g_u["mode"] and g["completed"]),
      None,
    )
    if g_g is None:
      continue
    lost = g_u["lost_per_run"]
    span = f"{min(lost):,}" if min(lost) == max(lost) else f"{min(lost):,}–{max(lost):,}"
    guarded = max(g_g["lost_per_run"])
    rows.append(
      [
        f"Local runner data-plane race ({g_u['mode']}, {g_u['expected']:,} elements "
        "through a materialized stage input; Beam data-plane loss section)",
        f"unguarded lost {span} of {g_u['expected']:,} elements in "
        f"{g_u['runs_with_loss']}/{g_u['completed']} runs; guarded 0 in "
        f"{g_g['completed'] - g_g['runs_with_loss']}/{g_g['completed']} runs"
        + (f" (up to {guarded:,} lost in the others)" if guarded else "")
        + f", each id once in {g_g['each_id_once_runs']}/{g_g['completed']}",
        "info",
      ]
    )


def _before_after_rows(result, rows) -> None:
  """Local speed kept across a change: every fedbeam row within 10% (before_after.json)."""
  if not result:
    return
  worst = {}
  for m in ("pipeline_s", "wall_s", "cpu_s"):
    ratios = {
      k: r["after"][m]["median"] / r["before"][m]["median"] for k, r in result["rows"].items()
    }
    worst[m] = max(ratios.items(), key=lambda kv: kv[1])
  scales = ", ".join(f"{s:g}x" for s in sorted({r["scale"] for r in result["rows"].values()}))
  rows.append(
    [
      f"Local speed kept, `{result['after']['commit']}` vs `{result['before']['commit']}`"
      f" (bench_pipeline's fedbeam rows at {scales}, "
      f"medians of {result['repeat']}): no row more than 10% slower",
      "slowest row after/before: "
      + "; ".join(
        f"{label} {worst[m][1]:.2f} ({worst[m][0]})"
        for m, label in (("pipeline_s", "pipeline time"), ("wall_s", "wall"), ("cpu_s", "CPU"))
      ),
      _verdict(worst["pipeline_s"][1] <= 1.10),
    ]
  )


def _dask_rows(result, rows) -> None:
  """An info row: the Shakespeare-sized prepare on Dask next to the local runner (dask.json)."""
  if not result:
    return
  local, dask = result["rows"]["local"], result["rows"]["dask"]
  rows.append(
    [
      f"`fedbeam prepare` on Dask (fedbeam's DaskRunner, LocalCluster of 2 worker "
      f"processes) vs the local runner, {result['clients']:,} text clients, medians of "
      f"{result['repeat']}; stores byte-identical",
      f"{dask['median_s']:.1f} s vs {local['median_s']:.1f} s "
      f"({_x(dask['median_s'] / local['median_s'])} slower: side inputs recomputed "
      "by Beam's DaskRunner)",
      "info",
    ]
  )


def _simulation_rows(sim, rows) -> None:
  if sim:
    c = sim["contenders"]
    tff_rps = c["tff_runtime"]["rounds_per_second"]
    loop_rps = c["fedbeam_loop"]["rounds_per_second"]
    share = sim["loop_round_split"]["input_fraction"]
    rows.append(
      [
        "Simulation loop rounds/s vs TFF's runtime (bench_simulation.py, digits-cnn, "
        "10 clients/round)",
        f"{loop_rps:.2f} vs {tff_rps:.2f} rounds/s ({_x(loop_rps / tff_rps)}); 2 per "
        f"device {c['fedbeam_loop_2_per_device']['rounds_per_second']:.2f}",
        "info",
      ]
    )
    rows.append(
      [
        "... input share < 10% of the loop's round (digits-cnn)",
        f"{100 * share:.0f}%",
        _verdict(share < 0.10),
      ]
    )


def write_summary(run_info: dict) -> str:
  rows, notes = summary_rows()
  mach = wl.machine()
  lines = [
    SUMMARY,
    "",
    "Every target of the benchmark suite, from the results in `bench/results/` (sections "
    "below give every row, min–max and the commands). Ratios compare medians of the same run; "
    '"fedbeam tensors path" is `client_tensors_fn(id)` + in-graph slicing of batches of 20, '
    "the other fedbeam paths are listed too. A peer is compared in its faster consumption mode "
    "(eager or `tf.function`).",
    "",
    "| target | measured | verdict |",
    "| --- | --- | --- |",
  ]
  for target, measured, verdict in rows:
    lines.append(f"| {target} | {measured} | {verdict} |")
  lines.append("")
  for note in filter(None, notes):
    lines += [note, ""]
  lines += [
    "Charts: [per-round time by method](results/per_round.png), "
    "[per-round reading vs dataset size](results/round_scaling.png), "
    "[loading vs number of clients](results/load_scaling.png), "
    "[pipeline time and memory at 1x, 3x and 10x](results/pipeline_scaling.png).",
    "",
    "![per-round time by method](results/per_round.png)",
    "",
  ]
  if run_info.get("steps"):
    lines += [
      "Last `python -m bench.run_all"
      + (" --full" if run_info.get("full") else "")
      + f"` ({run_info['started']}; a section re-run alone since then gives its own "
      "command and time): "
      + ", ".join(
        f"{s['step']} {s['wall_s'] / 60:.1f} min"
        + ("" if s["returncode"] == 0 else f" (exit {s['returncode']})")
        for s in run_info["steps"]
      )
      + f"; total {run_info['total_s'] / 60:.1f} min. Logs: `build/bench/logs/`.",
      "",
    ]
  lines += [
    f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['memory_gib']} GiB, "
    f"{mach['platform']}; each section gives the load average at its start (the machine "
    "was shared with other work while these ran: a load above 2 slows every row).",
    "",
  ]
  return "\n".join(lines)


def _update_intro() -> None:
  if not os.path.exists(wl.README):
    return
  with open(wl.README, encoding="utf-8") as f:
    text = f.read()
  old = "# Benchmarks\n\nBenchmarks against peers (not tests). Each section is written by its script.\n\n"
  if text.startswith(old):
    with open(wl.README, "w", encoding="utf-8") as f:
      f.write(wl.README_INTRO + text[len(old) :])


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(os.path.join(wl.DEFAULT_WORKDIR, "logs"), exist_ok=True)
  run_info = wl.read_json("run_all.json") or {}
  if not args.summary_only:
    skip = set(filter(None, args.skip.split(",")))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = {
      "started": started,
      "full": args.full,
      "quick": args.quick,
      "loadavg_at_start": list(os.getloadavg()),
      "steps": [],
    }
    total = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=wl.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name, cmd in steps(args):
      if name in skip:
        continue
      logf = os.path.join(wl.DEFAULT_WORKDIR, "logs", f"{name}.log")
      print(f"[run_all] {name}: {' '.join(cmd)} > {os.path.relpath(logf, wl.ROOT)}", flush=True)
      start = time.perf_counter()
      with open(logf, "w", encoding="utf-8") as out:
        rc = subprocess.call(
          cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=wl.ROOT, env=env
        )
      wall = time.perf_counter() - start
      print(f"[run_all] {name}: exit {rc} after {wall / 60:.1f} min", flush=True)
      info["steps"].append(
        {
          "step": name,
          "wall_s": wall,
          "returncode": rc,
          "command": " ".join(
            os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT + "/") else c for c in cmd
          ),
        }
      )
    info["total_s"] = time.perf_counter() - total
    info["loadavg_at_end"] = list(os.getloadavg())
    print(f"[run_all] total {info['total_s'] / 60:.1f} min", flush=True)
    if args.quick:
      return 0 if all(s["returncode"] == 0 for s in info["steps"]) else 1
    wl.write_json("run_all.json", info)
    run_info = info
  else:
    subprocess.call([wl.PYTHON, "-m", "bench.plot"], cwd=wl.ROOT)
  _update_intro()
  wl.write_readme_section(SUMMARY, write_summary(run_info))
  print(f"[run_all] wrote the summary in {os.path.relpath(wl.README, wl.ROOT)}", flush=True)
  return 0 if all(s["returncode"] == 0 for s in run_info.get("steps", [])) else 1


if __name__ == "__main__":
  sys.exit(main())

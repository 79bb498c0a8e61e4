"""Cohort throughput: the local cohort mode vs Ray (1 and 2 workers), and what Ray adds per pair.

Pairs: ``--pairs`` (default 8) variants of the built-in demo pair (:func:`iirp.demo.run.make_demo_pair`,
seeds 1..N: the ICBM template at 64x80x64, 2.5 mm, each with its own synthetic deformation), registered
with the exported demo model (:func:`iirp.demo.run.demo_engines`, onnxruntime, IterStop ``official``) and
the demo's model spacing, through the same library calls as ``iirp-run --pairs`` (``plan_cohort``, then
``run_plan`` or ``run_plan_on_ray``).

Configurations, run in rounds (every configuration once per round, in turn, so a busy moment of a shared
machine hits them alike; the best round is reported):

* ``local T``: the local cohort mode in a fresh process (as an ``iirp-run`` invocation is), onnxruntime and
  numba at T threads (T = 2: the libraries' defaults on this 2-core machine);
* ``ray W x C``: W Ray workers of C CPUs each (solver threads = C) on a local Ray cluster of 2 CPUs started
  once by this script (its start-up time is reported on its own).

For each: the steady rate (pairs per minute from the first pair handed out to the last result, i.e. without
start-up), the start-up (process or workers up to the first pair) and the wall time of the whole call.
Ray's overhead per pair is ``ray 1 x C`` minus ``local C`` seconds per pair (same thread count).

Usage::

    python benchmarks/cohort_scaling.py [--pairs 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _pairs(folder: Path, count: int, make: bool = True) -> list[Any]:
    """The demo pair variants in ``folder/pair<seed>/`` (written when ``make``)."""
    from iirp.runtime.pairs import ImagePair

    pairs = []
    for seed in range(1, count + 1):
        where = folder / f"pair{seed}"
        if make:
            from iirp.demo.run import make_demo_pair

            make_demo_pair(where, seed=seed)
        pairs.append(ImagePair(f"pair{seed}", where / "fixed.nii.gz", where / "moving.nii.gz",
                               moving_seg=where / "moving_seg.nii.gz", row=seed))
    return pairs


def _options() -> Any:
    from iirp.runtime.register import RegistrationOptions

    return RegistrationOptions()  # the demo model's 2.5 mm grid comes from its manifest


class _Clock:
    """Times of the first pair handed out and of the last result (from the cohort's events)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.failed = 0

    def __call__(self, event: Any) -> None:
        if event.kind == "started" and self.first is None:
            self.first = time.perf_counter()
        elif event.kind == "finished":
            self.last = time.perf_counter()
            self.failed += event.row["status"] != "ok"


def _local(args: argparse.Namespace) -> dict[str, Any]:
    """One local cohort run in this (fresh) process, started at ``args.launched`` (``time.time()``)."""
    t0 = time.perf_counter() - (time.time() - args.launched)  # the launch, on this process's clock
    from iirp.runtime.cohort import run_plan
    from iirp.runtime.cohort_state import plan_cohort
    from iirp.runtime.solver_spec import SolverSpec

    pairs = _pairs(Path(args.data), args.pairs, make=False)
    plan = plan_cohort(pairs, args.out, options=_options())
    solver = SolverSpec("ort", engines=args.engines, threads=args.threads).build()
    clock = _Clock()
    run_plan(plan, solver, on_event=clock)
    end = time.perf_counter()
    assert clock.first is not None
    return {"startup_s": clock.first - t0, "steady_s": clock.last - clock.first, "wall_s": end - t0,
            "failed": clock.failed}


def _run_local(data: Path, engines: Path, count: int, threads: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_local", "--data", str(data), "--engines", str(engines), "--pairs", str(count),
           "--threads", str(threads), "--out", str(out), "--launched", repr(time.time())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_ray(pairs: list[Any], engines: Path, workers: int, cpus: float, out: Path) -> dict[str, Any]:
    from iirp.runtime.cluster import ClusterOptions, run_plan_on_ray
    from iirp.runtime.cohort_state import plan_cohort
    from iirp.runtime.solver_spec import SolverSpec

    t0 = time.perf_counter()
    plan = plan_cohort(pairs, out, options=_options())
    clock = _Clock()
    cluster = ClusterOptions(workers=workers, cpus_per_worker=cpus)
    run_plan_on_ray(plan, SolverSpec("ort", engines=str(engines)), cluster, on_event=clock)
    end = time.perf_counter()
    assert clock.first is not None
    return {"startup_s": clock.first - t0, "steady_s": clock.last - clock.first, "wall_s": end - t0,
            "failed": clock.failed}


def _round_trip_ms(pair: Any, repeats: int = 50) -> float:
    """Median time (ms) of one actor call carrying what a pair's task carries (pair, folder, options) and
    returning a summary-sized row: Ray's own cost per pair, without any registration."""
    import statistics

    import ray

    from iirp.runtime.cohort_state import pending_row

    @ray.remote(num_cpus=1)
    class Echo:
        def run(self, pair: Any, root: str, options: Any, qc: bool, overwrite: bool) -> dict[str, Any]:
            return {"row": pending_row(pair), "pid": os.getpid()}

    echo = Echo.remote()  # type: ignore[attr-defined]
    ray.get(echo.run.remote(pair, "/tmp", _options(), False, False))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(echo.run.remote(pair, "/tmp", _options(), False, False))
        times.append((time.perf_counter() - t0) * 1e3)
    ray.kill(echo)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--_local", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--engines", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--from-json", action="store_true", help="re-render the report from cohort_scaling.json")
    args = parser.parse_args()
    if args._local:
        print(json.dumps(_local(args)))
        return
    if args.from_json:
        payload = json.loads((RESULTS / "cohort_scaling.json").read_text())
        (RESULTS / "cohort_scaling.md").write_text(report(payload))
        print(report(payload))
        return

    import ray

    from iirp.demo.run import demo_engines

    environment_before = environment()
    engines = demo_engines(progress=False)
    configs = [("local 2", "local", 2, 0), ("local 1", "local", 1, 0), ("ray 1 x 2", "ray", 1, 2.0),
               ("ray 1 x 1", "ray", 1, 1.0), ("ray 2 x 1", "ray", 2, 1.0)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in configs}
    with tempfile.TemporaryDirectory(prefix="cohort-scaling-") as tmp:
        root = Path(tmp)
        pairs = _pairs(root / "data", args.pairs)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        cluster_start_s = time.perf_counter() - t0
        try:
            round_trip_ms = _round_trip_ms(pairs[0])
            for round_ in range(args.rounds):
                for name, kind, n, cpus in configs:
                    out = root / f"out-{round_}-{name.replace(' ', '')}"
                    if kind == "local":
                        result = _run_local(root / "data", engines, args.pairs, n, out)
                    else:
                        result = _run_ray(pairs, engines, n, cpus, out)
                    results[name].append(result)
                    print(f"round {round_ + 1} {name}: {json.dumps(result)}", file=sys.stderr)
        finally:
            ray.shutdown()
    payload = {"environment": environment_before, "load_average_after": environment()["load_average"],
               "ray": ray.__version__, "pairs": args.pairs, "rounds": args.rounds, "cluster_start_s": cluster_start_s,
               "round_trip_ms": round_trip_ms, "runs": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cohort_scaling.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = report(payload)
    (RESULTS / "cohort_scaling.md").write_text(text)
    print(text)


def report(payload: dict[str, Any]) -> str:
    """The Markdown report of a run (``--from-json`` re-renders a saved one)."""
    env, pairs, results = payload["environment"], payload["pairs"], payload["runs"]
    best = {name: min(runs, key=lambda r: r["steady_s"]) for name, runs in results.items()}
    per_pair = {name: r["steady_s"] / pairs for name, r in best.items()}
    rows = []
    for name, r in best.items():
        rows.append([name, f"{60.0 / per_pair[name]:.1f}", f"{per_pair[name]:.2f}", f"{r['startup_s']:.1f}",
                     f"{r['wall_s']:.1f}", f"{60.0 * pairs / r['wall_s']:.1f}", r["failed"]])
    overhead = [[f"ray 1 x {c} vs local {c}", f"{per_pair[f'ray 1 x {c}'] - per_pair[f'local {c}']:+.3f}",
                 f"{100 * (per_pair[f'ray 1 x {c}'] / per_pair[f'local {c}'] - 1):+.1f} %"] for c in (1, 2)]
    two = per_pair["ray 1 x 1"] / per_pair["ray 2 x 1"]
    load = float(env["load_average"].split()[0])
    busy = load > 0.5 * env["cores"]
    return "\n".join([
        "# Cohort throughput: local cohort mode vs Ray",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores, "
        + ("shared with other jobs while this ran" if busy else "quiet")
        + f" (load average before: {env['load_average']}; after: {payload['load_average_after']})",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}, ray {payload['ray']}, "
        f"Python {env['python']}",
        f"- pairs: {pairs} variants of the demo pair (ICBM template 64x80x64 at 2.5 mm, seeds 1..{pairs}, with moving "
        "labels), demo model exported to ONNX, engine ort, IterStop official",
        f"- {payload['rounds']} rounds, every configuration once per round in turn; the round with the best steady "
        "rate is shown. `local T`: the local cohort mode in a fresh process, T solver threads; `ray W x C`: W workers "
        f"of C CPUs (= solver threads) on a local Ray cluster of 2 CPUs (started once: "
        f"{payload['cluster_start_s']:.1f} s, not included below)",
        "- steady: from the first pair handed out to the last result; start-up: from the launch of the local process "
        "(interpreter, imports, solver) or of the Ray workers (actor processes, imports, solver) to the first pair "
        "(onnxruntime sessions are made at the first pair, inside steady); wall: launch to the last result written",
        "",
        markdown_table(["configuration", "pairs/min (steady)", "s/pair (steady)", "start-up s", "wall s",
                        "pairs/min (wall)", "failed"], rows),
        "",
        "Ray's overhead per pair (same thread count, one worker; steady seconds per pair):",
        "",
        markdown_table(["comparison", "s/pair", "relative"], overhead),
        "",
        f"Ray's own cost of a task (an actor call carrying a pair's paths and options and returning its row, no "
        f"registration; median of 50): {payload['round_trip_ms']:.1f} ms. The rest of the difference is not "
        "dispatch: most likely Ray's own processes (raylet, GCS, agents) taking CPU time beside the worker, and the "
        "noise of a shared machine.",
        "",
        f"Two workers of 1 CPU ran {two:.2f}x the steady rate of one."
        + (f" The other jobs on this machine kept its load average at {load:.1f} on {env['cores']} cores: a second "
           "worker (like a second thread in `local 2`) found no idle core, so this is not the scaling of a quiet "
           "machine." if busy else ""),
        "",
        "Reproduce: `python benchmarks/cohort_scaling.py --pairs 8 --rounds 2` (writes this file and "
        "`cohort_scaling.json`; `--from-json` re-renders the file from the JSON).",
        "",
    ])

if __name__ == "__main__":
    main()

"""Cohorts on Ray: one local cluster (2 CPUs and 2 fake GPUs) for the module, tiny models, no network.

The cluster declares two GPUs that do not exist: Ray's resource accounting still hands them out
(distinct ids, ``CUDA_VISIBLE_DEVICES``), which is what the placement logic needs; the solvers stay
on the CPU. Workers are killed with SIGKILL from a watcher thread the moment they hold a partial
folder (its name carries the writer's pid), as a crash or the OOM killer would.
"""

from __future__ import annotations

import _thread
import csv
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support import blob, tiny_export, write_array

ray = pytest.importorskip("ray")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.atomic import PARTIAL_PREFIX  # noqa: E402
from iirp.cli import run_app  # noqa: E402
from iirp.runtime.cluster import ClusterOptions, start_workers, worker_count  # noqa: E402
from iirp.runtime.pairs import read_pairs  # noqa: E402
from iirp.runtime.register import RegistrationOptions  # noqa: E402
from iirp.runtime.solver_spec import SolverSpec  # noqa: E402

_PID = re.compile(re.escape(PARTIAL_PREFIX) + r"[A-Za-z0-9.-]+-(\d+)-")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """One local Ray cluster for the module; ``--ray local`` in this process uses it (it is connected)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    yield
    ray.shutdown()
    for sig, handler in handlers.items():  # ray.init replaced SIGTERM's
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("cluster")
    data, engines = tiny_export(root)
    (root / "broken.nii.gz").write_bytes(b"not an image")
    data["broken"] = root / "broken.nii.gz"
    c = 63.5  # 128^3 fixed image (32^3 model): a pair whose outputs take ~0.5 s to write, a window to kill in
    data["big_fixed"] = write_array(blob((c, c, c), 6.0, (128,) * 3), root / "big_fixed.nii.gz")
    data["big_moving"] = write_array(blob((c - 1.5, c + 1.5, c), 6.0, (128,) * 3), root / "big_moving.nii.gz")
    return data, engines


def _pairs_csv(path: Path, rows: list[tuple[str, Path, Path]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "fixed", "moving"])
        writer.writerows(rows)
    return path


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["id"] for r in rows}) == len(rows)  # one row per pair
    return {r["id"]: r for r in rows}


def _cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(run_app, [str(a) for a in args])


def _leftovers(root: Path) -> list[str]:
    """Partial folders anywhere, and pair folders without report.json."""
    bad = [str(p) for p in root.rglob("*") if p.name.startswith(PARTIAL_PREFIX)]
    bad += [str(p) for p in root.iterdir() if p.is_dir() and not (p / "report.json").is_file()]
    return bad


def _flow(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "displacement.nii.gz")))


class _Killer(threading.Thread):
    """SIGKILLs the process writing a pair's outputs (the pid in its partial folder's name), ``times[id]`` times;
    ``stop_driver`` instead stops this process the first time it sees one: ``SIGINT`` raises KeyboardInterrupt in
    the main thread (Ctrl-C), ``SIGTERM`` is sent to this process."""

    def __init__(self, root: Path, times: dict[str, int], stop_driver: str = "") -> None:
        super().__init__(daemon=True)
        self.root, self.times, self.stop_driver = root, dict(times), stop_driver
        self.killed: list[tuple[str, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seen: set[int] = set()
        while not self.stop.is_set() and any(self.times.values()):
            for pair_id, left in self.times.items():
                if not left:
                    continue
                try:
                    partials = [p for p in (self.root / pair_id).iterdir() if _PID.match(p.name) and any(p.iterdir())]
                except OSError:
                    continue
                for partial in partials:
                    pid = int(_PID.match(partial.name)[1])  # type: ignore[index]
                    if pid in seen:
                        continue
                    seen.add(pid)
                    self.times[pair_id] -= 1
                    self.killed.append((pair_id, pid))
                    if self.stop_driver == "SIGINT":
                        _thread.interrupt_main()
                    elif self.stop_driver == "SIGTERM":
                        os.kill(os.getpid(), signal.SIGTERM)
                    else:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.003)


def test_acceptance_four_pairs_one_corrupt(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 1, 3 ok and 1 failed, flows bit for bit those of the local mode; --resume reruns only the failed pair."""
    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", [
        ("a", data["fixed"], data["moving"]), ("bad", data["fixed"], data["broken"]),
        ("c", data["moving"], data["fixed"]), ("d", data["fixed"], data["fixed"]),
    ])
    args = ["--pairs", csv_path, "--engines", engines, "--iterstop", "rpnet"]
    # onnxruntime's last bits depend on its thread count: 1, as in the workers (--cpus-per-worker 1)
    local = _cli(*args, "-o", tmp_path / "local", "--threads", "1")
    assert local.exit_code == 1, local.output
    t0 = time.perf_counter()
    on_ray = _cli(*args, "-o", tmp_path / "ray", "--ray", "local", "--workers", "2")
    seconds = time.perf_counter() - t0
    assert on_ray.exit_code == 1, on_ray.output
    assert "3 of 4 pairs registered" in on_ray.stdout, on_ray.output
    assert "iirp-run: pair bad (row 2) failed: cannot read moving image" in on_ray.stderr
    assert on_ray.stderr.strip().splitlines()[-1] == "iirp-run: 1 pair(s) failed: bad"
    rows = _rows(tmp_path / "ray" / "summary.csv")
    assert [rows[i]["status"] for i in "a bad c d".split()] == ["ok", "failed", "ok", "ok"]
    local_rows = _rows(tmp_path / "local" / "summary.csv")
    for pair_id in ("a", "c", "d"):
        assert np.array_equal(_flow(tmp_path / "ray" / pair_id), _flow(tmp_path / "local" / pair_id)), pair_id
        assert rows[pair_id]["iterations"] == local_rows[pair_id]["iterations"]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["a", "c", "d", "summary.csv"]
    assert not _leftovers(tmp_path / "ray")
    print(f"4 pairs on Ray (2 workers, cluster up): {seconds:.1f} s")

    stamps = {p: (tmp_path / "ray" / p / "report.json").stat().st_mtime_ns for p in "acd"}
    resumed = _cli(*args, "-o", tmp_path / "ray", "--ray", "local", "--resume")
    assert resumed.exit_code == 1, resumed.output
    assert "resume: 3 of 4 pairs kept, 1 to run" in resumed.stderr
    assert {p: (tmp_path / "ray" / p / "report.json").stat().st_mtime_ns for p in "acd"} == stamps
    assert _rows(tmp_path / "ray" / "summary.csv") == rows | {"bad": _rows(tmp_path / "ray" / "summary.csv")["bad"]}


def test_killed_workers_are_restarted_and_their_pairs_retried(exported, tmp_path: Path) -> None:
    """A worker killed mid-write: its pair runs again and ends ok, once; killed twice: the pair fails with the cause."""
    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", [
        ("once", data["big_fixed"], data["big_moving"]), ("twice", data["big_fixed"], data["big_moving"]),
        ("small", data["fixed"], data["moving"]),
    ])
    out = tmp_path / "out"
    killer = _Killer(out, {"once": 1, "twice": 2})
    killer.start()
    try:
        result = _cli("--pairs", csv_path, "--engines", engines, "-o", out, "--iterstop", "rpnet", "--ray", "local")
    finally:
        killer.stop.set()
    assert result.exit_code == 1, result.output
    assert sorted(k for k, _ in killer.killed) == ["once", "twice", "twice"]
    rows = _rows(out / "summary.csv")
    assert list(rows) == ["once", "twice", "small"]
    assert rows["once"]["status"] == "ok" and rows["small"]["status"] == "ok"
    assert rows["twice"]["status"] == "failed" and rows["twice"]["error"].startswith("worker died twice: ")
    assert result.stderr.count("running it once more") == 2
    assert sorted(p.name for p in out.iterdir()) == ["once", "small", "summary.csv"]  # nothing of "twice"
    assert sorted(p.name for p in (out / "once").iterdir()) == ["displacement.nii.gz", "report.json", "warped.nii.gz"]
    report = json.loads((out / "once" / "report.json").read_text())
    assert set(report["output_files"]) == {"displacement.nii.gz", "warped.nii.gz"}
    assert not _leftovers(out)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_a_consistent_summary_and_resume_finishes(exported, tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGTERM) while a worker writes: exit 130 (143), finished pairs recorded, no partial folder; --resume
    runs the rest."""
    from iirp.clitools import _raise_terminated

    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", [
        ("small", data["fixed"], data["moving"]), ("big", data["big_fixed"], data["big_moving"]),
        ("small2", data["moving"], data["fixed"]),
    ])
    out = tmp_path / "out"
    args = ["--pairs", csv_path, "--engines", engines, "-o", out, "--iterstop", "rpnet", "--ray", "local",
            "--workers", "1"]
    killer = _Killer(out, {"big": 1}, stop_driver=how)
    ray_handler = signal.signal(signal.SIGTERM, _raise_terminated)  # what iirp-run's own process has
    # and SIGINT as in a terminal, even where pytest runs as a background job (SIGINT inherited ignored)
    int_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    killer.start()
    try:
        stopped = _cli(*args)
    finally:
        killer.stop.set()
        signal.signal(signal.SIGTERM, ray_handler)
        signal.signal(signal.SIGINT, int_handler)
    assert stopped.exit_code == (130 if how == "SIGINT" else 143), stopped.output
    what = "interrupted" if how == "SIGINT" else "terminated (signal 15)"
    assert killer.killed and f"iirp-run: {what}; 1 pair(s) finished" in stopped.stderr
    rows = _rows(out / "summary.csv")
    assert [rows[i]["status"] for i in ("small", "big", "small2")] == ["ok", "pending", "pending"]
    assert sorted(p.name for p in out.iterdir()) == ["small", "summary.csv"]
    assert not _leftovers(out)
    if how == "SIGTERM":
        return
    stamp = (out / "small" / "report.json").stat().st_mtime_ns
    resumed = _cli(*args[:-2], "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resume: 1 of 3 pairs kept, 2 to run" in resumed.stderr
    assert (out / "small" / "report.json").stat().st_mtime_ns == stamp
    assert [r["status"] for r in _rows(out / "summary.csv").values()] == ["ok"] * 3
    assert not _leftovers(out)


def test_no_worker_can_start_is_one_line(exported, tmp_path: Path) -> None:
    """Every worker fails to build its solver (the engines are not where the workers look): exit 2, nothing written."""
    data, _ = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", [("a", data["fixed"], data["moving"])])
    out = tmp_path / "out"
    result = _cli("--pairs", csv_path, "--engines", tmp_path / "absent", "-o", out, "--ray", "local")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"iirp-run: error: Ray worker 1 on .* \(pid \d+\): cannot build the solver: "
                                        r"engine folder .*absent: manifest.json not found", lines[0]), lines
    assert not out.exists()


def test_gpu_placement_with_fake_gpus(exported, tmp_path: Path) -> None:
    """Two workers of one GPU each: distinct GPU ids, CUDA_VISIBLE_DEVICES narrowed to it, the solver's device
    cuda:0; a CPU solver on such a worker registers a pair."""
    data, engines = exported
    options = ClusterOptions(gpus_per_worker=1)
    assert worker_count(ray.cluster_resources(), options, pairs=10) == (2, 2)
    assert worker_count({"CPU": 2.0, "GPU": 2.0}, ClusterOptions(gpus_per_worker=0.5), pairs=10) == (2, 2)
    with pytest.raises(Exception, match="no room for a worker of 1 CPUs and 1 GPUs"):
        worker_count({"CPU": 8.0}, options, pairs=10)

    cuda = SolverSpec("ort", engines=str(engines), device="cuda")
    options.check(cuda)
    actors = start_workers(cuda, options, 2)
    try:
        places = ray.get([a.placement.remote() for a in actors], timeout=120)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    assert sorted(p["gpu_ids"][0] for p in places) == ["0", "1"]
    for place in places:
        assert place["cuda_visible_devices"] == place["gpu_ids"][0] and place["device"] == "cuda:0", place

    cpu_actors = start_workers(SolverSpec("ort", engines=str(engines)), options, 2)
    try:
        prepared = ray.get([a.prepare.remote() for a in cpu_actors], timeout=120)
        assert sorted(p["gpu_ids"][0] for p in prepared) == ["0", "1"] and all(not p["error"] for p in prepared)
        assert {p["device"] for p in prepared} == {"cpu"}
        pair = read_pairs(_pairs_csv(tmp_path / "pairs.csv", [("a", data["fixed"], data["moving"])]))[0]
        result = ray.get(cpu_actors[0].run.remote(pair, str(tmp_path / "out"), RegistrationOptions(iterstop="rpnet"),
                                                  False, False), timeout=120)
    finally:
        for actor in cpu_actors:
            ray.kill(actor, no_restart=True)
    assert result["row"]["status"] == "ok" and (tmp_path / "out" / "a" / "report.json").is_file()

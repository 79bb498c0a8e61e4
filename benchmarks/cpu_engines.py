"""CPU engines on the full-size LPBA40 pair: registration core and the whole ``iirp-run`` process.

Released checkpoint (160x192x160), ``official`` IterStop, LPBA40 S05 <- S20 and S20 <- S05.

1. Registration core, same process, engines interleaved round-robin (whatever else the machine
   does falls on every engine alike): features + IterStop loop on the pair already on the model
   grid. Median of ``--rounds`` after one warm-up per engine. Engines: the authors' released
   ``IIRPNet.forward`` (with ``--authors CHECKOUT``), the PyTorch reference loop, onnxruntime fp32,
   OpenVINO fp32 and, where the CPU computes bf16 natively, OpenVINO bf16.
2. The whole ``iirp-run`` process per engine and direction (a subprocess with ``--moving-seg``):
   wall time, peak RSS (``wait4``), the report's stage times, iterations, mean Dice over the 48
   shared labels, folding, and the flow's difference from the reference run (max over the grid,
   and the 99th / 99.9th percentiles inside the fixed brain). One untimed run per engine first,
   so that every timed run finds the caches a second run finds (OpenVINO's compiled models and
   stage choice, numba); its load time is reported as the first run's cost. The memory options add
   ``ort --low-memory``, ``openvino --low-memory`` and ``openvino --slabs N`` processes, each compared
   with its engine's own run.

Writes ``<out>/cpu_engines.md`` and ``.json``.

    python benchmarks/cpu_engines.py [--engines DIR] [--rounds 3] [--authors CHECKOUT] [--slabs 4]
                                     [--no-low-memory] [--data ../shared/data]

``--authors``: a checkout of github.com/Torbjorn1997/IIRP-Net; its ``voxelmorph/torch/iirp.py`` is
loaded on its own (it imports nibabel: ``pip install nibabel``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from common import environment, markdown_table  # noqa: E402

from iirp.bench.environment import loadavg  # noqa: E402
from iirp.iterstop import parse_iterstop  # noqa: E402
from iirp.metrics import label_dice, shared_labels  # noqa: E402
from iirp.runtime import RegistrationOptions, prepare_pair  # noqa: E402
from iirp.runtime.engines.openvino import cpu_has_native_bf16  # noqa: E402
from iirp.runtime.engines.options import BackendOptions  # noqa: E402
from iirp.runtime.imageio import read_image  # noqa: E402
from iirp.runtime.solvers import make_solver  # noqa: E402

HERE = Path(__file__).resolve().parent
SUBJECTS = ("S05", "S20")


# --------------------------------------------------------------------------- the authors' code


def _authors_model(checkout: Path, checkpoint: Path) -> Any:
    """The authors' ``IIRPNet`` with the released weights, loaded from their own source files."""
    import inspect

    import torch

    if not hasattr(inspect, "getargspec"):  # their modelio.py uses it; Python 3.11 removed it
        inspect.getargspec = lambda func: inspect.getfullargspec(func)[:4]  # type: ignore[attr-defined]
    source = checkout / "voxelmorph" / "torch"
    package = types.ModuleType("iirp_authors")
    package.__path__ = [str(source)]  # type: ignore[attr-defined]
    sys.modules["iirp_authors"] = package
    for name in ("modelio", "iirp"):
        spec = importlib.util.spec_from_file_location(f"iirp_authors.{name}", source / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    model = sys.modules["iirp_authors.iirp"].IIRPNet.load(str(checkpoint), "cpu")
    model.eval()
    torch.set_grad_enabled(False)
    return model


class AuthorsSolver:
    """``IIRPNet.forward(moving, fixed)`` timed as one call; iterations from its own count."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: Any) -> Any:
        import torch

        with torch.no_grad():
            m = torch.from_numpy(moving)[None, None]
            f = torch.from_numpy(fixed)[None, None]
            _, flow, iterations = self.model(m, f)
        return types.SimpleNamespace(flow=flow[0].numpy(), iterations=list(iterations), timings_ms={})


# --------------------------------------------------------------------------- 1. registration core


def time_core(solvers: dict[str, Any], moving: np.ndarray, fixed: np.ndarray, rounds: int) -> dict[str, dict]:
    rule = parse_iterstop("official")
    out: dict[str, dict] = {}
    for name, solver in solvers.items():  # warm-up: sessions, compiled models, numba, allocator
        t0 = time.perf_counter()
        trace = solver.solve(moving, fixed, rule)
        out[name] = {"first_s": time.perf_counter() - t0, "iterations": trace.iterations, "flow": trace.flow,
                     "seconds": [], "stages": []}
        print(f"  warm-up {name}: {out[name]['first_s']:.1f} s {trace.iterations}", flush=True)
    for r in range(rounds):
        for name, solver in solvers.items():
            t0 = time.perf_counter()
            trace = solver.solve(moving, fixed, rule)
            out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["stages"].append(trace.timings_ms)
            assert trace.iterations == out[name]["iterations"], (name, trace.iterations)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {o['seconds'][-1]:.2f}" for n, o in out.items()), flush=True)
    for o in out.values():
        keys = [k for k in o["stages"][0] if k != "load"] if o["stages"] and o["stages"][0] else []
        o["stages"] = {k: statistics.median(s[k] for s in o["stages"]) / 1e3 for k in keys}
        o["median_s"] = statistics.median(o["seconds"])
    return out


# --------------------------------------------------------------------------- 2. whole process


#: Runs the command and prints its peak RSS (KiB) last on stderr. The command must be started from a small
#: process: Linux counts a child's peak RSS from its fork, so a child of this (large) benchmark process
#: would report this process's size.
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run_process(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """``(wall seconds, peak RSS in MiB)`` of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, int(lines[-1]) // 1024


def _mean_dice(fixed_seg: Path, warped_seg: Path, moving_seg: Path) -> float:
    f, w, m = (sitk.ReadImage(str(p)) for p in (fixed_seg, warped_seg, moving_seg))
    shared = shared_labels(sitk.GetArrayFromImage(f), sitk.GetArrayFromImage(m))
    return float(np.mean(list(label_dice(f, w, shared).values())))


def _field(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def time_processes(commands: dict[str, list[str]], brain: Path, tmp: Path, rounds: int) -> dict[str, dict]:
    """Every engine's ``iirp-run`` on both directions, interleaved; one untimed run per engine first."""
    out: dict[str, dict] = {}
    directions = [(SUBJECTS[0], SUBJECTS[1]), (SUBJECTS[1], SUBJECTS[0])]
    env = {**os.environ, "IIRP_CACHE_DIR": str(tmp / "cache")}  # empty at first: the first runs are cold
    for name, command in commands.items():
        folder = tmp / f"first-{len(out)}"
        fixed, moving = directions[0]
        wall, rss = run_process(command + _pair_args(brain, fixed, moving) + ["-o", str(folder)], env)
        report = json.loads((folder / "report.json").read_text())
        out[name] = {"first_wall_s": wall, "first_load_s": report["timings_ms"].get("load", 0.0) / 1e3,
                     "runs": {f"{f}<-{m}": [] for f, m in directions}}
        print(f"  first run {name}: {wall:.1f} s (load {out[name]['first_load_s']:.1f} s), {rss} MiB", flush=True)
    for r in range(rounds):
        for fixed, moving in directions:
            for name, command in commands.items():
                folder = tmp / f"run-{r}-{fixed}-{moving}-{list(commands).index(name)}"
                wall, rss = run_process(command + _pair_args(brain, fixed, moving) + ["-o", str(folder)], env)
                report = json.loads((folder / "report.json").read_text())
                out[name]["runs"][f"{fixed}<-{moving}"].append(
                    {"wall_s": wall, "peak_rss_mib": rss, "report": report, "folder": str(folder)})
                print(f"  round {r + 1} {fixed}<-{moving} {name}: {wall:.2f} s, {rss} MiB", flush=True)
    return out


def _pair_args(brain: Path, fixed: str, moving: str) -> list[str]:
    return [str(brain / f"LPBA40_{fixed}_vol.nii.gz"), str(brain / f"LPBA40_{moving}_vol.nii.gz"),
            "--moving-seg", str(brain / f"LPBA40_{moving}_seg.nii.gz")]


def _field_difference(run: dict, other: dict) -> np.ndarray:
    """``run``'s displacement field minus ``other``'s, ``(Z, Y, X, 3)`` float64 mm (= voxels here)."""
    return _field(Path(run["folder"]) / "displacement.nii.gz") - _field(Path(other["folder"]) / "displacement.nii.gz")


def _flow_max_diff(run: dict, other: dict) -> float:
    """Largest |difference| of two runs' displacement fields (any component, mm)."""
    return float(np.abs(_field_difference(run, other)).max())


def accuracy(processes: dict[str, dict], brain: Path, reference: str) -> dict[str, dict]:
    """Per engine and direction: iterations, Dice, folding, flow difference from the reference run."""
    result: dict[str, dict] = {}
    for name, record in processes.items():
        result[name] = {}
        for direction, runs in record["runs"].items():
            fixed, moving = direction.split("<-")
            run = runs[-1]
            ref = processes[reference]["runs"][direction][-1]
            diff = np.linalg.norm(_field_difference(run, ref), axis=-1)  # mm = voxels
            brain_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(brain / f"LPBA40_{fixed}_vol.nii.gz"))) > 0.1
            inside = diff[brain_mask]
            result[name][direction] = {
                "iterations": run["report"]["iterations"],
                "dice": _mean_dice(brain / f"LPBA40_{fixed}_seg.nii.gz", Path(run["folder"]) / "warped_seg.nii.gz",
                                   brain / f"LPBA40_{moving}_seg.nii.gz"),
                "folding": run["report"]["folding_fraction"],
                "flow_diff_max": float(diff.max()),
                "flow_diff_p99": float(np.percentile(inside, 99)),
                "flow_diff_p999": float(np.percentile(inside, 99.9)),
                "precision": run["report"]["precision"],
                "stage_backends": run["report"].get("stage_backends"),
            }
    return result


# --------------------------------------------------------------------------- report


def _stage_text(stages: dict[str, float]) -> str:
    order = ["features", "estimator_4", "estimator_3", "estimator_2", "estimator_1", "kernels", "score"]
    return ", ".join(f"{k.replace('estimator_', 'E')} {stages[k]:.2f}" for k in order if k in stages)


def render(env: dict, core: dict, processes: dict, acc: dict, note: dict) -> str:
    base = core["reference"]["median_s"]
    ort = core["ort fp32"]["median_s"]
    core_rows = []
    for name, o in core.items():
        core_rows.append([name, f"{o['median_s']:.2f}", f"{base / o['median_s']:.2f}x", f"{ort / o['median_s']:.2f}x",
                          o["iterations"], _stage_text(o["stages"]) or "(one call)"])
    proc_rows = []
    ort_wall = statistics.median(r["wall_s"] for runs in processes["ort"]["runs"].values() for r in runs)
    for name, record in processes.items():
        runs = [r for rs in record["runs"].values() for r in rs]
        wall = statistics.median(r["wall_s"] for r in runs)
        t = {k: statistics.median(r["report"]["timings_ms"].get(k, 0.0) for r in runs) / 1e3
             for k in ("read", "preprocess", "iirp", "field", "warp", "write")}
        proc_rows.append([
            name, f"{wall:.2f}", f"{ort_wall / wall:.2f}x", f"{t['iirp']:.2f}",
            f"read {t['read']:.2f}, preprocess {t['preprocess']:.2f}, field {t['field']:.2f}, warp {t['warp']:.2f}, "
            f"write {t['write']:.2f}",
            f"{max(r['peak_rss_mib'] for r in runs)}",
            f"{record['first_wall_s']:.1f} (load {record['first_load_s']:.1f})",
        ])
    acc_rows = []
    for name, per_direction in acc.items():
        for direction, a in per_direction.items():
            acc_rows.append([name, direction, a["precision"], a["iterations"], f"{a['dice']:.4f}",
                             f"{a['dice'] - acc['reference'][direction]['dice']:+.4f}", f"{a['flow_diff_max']:.1e}",
                             f"{a['flow_diff_p99']:.1e} / {a['flow_diff_p999']:.1e}", f"{a['folding']:.5f}"])
    backends = next(iter(acc["openvino"].values()))["stage_backends"]
    lines = [
        "# CPU engines: LPBA40, 160x192x160, released checkpoint, `official` IterStop",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"bf16: {note['bf16']}",
        f"Made by `python benchmarks/cpu_engines.py {' '.join(note['argv'])}` on {note['date']}; load average "
        f"before {note['load_before']}, after {note['load_after']}.",
        "",
        "## Registration core (features + IterStop loop, pair already on the model grid)",
        "",
        f"S05 <- S20, same process, engines interleaved; median of {note['rounds']} rounds after a warm-up (so, as "
        "for a cohort's later pairs, with whatever each engine keeps between pairs); seconds.",
        "",
        markdown_table(["engine", "seconds", "vs reference", "vs ort fp32", "iterations", "per stage (s)"], core_rows),
        "",
        "## Whole `iirp-run` process (read, resample, register, field, warp, write; `--moving-seg`)",
        "",
        f"Both directions, {note['rounds']} rounds each, interleaved; median wall seconds of the process (Python start "
        "included) after one untimed first run per engine, whose cost (compiling and caching) is the last column; "
        "peak RSS is the largest of any run. `read` is wall time: `iirp-run` loads numba and the CPU kernels on a "
        "background thread meanwhile (README, CPU engines), and the two share Python's interpreter lock.",
        "",
        markdown_table(["engine", "process (s)", "vs ort", "register (s)", "the rest (s)", "peak RSS (MiB)",
                        "first run (s)"], proc_rows),
        "",
        f"Engine `openvino` ran its stages on: {backends}.",
        "",
        *(["Memory options (README, Memory): `--low-memory` (onnxruntime without its CPU arena; OpenVINO with the "
           "finest estimator in 8 slabs along X and each stage unloaded after the pair) and `--slabs N`. Largest "
           "|flow difference| of each from its engine's own run (any component, mm = voxels): "
           + "; ".join(f"{name}: " + ", ".join(f"{d} {v:.1e}" if v else f"{d} 0 (bit-identical)"
                                              for d, v in per.items())
                       for name, per in note["variant_vs_engine"].items()) + ".", ""]
          if note.get("variant_vs_engine") else []),
        "## Accuracy (the last timed run of each)",
        "",
        "Mean Dice over the 48 labels both subjects share; flow difference from the reference run in voxels "
        "(max over the grid; 99th / 99.9th percentile inside the fixed brain).",
        "",
        markdown_table(["engine", "pair", "precision", "iterations", "Dice", "vs reference", "max flow diff",
                        "p99 / p99.9", "folding"], acc_rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--engines", type=Path, default=None, help="an iirp-export folder of the released model "
                        "(default: exported into a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--authors", type=Path, default=None, help="checkout of Torbjorn1997/IIRP-Net")
    parser.add_argument("--slabs", type=int, nargs="*", default=[4],
                        help="also time `--engine openvino --slabs N` processes (memory rows; none: no such rows)")
    parser.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also time `--low-memory` processes of ort and openvino")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    ckpt = args.data / "mindboggle" / "mind.pt"
    brain = args.data / "brain"
    bf16 = cpu_has_native_bf16()
    note = {"argv": sys.argv[1:], "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"),
            "bf16": "native on this CPU: OpenVINO bf16 rows included" if bf16 else
            "this CPU has no native bf16 (OpenVINO lists no BF16 capability): `auto` runs fp32 and there is no bf16 "
            "row; bf16 needs AVX512-BF16 or AMX"}
    with tempfile.TemporaryDirectory(prefix="iirp-cpu-engines-") as tmp_name:
        tmp = Path(tmp_name)
        engines = args.engines
        if engines is None:
            from iirp.export import export_checkpoint

            engines = tmp / "engines"
            export_checkpoint(ckpt, engines, progress=False)
        fixed = read_image(brain / "LPBA40_S05_vol.nii.gz", "fixed")
        moving = read_image(brain / "LPBA40_S20_vol.nii.gz", "moving")
        pair = prepare_pair(fixed, moving, (160, 192, 160), RegistrationOptions())

        solvers: dict[str, Any] = {}
        if args.authors is not None:
            solvers["authors' IIRPNet.forward"] = AuthorsSolver(_authors_model(args.authors, ckpt))
        solvers["reference"] = make_solver("reference", checkpoint=ckpt)
        solvers["ort fp32"] = make_solver("ort", engines=engines)
        solvers["openvino fp32"] = make_solver("openvino", engines=engines, options=BackendOptions(precision="fp32"))
        if bf16:
            solvers["openvino bf16"] = make_solver("openvino", engines=engines,
                                                   options=BackendOptions(precision="bf16"))
        if args.low_memory:  # repeated pairs in one process, as in a cohort: what the memory options cost there
            solvers["ort fp32 --low-memory"] = make_solver("ort", engines=engines,
                                                           options=BackendOptions(low_memory=True))
            solvers["openvino fp32 --low-memory"] = make_solver(
                "openvino", engines=engines, options=BackendOptions(precision="fp32", low_memory=True))
        note["load_before"] = loadavg()
        print("registration core", flush=True)
        core = time_core(solvers, pair.moving, pair.fixed, args.rounds)
        ref_flow = core["reference"]["flow"]
        for o in core.values():
            o["max_flow_diff_vs_reference"] = float(np.abs(o.pop("flow") - ref_flow).max())
        del solvers

        run = ["iirp-run"]
        commands = {
            "reference": run + ["--checkpoint", str(ckpt), "--engine", "reference"],
            "ort": run + ["--engines", str(engines), "--engine", "ort"],
            "openvino": run + ["--engines", str(engines), "--engine", "openvino"],
        }
        if bf16:
            commands["openvino fp32"] = run + ["--engines", str(engines), "--engine", "openvino", "--precision", "fp32"]
        if args.low_memory:
            for name in ("ort", "openvino"):
                commands[f"{name} --low-memory"] = commands[name] + ["--low-memory"]
        for n in args.slabs:
            commands[f"openvino --slabs {n}"] = commands["openvino"] + ["--slabs", str(n)]
        print("whole process", flush=True)
        processes = time_processes(commands, brain, tmp, args.rounds)
        note["load_after"] = loadavg()
        acc = accuracy(processes, brain, "reference")
        note["variant_vs_engine"] = {  # "ENGINE --option" against ENGINE's own run
            name: {d: _flow_max_diff(processes[name]["runs"][d][-1], processes[name.split()[0]]["runs"][d][-1])
                   for d in processes[name]["runs"]}
            for name in processes if " --" in name}

    env = environment()
    text = render(env, core, processes, acc, note)
    for record in processes.values():
        for runs in record["runs"].values():
            for r in runs:
                r["report"] = {k: r["report"][k] for k in ("iterations", "precision", "timings_ms", "stage_backends")
                               if k in r["report"]}
                r.pop("folder", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_engines.md").write_text(text)
    (args.out / "cpu_engines.json").write_text(json.dumps(
        {"environment": env, "note": note, "core": core, "processes": processes, "accuracy": acc}, indent=1,
        default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()

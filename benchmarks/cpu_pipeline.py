"""CPU end-to-end and per-stage latency: PyTorch reference vs the onnxruntime pipeline.

Full-size LPBA40 pair (S05 fixed, S20 moving), released checkpoint, ``official``
IterStop. Times the registration core (features + IterStop loop) on arrays
already on the model grid, the same work for every engine; file I/O and
geometry are identical for all engines and left out. Median of --repeats runs
after one warm-up. Then, once per engine, the whole ``register_files`` with
the moving labels: iterations, the largest flow difference from the reference
(voxels), and mean Dice over the 48 shared labels (SimpleITK label overlap).
Writes ``benchmarks/results/cpu_pipeline.md`` and ``.json``.

    python benchmarks/cpu_pipeline.py [--repeats 3] [--fp16] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from common import environment, markdown_table  # noqa: E402

from iirp.iterstop import parse_iterstop  # noqa: E402
from iirp.metrics import label_dice, shared_labels  # noqa: E402
from iirp.runtime import RegistrationOptions, TorchSolver, prepare_pair, register_files  # noqa: E402
from iirp.runtime.imageio import read_image  # noqa: E402
from iirp.runtime.pipeline import EngineSolver  # noqa: E402


def _time_interleaved(solvers: dict, moving, fixed, rule, repeats: int) -> dict[str, dict]:
    """Warm each solver up once, then time ``repeats`` rounds of every solver in turn.

    Round-robin, so that whatever else the machine does falls on every engine alike.
    Returns per solver: the warm-up trace, the end-to-end times (ms) and the median per stage (ms).
    """
    out = {}
    for name, solver in solvers.items():  # warm-up: sessions, numba compilation, allocator
        out[name] = {"trace": solver.solve(moving, fixed, rule), "totals": [], "stages": []}
    for _ in range(repeats):
        for name, solver in solvers.items():
            t0 = time.perf_counter()
            trace = solver.solve(moving, fixed, rule)
            out[name]["totals"].append((time.perf_counter() - t0) * 1e3)
            out[name]["stages"].append(trace.timings_ms)
    for r in out.values():
        r["stages"] = {k: statistics.median(s[k] for s in r["stages"]) for k in r["stages"][0]}
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _mean_dice(fixed_seg: sitk.Image, warped_seg: sitk.Image, moving_seg: sitk.Image) -> float:
    """Mean Dice over the labels (> 0) both label maps share (SimpleITK LabelOverlapMeasures)."""
    shared = shared_labels(sitk.GetArrayFromImage(fixed_seg), sitk.GetArrayFromImage(moving_seg))
    return float(np.mean(list(label_dice(fixed_seg, warped_seg, shared).values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--fp16", action="store_true", help="also time an fp16 export")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                        help="ONNX exporter for the timed files (torchscript: seconds; dynamo: minutes at full size)")
    args = parser.parse_args()

    from iirp.export import export_checkpoint

    ckpt = args.data / "mindboggle" / "mind.pt"
    brain = args.data / "brain"
    fixed = read_image(brain / "LPBA40_S05_vol.nii.gz", "fixed")
    moving = read_image(brain / "LPBA40_S20_vol.nii.gz", "moving")
    pair = prepare_pair(fixed, moving, (160, 192, 160), RegistrationOptions())
    rule = parse_iterstop("official")

    rows, accuracy_rows, results = [], [], {}
    reference = TorchSolver(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        solvers = {"torch (reference loop)": reference}
        for precision in ["fp32"] + (["fp16"] if args.fp16 else []):
            folder = Path(tmp) / precision
            export_checkpoint(ckpt, folder, precision=precision, verify=False, progress=False, exporter=args.exporter)
            solvers[f"ort {precision}"] = EngineSolver(folder, "ort")
        fixed_seg = sitk.ReadImage(str(brain / "LPBA40_S05_seg.nii.gz"))
        moving_seg = sitk.ReadImage(str(brain / "LPBA40_S20_seg.nii.gz"))
        load_before = _loadavg()
        timed = _time_interleaved(solvers, pair.moving, pair.fixed, rule, args.repeats)
        load_after = _loadavg()
        reference_flow = timed["torch (reference loop)"]["trace"].flow
        for name, solver in solvers.items():
            trace = timed[name]["trace"]
            out = Path(tmp) / f"out-{len(results)}"
            report = register_files(brain / "LPBA40_S05_vol.nii.gz", brain / "LPBA40_S20_vol.nii.gz", solver, out,
                                    moving_seg=brain / "LPBA40_S20_seg.nii.gz", options=RegistrationOptions())
            dice = _mean_dice(fixed_seg, sitk.ReadImage(str(out / "warped_seg.nii.gz")), moving_seg)
            totals = timed[name]["totals"]
            results[name] = {
                "total_ms": totals, "stages_ms": timed[name]["stages"], "iterations": trace.iterations,
                "estimator_passes": report["estimator_passes"], "report_iterations": report["iterations"],
                "max_flow_diff_voxels": float(np.abs(trace.flow - reference_flow).max()), "dice": dice,
            }
            print(name, f"{statistics.median(totals) / 1e3:.2f}s", trace.iterations, f"Dice {dice:.5f}", flush=True)
    base = statistics.median(results["torch (reference loop)"]["total_ms"])
    base_dice = results["torch (reference loop)"]["dice"]
    for name, r in results.items():
        median = statistics.median(r["total_ms"])
        stages = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in r["stages_ms"].items())
        rows.append([name, f"{median / 1e3:.2f}", f"{base / median:.2f}x", r["iterations"], stages])
        accuracy_rows.append([name, r["iterations"], r["estimator_passes"], f"{r['max_flow_diff_voxels']:.2e}",
                              f"{r['dice']:.5f}", f"{r['dice'] - base_dice:+.5f}"])

    env = environment()
    report = [
        "# CPU pipeline latency: LPBA40 S05 <- S20, 160x192x160, released checkpoint, `official`",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"Median of {args.repeats} runs after one warm-up, engines interleaved round-robin; registration core only "
        f"(features + IterStop loop). ONNX files from the {args.exporter} exporter. "
        f"Load average (1, 5, 15 min) before timing: {load_before}; after: {load_after}.",
        "",
        markdown_table(["engine", "end to end (s)", "speedup vs reference", "iterations", "per stage (s)"], rows),
        "",
        "Accuracy, one `register_files` run per engine (same pair, `official`): flow difference from the reference",
        "on the model grid (max abs, voxels); mean Dice over the 48 shared labels of the warped S20 labels vs S05.",
        "",
        markdown_table(
            ["engine", "iterations", "estimator passes", "max flow diff (voxel)", "Dice", "Dice - reference"],
            accuracy_rows,
        ),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_pipeline.md").write_text("\n".join(report))
    (args.out / "cpu_pipeline.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    print("\n".join(report))


if __name__ == "__main__":
    main()

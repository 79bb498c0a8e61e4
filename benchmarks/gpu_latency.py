"""GPU latency: the eager PyTorch reference vs the GPU pipeline (cuDNN engine, fp32 and fp16).

Inputs come from ``benchmarks/prepare_device_inputs.py`` (no SimpleITK and no data
folder needed here): the LPBA40 pair S05 (fixed) <- S20 (moving) on the
160x192x160 model grid, its label maps and the released checkpoint. A second,
larger case is the same pair resampled (trilinear, ``align_corners=True``) to
200x240x200, 1.95x the voxels (a multiple of 8 on every axis, same anatomy).
IterStop rule ``official`` throughout.

Per size, per solver, ``--warmup`` runs then ``--repeats`` timed runs, each from
host arrays to a host flow (upload, features, IterStop loop, download), timed
with CUDA events on the current stream:

* ``reference fp32``: :func:`iirp.model.reference.register_tensors` on CUDA (eager
  PyTorch: full-resolution upsample + warp + NCC at every check), TF32 off;
* ``pipeline fp32`` / ``pipeline fp16``: the one pipeline on the CUDA placement,
  :meth:`iirp.runtime.pipeline.EngineSolver.from_checkpoint` with ``device="cuda"``
  (torch stages on cuDNN, channels-last 3D, CuPy arrays and the CUDA kernels on one stream;
  fp16 = network in half precision, flows float32), TF32 off.

Reported: median and p90 end-to-end latency, per-stage GPU time of the pipeline
(CUDA events), peak GPU memory (``torch.cuda.max_memory_allocated`` over one run plus
what CuPy's memory pool holds after it; the cuda.core scratch of the score kernel,
40 bytes per 256 voxels, is not counted), iterations; on the 160x192x160 pair, the flow difference and mean Dice
(48 shared labels, moving labels warped with the nearest-label CUDA kernel, Dice
in numpy) against the CPU pipeline (numba kernels, torch stages on the CPU, same
weights); and the fused score kernel's achieved bandwidth against the card's
peak (memory clock x bus width x 2, from the device attributes).

    PYTHONPATH=$PWD python benchmarks/gpu_latency.py --inputs benchmarks/device_inputs --out OUT \
        [--repeats 20] [--warmup 3] [--score-repeats 50] [--no-cpu] [--no-large]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from common import environment, markdown_table  # noqa: E402

from iirp.iterstop import parse_iterstop  # noqa: E402
from iirp.metrics import mean_dice_arrays  # noqa: E402

BASE_SHAPE = (160, 192, 160)
LARGE_SHAPE = (200, 240, 200)
#: fp32 pipeline vs CPU pipeline: largest flow difference accepted (voxels).
FLOW_ATOL_FP32 = 1e-3


def load_inputs(folder: Path) -> dict[str, Any]:
    with np.load(folder / "lpba40_pair.npz") as data:
        pair = {k: data[k] for k in data.files}
    pair["ckpt"] = folder / "mind.pt"
    pair["meta"] = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return pair


def resample(torch: Any, volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear (align_corners=True) resize of an ``(X, Y, Z)`` float32 volume on the GPU, back to the host."""
    x = torch.from_numpy(volume).cuda()[None, None]
    y = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=True)
    return y[0, 0].clamp(0.0, 1.0).cpu().numpy()


def reference_runner(torch: Any, ckpt: Path, shape: tuple[int, int, int], moving: np.ndarray, fixed: np.ndarray,
                     rule: Any) -> Callable[[], tuple[np.ndarray, Any]]:
    from iirp.model import load_checkpoint
    from iirp.model.reference import register_tensors

    fmt = torch.channels_last_3d
    net, _ = load_checkpoint(ckpt, size=shape)
    net = net.cuda().to(memory_format=fmt)

    def run() -> tuple[np.ndarray, Any]:
        m = torch.from_numpy(moving).cuda()[None, None].contiguous(memory_format=fmt)
        f = torch.from_numpy(fixed).cuda()[None, None].contiguous(memory_format=fmt)
        trace = register_tensors(net, m, f, rule)  # TF32 is off for the whole process (main)
        return trace.flow[0].float().cpu().numpy(), trace

    return run


def pipeline_runner(ckpt: Path, shape: tuple[int, int, int], precision: str, moving: np.ndarray, fixed: np.ndarray,
                    rule: Any) -> Callable[[], tuple[np.ndarray, Any]]:
    from iirp.runtime.engines.options import BackendOptions
    from iirp.runtime.pipeline import EngineSolver

    solver = EngineSolver.from_checkpoint(ckpt, "cuda", BackendOptions(precision=precision), size=shape)

    def run() -> tuple[np.ndarray, Any]:
        trace = solver.solve(moving, fixed, rule)
        return trace.flow, trace

    return run


def measure(torch: Any, run: Callable[[], tuple[np.ndarray, Any]], warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    totals, stages = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        flow, trace = run()
        end.record()
        end.synchronize()
        totals.append(float(start.elapsed_time(end)))
        stages.append(dict(getattr(trace, "timings_ms", {}) or {}))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    pool = _cupy_pool()
    if pool is not None:
        pool.free_all_blocks()
    flow, trace = run()
    peak = torch.cuda.max_memory_allocated() + (pool.total_bytes() if pool is not None else 0)
    keys = [k for k in stages[0] if all(k in s for s in stages)] if stages else []
    return {
        "total_ms": totals, "median_ms": statistics.median(totals), "p90_ms": float(np.percentile(totals, 90)),
        "stages_ms": {k: statistics.median(s[k] for s in stages) for k in keys},
        "peak_mib": peak / 2**20, "resident_before_mib": resident / 2**20,
        "iterations": list(trace.iterations), "estimator_passes": trace.estimator_passes, "flow": flow,
    }


def _cupy_pool() -> Any:
    """CuPy's default memory pool (the pipeline's arrays), or None without CuPy."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy.get_default_memory_pool()


def score_bandwidth(torch: Any, shape: tuple[int, int, int], factor: int, repeats: int, peak: float) -> dict[str, Any]:
    """The fused score at one size and factor: per call (events, incl. readback + sync) and kernel time (profiler)."""
    from iirp.kernels import cuda_ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    moving = torch.rand(shape, device="cuda", generator=gen)
    fixed = torch.rand(shape, device="cuda", generator=gen)
    flow = 2.0 * torch.randn((3, *(s // factor for s in shape)), device="cuda", generator=gen)
    n = int(np.prod(shape))
    nbytes = 8 * n + 12 * n // factor**3  # moving + fixed read once, the coarse flow once
    for _ in range(3):
        cuda_ops.fused_ncc_score(moving, fixed, flow, factor)
    calls = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        cuda_ops.fused_ncc_score(moving, fixed, flow, factor)
        end.record()
        end.synchronize()
        calls.append(float(start.elapsed_time(end)))
    kernel_us = None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                cuda_ops.fused_ncc_score(moving, fixed, flow, factor)
        for item in prof.key_averages():
            if "iirp_score_partials" in item.key:
                total = getattr(item, "device_time_total", None) or getattr(item, "cuda_time_total", 0.0)
                kernel_us = float(total) / max(int(item.count), 1)
    except Exception as err:  # noqa: BLE001 - profiler unavailable: keep the per-call numbers
        print(f"profiler: {err}", flush=True)
    call_ms = statistics.median(calls)
    result = {"shape": list(shape), "factor": factor, "bytes": nbytes, "call_ms": call_ms,
              "call_gbs": nbytes / (call_ms * 1e-3) / 1e9, "kernel_us": kernel_us, "peak_gbs": peak / 1e9}
    if kernel_us:
        result["kernel_gbs"] = nbytes / (kernel_us * 1e-6) / 1e9
        result["kernel_fraction_of_peak"] = nbytes / (kernel_us * 1e-6) / peak if peak else None
    return result


def cpu_flow(pair: dict[str, Any], rule: Any) -> tuple[np.ndarray, list[int], float]:
    """The CPU pipeline (numba kernels, torch stages on the CPU): flow, iterations, seconds."""
    from iirp.runtime.pipeline import EngineSolver

    solver = EngineSolver.from_checkpoint(pair["ckpt"])
    solver.load()
    t0 = time.perf_counter()
    trace = solver.solve(pair["moving"], pair["fixed"], rule)
    return trace.flow, list(trace.iterations), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, default=Path(__file__).resolve().parent / "device_inputs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--score-repeats", type=int, default=50)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU pipeline (no Dice / flow comparison)")
    parser.add_argument("--no-large", action="store_true", help="skip the 200x240x200 case")
    args = parser.parse_args()

    import torch

    from iirp.kernels import cuda_build, cuda_ops

    if not torch.cuda.is_available():
        raise SystemExit("gpu_latency.py needs a CUDA device")
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for the reference too
    device = torch.cuda.current_device()
    peak = cuda_build.peak_memory_bandwidth(device)
    pair = load_inputs(args.inputs)
    rule = parse_iterstop("official")
    cases = {"160x192x160": (BASE_SHAPE, pair["moving"], pair["fixed"])}
    if not args.no_large:
        cases["200x240x200"] = (LARGE_SHAPE, resample(torch, pair["moving"], LARGE_SHAPE),
                                resample(torch, pair["fixed"], LARGE_SHAPE))

    results: dict[str, dict[str, Any]] = {}
    for case, (shape, moving, fixed) in cases.items():
        runners = {
            "reference fp32": lambda s=shape, m=moving, f=fixed: reference_runner(torch, pair["ckpt"], s, m, f, rule),
            "pipeline fp32": lambda s=shape, m=moving, f=fixed: pipeline_runner(pair["ckpt"], s, "fp32", m, f, rule),
            "pipeline fp16": lambda s=shape, m=moving, f=fixed: pipeline_runner(pair["ckpt"], s, "fp16", m, f, rule),
        }
        for name, build in runners.items():
            results.setdefault(case, {})[name] = measure(torch, build(), args.warmup, args.repeats)
            r = results[case][name]
            print(f"{case} {name}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
                  f"{r['iterations']}, peak {r['peak_mib']:.0f} MiB", flush=True)
            _save_partial(args.out, results)
            torch.cuda.empty_cache()

    accuracy: dict[str, Any] = {}
    base = results["160x192x160"]
    labels = np.intersect1d(np.unique(pair["fixed_seg"]), np.unique(pair["moving_seg"]))
    labels = labels[labels > 0]
    moving_seg = torch.from_numpy(pair["moving_seg"]).cuda()

    def dice_of(flow: np.ndarray) -> float:
        warped = cuda_ops.warp_labels(moving_seg, torch.from_numpy(np.ascontiguousarray(flow)).cuda())
        return mean_dice_arrays(pair["fixed_seg"], warped.cpu().numpy(), labels)

    cpu = None
    if not args.no_cpu:
        flow, iterations, seconds = cpu_flow(pair, rule)
        cpu = {"flow": flow, "iterations": iterations, "seconds": seconds, "dice": dice_of(flow)}
        print(f"CPU pipeline: {iterations}, {seconds:.1f} s, Dice {cpu['dice']:.5f}", flush=True)
    for name, r in base.items():
        entry: dict[str, Any] = {"iterations": r["iterations"], "dice": dice_of(r["flow"])}
        if cpu is not None:
            entry["max_flow_diff_vs_cpu"] = float(np.abs(r["flow"] - cpu["flow"]).max())
            entry["dice_minus_cpu"] = entry["dice"] - cpu["dice"]
            entry["same_iterations_as_cpu"] = r["iterations"] == cpu["iterations"]
        accuracy[name] = entry
    parity = None
    if cpu is not None:
        a = accuracy["pipeline fp32"]
        parity = bool(a["same_iterations_as_cpu"] and a["max_flow_diff_vs_cpu"] <= FLOW_ATOL_FP32)

    bandwidth = [score_bandwidth(torch, shape, factor, args.score_repeats, peak)
                 for shape in [c[0] for c in cases.values()] for factor in (1, 2, 8)]

    props = torch.cuda.get_device_properties(device)
    env = environment(("numpy", "torch", "numba", "cuda-core", "cupy", "onnxruntime"))
    env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), peak_bandwidth_gbs=peak / 1e9)
    report = _markdown(env, args, results, accuracy, cpu, parity, bandwidth)
    args.out.mkdir(parents=True, exist_ok=True)
    for case in results.values():
        for r in case.values():
            r.pop("flow", None)
    if cpu is not None:
        cpu.pop("flow")
    payload = {"environment": env, "repeats": args.repeats, "warmup": args.warmup, "results": results,
               "accuracy": accuracy, "cpu_pipeline": cpu, "fp32_parity_with_cpu": parity,
               "score_bandwidth": bandwidth}
    (args.out / "gpu_latency.md").write_text(report)
    (args.out / "gpu_latency.json").write_text(json.dumps(payload, indent=2))
    print(report)


def _save_partial(out: Path, results: dict[str, dict[str, Any]]) -> None:
    """Timings so far (without flows) in ``gpu_latency.partial.json``, in case the run is cut short."""
    out.mkdir(parents=True, exist_ok=True)
    slim = {case: {name: {k: v for k, v in r.items() if k != "flow"} for name, r in runs.items()}
            for case, runs in results.items()}
    (out / "gpu_latency.partial.json").write_text(json.dumps(slim, indent=2))


def _markdown(env: dict, args: Any, results: dict, accuracy: dict, cpu: Any, parity: Any, bandwidth: list) -> str:
    rows, stage_rows = [], []
    for case, runs in results.items():
        ref = runs["reference fp32"]["median_ms"]
        for name, r in runs.items():
            rows.append([case, name, f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{ref / r['median_ms']:.2f}x",
                         r["iterations"], f"{r['peak_mib']:.0f}"])
            if r["stages_ms"]:
                stage_rows.append([case, name, ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())])
    acc_rows = [[name, a["iterations"], f"{a.get('max_flow_diff_vs_cpu', float('nan')):.2e}", f"{a['dice']:.5f}",
                 f"{a.get('dice_minus_cpu', float('nan')):+.5f}"] for name, a in accuracy.items()]
    bw_rows = [["x".join(map(str, b["shape"])), b["factor"], f"{b['bytes'] / 2**20:.1f}", f"{b['call_ms'] * 1e3:.1f}",
                f"{b['call_gbs']:.0f}", f"{b['kernel_us']:.1f}" if b["kernel_us"] else "n/a",
                f"{b['kernel_gbs']:.0f}" if "kernel_gbs" in b else "n/a",
                f"{100 * b['kernel_fraction_of_peak']:.0f}%" if b.get("kernel_fraction_of_peak") else "n/a"]
               for b in bandwidth]
    cpu_line = (f"CPU pipeline (numba kernels + torch CPU stages, {env['cores']} cores): iterations "
                f"{cpu['iterations']}, {cpu['seconds']:.1f} s, Dice {cpu['dice']:.5f}." if cpu
                else "CPU pipeline skipped (--no-cpu).")
    return "\n".join([
        "# GPU latency: LPBA40 S05 <- S20, released checkpoint, `official`",
        "",
        f"GPU: {env['gpu']} ({env['gpu_memory_gib']:.0f} GiB), CUDA (torch) {env['torch_cuda']}, cuDNN {env['cudnn']}, "
        f"peak DRAM bandwidth {env['peak_bandwidth_gbs']:.0f} GB/s; host {env['cpu']}, {env['cores']} cores; Python "
        f"{env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"{args.warmup} warm-up runs, then {args.repeats} timed runs (CUDA events, host arrays in, host flow out). "
        "200x240x200 = the pair resampled trilinearly (1.95x voxels). TF32 off everywhere.",
        "",
        markdown_table(["size", "solver", "median (ms)", "p90 (ms)", "speedup vs reference", "iterations",
                        "peak GPU memory (MiB)"], rows),
        "",
        "Pipeline per-stage GPU time (median, ms; CUDA events on the pipeline's stream; `iirp` = upload, features, "
        "loop and download):",
        "",
        markdown_table(["size", "solver", "stages"], stage_rows),
        "",
        "Accuracy on 160x192x160 vs the CPU pipeline: max |flow difference| (voxels), mean Dice over the shared "
        "labels (nearest-label warp on the GPU, Dice in numpy).",
        cpu_line,
        f"fp32 pipeline parity with the CPU pipeline (same iterations, flow within {FLOW_ATOL_FP32} voxel): "
        f"{'PASS' if parity else 'FAIL' if parity is not None else 'not checked'}",
        "",
        markdown_table(["solver", "iterations", "max flow diff (voxel)", "Dice", "Dice - CPU"], acc_rows),
        "",
        "Fused score kernel: bytes = moving + fixed (4 B/voxel each, read once) + coarse flow (12 B/coarse voxel). "
        "Per call = CUDA events around the whole call (launches, 40-byte readback, sync); kernel = "
        "`iirp_score_partials` from the torch profiler.",
        "",
        markdown_table(["size", "factor", "MiB", "per call (us)", "per call GB/s", "kernel (us)", "kernel GB/s",
                        "of peak"], bw_rows),
        "",
    ])


if __name__ == "__main__":
    main()

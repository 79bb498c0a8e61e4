"""CPU benchmark of the IterStop score: fused numba kernel vs separate upsample + warp + NCC calls.

Times, at full size (moving/fixed 160x192x160 by default), for flows at each
pyramid level (level 4 = 1/8 resolution, factor 8, ... level 1 = full, factor 1):

* ``torch``: the PyTorch reference path of :mod:`iirp.model.spatial`
  (``F.interpolate`` + ``grid_sample`` + float64 NCC), tensors prepared once;
* ``numba separate``: ``kernels.upsample`` then ``kernels.warp`` then ``kernels.ncc``;
* ``fused``: ``kernels.fused_ncc_score``.

Each path is warmed up (numba compile, allocator) and then timed as the
median of ``--repeats`` wall-clock runs (``time.perf_counter``); paths are timed
in separate blocks so that one library's idle worker threads do not compete
with the other's. The Markdown table goes to stdout and to
``benchmarks/results/kernels_cpu.md`` with the CPU model, core count, thread
counts, library versions and the load average before and after (a busy
machine makes the numbers unreliable).

Usage::

    python benchmarks/kernels_cpu.py [--repeats 7] [--shape 160 192 160] [--levels 4 3 2 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_cpu.md"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _volumes(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth [0, 1] moving/fixed pair (low-frequency sinusoids plus noise), float32 ``(X, Y, Z)``."""
    axes = np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)

    def one(phase: float) -> np.ndarray:
        vol = np.sin(6 * axes[0] + phase) * np.cos(5 * axes[1] - phase) * np.sin(4 * axes[2] + 2 * phase)
        vol = vol + 0.1 * rng.random(shape, dtype=np.float32)
        vol -= vol.min()
        return np.ascontiguousarray(vol / vol.max(), dtype=np.float32)

    return one(0.0), one(0.3)


def _bench_level(
    level: int, moving: np.ndarray, fixed: np.ndarray, rng: np.random.Generator, repeats: int
) -> tuple[int, int, tuple[int, ...], float, float, float, dict[str, float]]:
    """Time the three score paths for a flow at ``level``; returns (level, factor, coarse shape, 3 ms, scores)."""
    import torch

    from iirp import kernels
    from iirp.model import spatial

    shape = moving.shape
    factor = 2 ** (level - 1)
    coarse = tuple(n // factor for n in shape)
    # a random coarse flow of about two full-resolution voxels
    flow = (rng.standard_normal((3, *coarse)) * 2.0 / factor).astype(np.float32)
    m_t, f_t = torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]
    flow_t = torch.from_numpy(flow)[None]

    def torch_path() -> float:
        with torch.inference_mode():
            return spatial.ncc(spatial.warp(m_t, spatial.upsample_flow(flow_t, shape)), f_t)

    def numba_separate() -> float:
        return kernels.ncc(kernels.warp(moving, kernels.upsample(flow, factor)), fixed)

    def fused() -> float:
        return kernels.fused_ncc_score(moving, fixed, flow, factor)

    scores = {"torch": torch_path(), "separate": numba_separate(), "fused": fused()}
    t_torch = _median_ms(torch_path, repeats)
    time.sleep(0.5)  # let torch's OpenMP workers stop spinning before numba's start
    t_sep = _median_ms(numba_separate, repeats)
    t_fused = _median_ms(fused, repeats)
    time.sleep(0.5)
    return level, factor, coarse, t_torch, t_sep, t_fused, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    parser.add_argument("--levels", type=int, nargs="+", default=(4, 3, 2, 1))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import numba
    import torch

    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    moving, fixed = _volumes(shape, rng)
    load_before = _loadavg()

    rows = []
    for level in args.levels:
        rows.append(_bench_level(level, moving, fixed, rng, args.repeats))
        _, factor, _, t_torch, t_sep, t_fused, _ = rows[-1]
        print(f"level {level} (x{factor}): torch {t_torch:.1f} ms, separate {t_sep:.1f} ms, fused {t_fused:.1f} ms",
              file=sys.stderr)

    load_after = _loadavg()
    lines = [
        "# CPU kernels: fused IterStop score vs separate upsample + warp + NCC",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores",
        f"- threads: numba {numba.get_num_threads()} ({numba.threading_layer()}), torch {torch.get_num_threads()}",
        f"- versions: Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"torch {torch.__version__}",
        f"- moving/fixed {shape[0]}x{shape[1]}x{shape[2]} float32; median of {args.repeats} runs after 1 warm-up",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        "",
        "| level | flow | torch ms | numba separate ms | fused ms | torch / fused | separate / fused "
        "| fused - torch score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, factor, coarse, t_torch, t_sep, t_fused, scores in rows:
        lines.append(
            f"| {level} (x{factor}) | {coarse[0]}x{coarse[1]}x{coarse[2]} | {t_torch:.1f} | {t_sep:.1f} | "
            f"{t_fused:.1f} | {t_torch / t_fused:.1f}x | {t_sep / t_fused:.1f}x | "
            f"{scores['fused'] - scores['torch']:+.1e} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU benchmark of the numba kernels: the e109593 implementation against the current one.

What is timed is what one registration asks of the kernels: the IterStop loop of
the ``official`` rule with iterations [1, 2, 2, 1] on the 160x192x160 grid of the
released checkpoint. :func:`call_pattern` runs :func:`iirp.iterstop.run_iterstop`
with scripted scores and records which kernel each step calls on which level:

* ``warp`` of the level's moving features (8, 16, 32, 32 channels at levels 1..4,
  grids full, 1/2, 1/4, 1/8) by the level's flow;
* ``compose`` of the level's flow with an estimator update;
* ``upsample2`` of a flow onto the next finer level;
* ``fused_ncc_score`` of the level's flow (factor 2^(level-1)) against the
  full-size moving and fixed volumes.

Inputs: the LPBA40 pair (S20 moving, S05 fixed, on the model grid through
:func:`iirp.runtime.register.prepare_pair`, zero background as in real use) when
``--data`` (default ``$IIRP_SHARED_DATA``) holds it, else smooth synthetic
volumes; smooth synthetic features; smooth synthetic flows of realistic size
(mean |u| about one voxel of the full grid, updates about 0.15 voxel).

Timing (wall clock, ``time.perf_counter``, numba's thread count and threading
layer as configured): every kernel and level is called with the old and the new
implementation alternately, ``--repeats`` times after a warm-up; the table gives
medians (and minima). The per-registration total adds count x median over the
call pattern; the whole pattern is also run end to end, old and new alternately.
Outputs are checked: warp, compose and upsample bit for bit (NaN by position),
the score to 1e-12. ``--compile`` also times the first call of every kernel with
an empty numba cache (fresh subprocesses, old and new alternately).

The old implementation is the frozen copy ``tests/kernels/numba_e109593.py``.
Markdown goes to stdout and ``--output`` (``benchmarks/results/kernels_cpu.md``),
the numbers to the same name with ``.json``.

Usage::

    python benchmarks/kernels_cpu.py [--repeats 7] [--threads N] [--compile] [--data DIR]
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
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "kernels_cpu.md"
BASELINE = ROOT / "tests" / "kernels" / "numba_e109593.py"
SHAPE = (160, 192, 160)
#: Feature channels per level (f1 .. f4) of the released RP-Net encoder.
CHANNELS = {1: 8, 2: 16, 3: 32, 4: 32}
#: Scores the scripted IterStop run sees, per level, to produce iterations [1, 2, 2, 1]
#: under the ``official`` rule (delta 0.005): a score below best + delta stops the level.
SCRIPTED_SCORES = {4: [0.962, 0.965], 3: [0.962, 0.979, 0.983], 2: [0.982, 0.993, 0.994], 1: [0.994, 0.997]}


def load_baseline() -> ModuleType:
    """The frozen e109593 kernels as a module (numba caches it next to the file)."""
    spec = importlib.util.spec_from_file_location("numba_e109593", BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["numba_e109593"] = module
    spec.loader.exec_module(module)
    return module


class _Recorder:
    """A :class:`iirp.iterstop.LevelOps` that records kernel calls and replays scripted scores."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._scores = {level: list(values) for level, values in SCRIPTED_SCORES.items()}

    def zero_flow(self, level: int) -> int:
        return level

    def estimate(self, level: int, flow: Optional[int]) -> int:
        if flow is not None:
            self.calls.append(("warp", level))
        return level

    def compose(self, flow: Optional[int], du: int) -> int:
        if flow is not None:
            self.calls.append(("compose", du))
        return du

    def upsample(self, flow: int, level: int) -> int:
        self.calls.append(("upsample2", level))
        return level - 1

    def score(self, level: int, flow: int) -> float:
        self.calls.append(("fused_ncc_score", level))
        return self._scores[level].pop(0)


def call_pattern() -> list[tuple[str, int]]:
    """Kernel calls of one ``official`` registration with iterations [1, 2, 2, 1], in order."""
    from iirp.iterstop import parse_iterstop, run_iterstop

    ops = _Recorder()
    trace = run_iterstop(ops, parse_iterstop("official"))
    assert trace.iterations == [1, 2, 2, 1], trace.iterations
    return ops.calls


def _smooth(shape: tuple[int, ...], rng: np.random.Generator, waves: int = 4) -> np.ndarray:
    """A smooth float32 field in about [-1, 1]: a few random low-frequency plane waves."""
    axes = np.meshgrid(*[np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    out = np.zeros(shape, np.float32)
    for _ in range(waves):
        k = rng.uniform(1.0, 6.0, len(shape)).astype(np.float32)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        out += np.sin(sum(ki * a for ki, a in zip(k, axes)) * np.float32(2 * np.pi) / 4 + phase)
    return out / np.float32(waves)


def _volumes(data: Optional[Path], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Moving and fixed ``(X, Y, Z)`` float32 volumes in [0, 1], and where they come from."""
    brain = data / "brain" if data is not None else None
    if brain is not None and (brain / "LPBA40_S05_vol.nii.gz").is_file():
        from iirp.runtime.imageio import read_image
        from iirp.runtime.register import RegistrationOptions, prepare_pair

        pair = prepare_pair(read_image(brain / "LPBA40_S05_vol.nii.gz", "fixed"),
                            read_image(brain / "LPBA40_S20_vol.nii.gz", "moving"), SHAPE, RegistrationOptions())
        if pair.moving.shape == SHAPE:
            return (np.ascontiguousarray(pair.moving, np.float32), np.ascontiguousarray(pair.fixed, np.float32),
                    "LPBA40 S20 (moving) / S05 (fixed) on the model grid")
    vols = []
    for _ in range(2):
        v = _smooth(SHAPE, rng) + 0.1 * rng.random(SHAPE, dtype=np.float32)
        vols.append(((v - v.min()) / (v.max() - v.min())).astype(np.float32))
    return vols[0], vols[1], "synthetic smooth volumes (no zero background)"


def make_inputs(data: Optional[Path], seed: int = 0) -> dict[str, Any]:
    """Full-size volumes, per-level features, flows (voxels of their level) and updates."""
    rng = np.random.default_rng(seed)
    moving, fixed, source = _volumes(data, rng)
    inputs: dict[str, Any] = {"moving": moving, "fixed": fixed, "source": source, "features": {}, "flows": {},
                              "updates": {}}
    for level, channels in CHANNELS.items():
        grid = tuple(n // 2 ** (level - 1) for n in SHAPE)
        inputs["features"][level] = np.stack([_smooth(grid, rng) for _ in range(channels)])
        # about one full-grid voxel of displacement, in voxels of this level
        scale = np.float32(2.0 / 2 ** (level - 1))
        inputs["flows"][level] = np.stack([_smooth(grid, rng) * scale for _ in range(3)])
        inputs["updates"][level] = np.stack([_smooth(grid, rng, 6) * np.float32(0.3) for _ in range(3)])
    return inputs


def _runner(module: ModuleType, inputs: dict[str, Any], kernel: str, level: int) -> Callable[[], Any]:
    flows, m, f = inputs["flows"], inputs["moving"], inputs["fixed"]
    if kernel == "warp":
        return lambda: module.warp(inputs["features"][level], flows[level])
    if kernel == "compose":
        return lambda: module.compose(flows[level], inputs["updates"][level])
    if kernel == "upsample2":
        return lambda: module.upsample2(flows[level])
    return lambda: module.fused_ncc_score(m, f, flows[level], 2 ** (level - 1))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(np.where(nan, 0, a).view(np.uint32), np.where(nan, 0, b).view(np.uint32)))


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_kernels(old: ModuleType, new: ModuleType, inputs: dict[str, Any], pattern: list[tuple[str, int]],
                  repeats: int) -> list[dict[str, Any]]:
    """Old and new, alternately, per (kernel, level) of the pattern; medians and minima in ms."""
    rows = []
    for key in dict.fromkeys(pattern):
        kernel, level = key
        run_old, run_new = _runner(old, inputs, kernel, level), _runner(new, inputs, kernel, level)
        a, b = run_old(), run_new()
        check = abs(a - b) if kernel == "fused_ncc_score" else _same_bits(a, b)
        t_old, t_new = [], []
        for r in range(repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                (t_old if which == 0 else t_new).append(_time(run_old if which == 0 else run_new))
        rows.append({"kernel": kernel, "level": level, "count": pattern.count(key), "check": check,
                     "old_ms": statistics.median(t_old), "new_ms": statistics.median(t_new),
                     "old_min_ms": min(t_old), "new_min_ms": min(t_new)})
        print(f"{kernel} L{level}: old {rows[-1]['old_ms']:.1f} ms, new {rows[-1]['new_ms']:.1f} ms", file=sys.stderr)
    return rows


def bench_pattern(old: ModuleType, new: ModuleType, inputs: dict[str, Any], pattern: list[tuple[str, int]],
                  repeats: int) -> dict[str, list[float]]:
    """The whole call pattern end to end (ms), old and new alternately."""
    runs = {name: [_runner(mod, inputs, k, lv) for k, lv in pattern] for name, mod in (("old", old), ("new", new))}
    totals: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(repeats):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            t0 = time.perf_counter()
            for fn in runs[name]:
                fn()
            totals[name].append((time.perf_counter() - t0) * 1e3)
    return totals


_COMPILE_SCRIPT = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
if sys.argv[1] == "old":
    sys.path.insert(0, sys.argv[2]); import numba_e109593 as k
else:
    from iirp import kernels as k
out = {"import": time.perf_counter() - t0}
rng = np.random.default_rng(0)
src = rng.random((8, 16, 8, 24), dtype=np.float32); flow = rng.standard_normal((3, 16, 8, 24)).astype(np.float32)
coarse = rng.standard_normal((3, 8, 4, 12)).astype(np.float32)
for name, fn in [("warp", lambda: k.warp(src, flow)), ("warp 3 channels", lambda: k.warp(src[:3], flow)),
                 ("compose", lambda: k.compose(flow, flow * 0.5)), ("upsample2", lambda: k.upsample2(coarse)),
                 ("fused_ncc_score", lambda: k.fused_ncc_score(src[0], src[1], coarse, 2)),
                 ("ncc", lambda: k.ncc(src[0], src[1]))]:
    t = time.perf_counter(); fn(); out[name] = time.perf_counter() - t
print(json.dumps(out))
"""


def bench_compile(repeats: int) -> dict[str, list[dict[str, float]]]:
    """First-call times (s) per kernel with an empty numba cache, in fresh subprocesses, old and new alternately."""
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for r in range(repeats):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            with tempfile.TemporaryDirectory() as cache:
                out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, name, str(BASELINE.parent)],
                                     env=dict(env, NUMBA_CACHE_DIR=cache), capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"compile {name}: {sum(results[name][-1].values()):.1f} s", file=sys.stderr)
    return results


def report(env: dict[str, Any], inputs: dict[str, Any], rows: list[dict[str, Any]], totals: dict[str, list[float]],
           compile_times: Optional[dict[str, list[dict[str, float]]]], args: argparse.Namespace) -> str:
    grids = {lv: "x".join(str(n // 2 ** (lv - 1)) for n in SHAPE) for lv in CHANNELS}
    old_total = sum(r["count"] * r["old_ms"] for r in rows)
    new_total = sum(r["count"] * r["new_ms"] for r in rows)
    lines = [
        "# CPU kernels: e109593 (old) vs current (new), one IterStop registration",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores (usable {env['usable_cores']}); {args.machine_note}",
        f"- numba {env['versions'].get('numba')}, {env['threads']} threads (old: `prange` on numba's "
        f"`{env['layer']}` layer; new: numba `nogil` kernels on a thread pool), "
        f"numpy {env['versions'].get('numpy')}, Python {env['python']}",
        f"- Load average (1, 5, 15 min) before: {env['load_before']}; after: {env['load_after']}",
        f"- Volumes {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}: {inputs['source']}; features and flows synthetic and smooth",
        "- Call pattern: `official` rule, iterations [1, 2, 2, 1] "
        f"({len(args.pattern)} kernel calls, recorded from `iirp.iterstop.run_iterstop`)",
        f"- Wall time per call, old and new alternately, median (min) of {args.repeats} runs after a warm-up; "
        "check = new output bit for bit equal to old (score: |new - old|)",
        "",
        "| kernel | level, grid | channels | calls | old ms | new ms | speedup | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lv = r["level"]
        channels = CHANNELS[lv] if r["kernel"] == "warp" else ("-" if r["kernel"] == "fused_ncc_score" else 3)
        check = f"{r['check']:.1e}" if r["kernel"] == "fused_ncc_score" else ("identical" if r["check"] else "DIFFERS")
        grid = grids[lv] + (" -> " + grids[lv - 1] if r["kernel"] == "upsample2" else "")
        grid = grid + (" (x" + str(2 ** (lv - 1)) + ", full-size volumes)" if r["kernel"] == "fused_ncc_score" else "")
        lines.append(
            f"| {r['kernel']} | {lv}, {grid} | {channels} | {r['count']} | {r['old_ms']:.1f} ({r['old_min_ms']:.1f}) "
            f"| {r['new_ms']:.1f} ({r['new_min_ms']:.1f}) | {r['old_ms'] / r['new_ms']:.2f}x | {check} |")
    per_kernel: dict[str, list[float]] = {}
    for r in rows:
        acc = per_kernel.setdefault(r["kernel"], [0.0, 0.0])
        acc[0] += r["count"] * r["old_ms"]
        acc[1] += r["count"] * r["new_ms"]
    lines += ["", "Per registration (count x median):", "",
              "| kernel | old ms | new ms | speedup |", "|---|---|---|---|"]
    for kernel, (o, n) in per_kernel.items():
        lines.append(f"| {kernel} | {o:.0f} | {n:.0f} | {o / n:.2f}x |")
    lines.append(f"| **total** | **{old_total:.0f}** | **{new_total:.0f}** | **{old_total / new_total:.2f}x** |")
    o_med, n_med = statistics.median(totals["old"]), statistics.median(totals["new"])
    lines += ["", f"Whole pattern end to end ({len(totals['old'])} runs each, alternately): old median {o_med:.0f} ms "
              f"(min {min(totals['old']):.0f}), new median {n_med:.0f} ms (min {min(totals['new']):.0f}): "
              f"**{o_med / n_med:.2f}x**."]
    if compile_times:
        names = [k for k in compile_times["new"][0] if k != "import"]
        lines += ["", f"First call with an empty numba cache (s, median of {len(compile_times['new'])} fresh processes;"
                  " each row adds what the earlier rows did not compile yet):", "",
                  "| call | old s | new s |", "|---|---|---|"]
        for name in ["import", *names]:
            o = statistics.median(c[name] for c in compile_times["old"])
            n = statistics.median(c[name] for c in compile_times["new"])
            lines.append(f"| {name} | {o:.2f} | {n:.2f} |")
        o = statistics.median(sum(c.values()) for c in compile_times["old"])
        n = statistics.median(sum(c.values()) for c in compile_times["new"])
        lines.append(f"| **total** | **{o:.2f}** | **{n:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pattern-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's)")
    parser.add_argument("--data", type=Path, default=Path(os.environ["IIRP_SHARED_DATA"])
                        if os.environ.get("IIRP_SHARED_DATA") else ROOT.parent / "shared" / "data")
    parser.add_argument("--compile", action="store_true", help="also time first calls with an empty numba cache")
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--machine-note", default="", help="free text for the report (e.g. other load)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import numba

    from iirp import kernels as new
    from iirp.bench.environment import environment, loadavg

    if args.threads:
        numba.set_num_threads(args.threads)
    old = load_baseline()
    args.pattern = call_pattern()
    inputs = make_inputs(args.data)
    env = environment()
    env["load_before"] = loadavg()
    rows = bench_kernels(old, new, inputs, args.pattern, args.repeats)
    totals = bench_pattern(old, new, inputs, args.pattern, args.pattern_repeats)
    env.update(load_after=loadavg(), threads=numba.get_num_threads(), layer=numba.threading_layer())
    compile_times = bench_compile(args.compile_repeats) if args.compile else None
    text = report(env, inputs, rows, totals, compile_times, args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    record = {"environment": env, "volumes": inputs["source"], "shape": SHAPE, "channels": CHANNELS,
              "pattern": args.pattern, "repeats": args.repeats, "kernels": rows, "pattern_ms": totals,
              "compile_s": compile_times}
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Writing benchmark reports: ``.json`` (everything), ``.md`` (tables people read), ``.png`` (plots).

Each report is written into its folder through temporary names, so a
failed or interrupted run leaves no half-written file behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from iirp.atomic import write_file
from iirp.bench.environment import markdown_table

__all__ = ["PAPER_FIGURES", "write_latency_report", "write_accuracy_report"]

#: SPEC section 6 (the paper's Tables 1 and 3), shown beside our figures for reference.
PAPER_FIGURES = [
    ("Mindboggle 160x192x160, 1 mm", "RP-Net", "64.7", "< 0.4 %", "4.889", "0.05"),
    ("Mindboggle", "IIRP-Net", "65.8", "< 0.08 %", "4.840", "0.12"),
    ("FLARE 128x128x96, 2.5 mm", "RP-Net", "68.7", "< 1.9 %", "24.018", "0.02"),
    ("FLARE", "IIRP-Net", "73.3", "< 1.5 %", "23.072", "0.06"),
]


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    write_file(path, write)


def _write_text(path: Path, text: str) -> None:
    def go(p: str) -> None:
        with open(p, "w") as fh:
            fh.write(text)

    _atomic(path, go)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _environment_lines(env: dict[str, Any]) -> list[str]:
    gpus = "; ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in env.get("gpus", [])) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return [
        f"- machine: {env['cpu']}, {env['usable_cores']} usable cores of {env['cores']}; GPU: {gpus}",
        f"- load average at the start (1/5/15 min): {env['load_average']}",
        f"- Python {env['python']} on {env['platform']}",
        f"- versions: {versions}",
    ]


# ----------------------------------------------------------------------------------------------- latency


def _backend_lines(engines: list[dict[str, Any]]) -> list[str]:
    """One line per engine naming what computed each stage, and why its precision was chosen."""
    lines = []
    for e in engines:
        backends = e.get("stage_backends")
        if not backends:
            continue
        groups: dict[str, list[str]] = {}
        for stage, runs_on in backends.items():
            groups.setdefault(runs_on, []).append(stage)
        text = "; ".join(f"{runs_on}: {', '.join(stages)}" for runs_on, stages in groups.items())
        note = f" ({e['precision_note']})" if e.get("precision_note") else ""
        lines.append(f"* {e['engine']} stages: {text}{note}")
    return ["Backend of each stage:", "", *lines, ""] if lines else []


def write_latency_report(out: Path, payload: dict[str, Any]) -> dict[str, Path]:
    """``latency.json``, ``latency.md`` and ``latency.png`` (stacked per-stage medians per engine) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    engines: list[dict[str, Any]] = payload["engines"]
    _write_text(out / "latency.json", json.dumps(_json_safe(payload), indent=2) + "\n")

    header = ["engine", "device", "precision", "median s", "p90 s", "min s", "speedup vs reference", "pairs/s",
              "iterations (L4..L1)", "estimator passes", "peak memory MB", "stage coverage"]
    rows = []
    for e in engines:
        speed = "1.00x (baseline)" if e["baseline"] else f"{e['speedup_vs_reference']:.2f}x"
        iters = str(e["iterations"]) + ("" if e["iterations_match_reference"] else " (DIFFERS from reference)")
        memory = "n/a" if e["peak_memory_mb"] is None else f"{e['peak_memory_mb']:.0f}"
        rows.append([e["engine"], e["device"], e["precision"], f"{e['median_ms'] / 1e3:.3f}",
                     f"{e['p90_ms'] / 1e3:.3f}", f"{e['min_ms'] / 1e3:.3f}", speed, f"{e['pairs_per_s']:.3f}",
                     iters, e["estimator_passes"], memory, f"{100 * e['stage_coverage']:.1f} %"])
    stage_names = [s for s in payload["stage_order"] if any(s in e["stages_median_ms"] for e in engines)]
    stage_rows = []
    for s in stage_names:
        stage_rows.append([s] + [
            f"{e['stages_median_ms'][s] / 1e3:.3f}" if s in e["stages_median_ms"] else "-" for e in engines])
    stage_rows.append(["other (unclocked)"] + [f"{e['other_ms'] / 1e3:.3f}" for e in engines])
    stage_rows.append(["**end to end (median)**"] + [f"**{e['median_ms'] / 1e3:.3f}**" for e in engines])
    cfg = payload["config"]
    lines = [
        "# Registration latency",
        "",
        f"Pair: {cfg['pair']}; model grid {'x'.join(str(s) for s in cfg['shape'])}; IterStop `{cfg['iterstop']}`; "
        f"{cfg['warmup']} warm-up and {cfg['repeats']} timed runs per engine, engines interleaved round-robin. "
        "End to end = the registration core (model-grid arrays in, flow out); file I/O and resampling excluded. "
        "Speedups are ratios against the PyTorch reference measured in this same run.",
        "",
        *_environment_lines(payload["environment"]),
        "",
        markdown_table(header, rows),
        "",
        "Per-stage medians (seconds; each is the median over runs, so they need not add up exactly):",
        "",
        markdown_table(["stage"] + [e["engine"] for e in engines], stage_rows),
        "",
        f"Memory: {payload['memory_note']}",
        "",
        *_backend_lines(engines),
    ]
    _write_text(out / "latency.md", "\n".join(lines))

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(engines) + 3), 5))
    bottoms = [0.0] * len(engines)
    names = [e["engine"] for e in engines]
    for s in stage_names + ["other"]:
        values = [max(0.0, (e["other_ms"] if s == "other" else e["stages_median_ms"].get(s, 0.0)) / 1e3)
                  for e in engines]
        ax.bar(names, values, bottom=bottoms, label=s)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, e in enumerate(engines):
        label = "baseline" if e["baseline"] else f"{e['speedup_vs_reference']:.2f}x"
        ax.text(i, bottoms[i], f"{e['median_ms'] / 1e3:.2f} s\n{label}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds per pair (median)")
    ax.set_ylim(0, max(bottoms) * 1.2)
    ax.set_title(f"Registration core, {'x'.join(str(s) for s in cfg['shape'])}, "
                 f"{payload['environment']['cpu'][:40]}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _atomic(out / "latency.png", lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return {"json": out / "latency.json", "md": out / "latency.md", "png": out / "latency.png"}


# ----------------------------------------------------------------------------------------------- accuracy


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def write_accuracy_report(out: Path, payload: dict[str, Any], method_labels: dict[str, str]) -> dict[str, Path]:
    """``accuracy.json``, ``accuracy.md`` and ``accuracy_dice.png`` (box plot of Dice per method) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "accuracy.json", json.dumps(_json_safe(payload), indent=2) + "\n")
    results: Sequence[dict[str, Any]] = payload["results"]
    methods: list[str] = payload["methods"]

    def label(m: str) -> str:
        return method_labels.get(m, m)

    header = ["method", "Dice", "HD95 mm", "folding (det J <= 0)", "SDlogJ", "MSE", "NCC", "iterations (L4..L1)",
              "estimator passes", "time s"]
    lines = [
        "# Registration accuracy",
        "",
        f"Source: {payload['config']['source']}; engine {payload['config']['engine']} "
        f"({payload['config']['precision']}, {payload['config']['device']}); intensity rule "
        f"`{payload['config']['intensity']}`; pre-alignment: {payload['config']['pre_alignment'] or 'none'}.",
        "Dice: mean over the labels both label maps share (SimpleITK label overlap); HD95: robust Hausdorff "
        "distance in mm, mean over labels; folding: share of voxels with det J <= 0 of the whole displacement "
        "field; SDlogJ: std of log det J; MSE/NCC: fixed vs warped moving image (normalised intensities).",
        "",
        *_environment_lines(payload["environment"]),
        "",
    ]
    for pair in payload["pairs"]:
        rows = []
        for r in (r for r in results if r["pair"] == pair["id"]):
            rows.append([label(r["method"]), _fmt(r["dice"]), _fmt(r["hd95_mm"], 3),
                         f"{100 * r['folding_fraction']:.4f} %", _fmt(r["sdlogj"]), _fmt(r["mse"], 5),
                         _fmt(r["ncc"]), str(r["iterations"]), r["estimator_passes"], f"{r['seconds']:.1f}"])
        lines += [f"## {pair['id']}", "", f"fixed `{pair['fixed']}`, moving `{pair['moving']}`, "
                  f"{pair['labels']} labels", "", markdown_table(header, rows), ""]
    summary = payload["summary"]
    rows = []
    for m in methods:
        s = summary.get(m)
        if s is None:
            continue
        rows.append([label(m), f"{_fmt(s['dice_mean'])} ± {_fmt(s['dice_std'])}",
                     f"{_fmt(s['hd95_mm_mean'], 3)} ± {_fmt(s['hd95_mm_std'], 3)}",
                     f"{100 * s['folding_fraction_mean']:.4f} %", _fmt(s["sdlogj_mean"]),
                     _fmt(s["mse_mean"], 5), _fmt(s["ncc_mean"]), f"{s['estimator_passes_mean']:.1f}",
                     f"{s['seconds_mean']:.1f}", int(s["pairs"])])
    lines += [
        f"## Mean ± std over {len(payload['pairs'])} pair(s)", "",
        markdown_table(["method", "Dice", "HD95 mm", "folding", "SDlogJ", "MSE", "NCC", "estimator passes",
                        "time s", "pairs"], rows),
        "",
        "## The paper's figures (SPEC section 6), for reference",
        "",
        "Other data (the Mindboggle and FLARE test sets) and another machine (RTX 3090): not comparable number "
        "for number, shown for scale.",
        "",
        markdown_table(["dataset", "method", "Dice %", "folding", "HD95 mm", "infer s"],
                       [list(r) for r in PAPER_FIGURES]),
        "",
    ]
    _write_text(out / "accuracy.md", "\n".join(lines))

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(methods) + 2), 4.5))
    data = [[r["dice"] for r in results if r["method"] == m] for m in methods]
    ax.boxplot(data, showmeans=True)
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, s=14, color="black", zorder=3)
    ax.set_xticks(range(1, len(methods) + 1), [label(m) for m in methods], fontsize=9)
    ax.set_ylabel("mean Dice over labels")
    ax.set_title(f"Dice per method, {len(payload['pairs'])} pair(s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _atomic(out / "accuracy_dice.png", lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return {"json": out / "accuracy.json", "md": out / "accuracy.md", "png": out / "accuracy_dice.png"}

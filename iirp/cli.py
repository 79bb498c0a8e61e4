"""Command-line entry points: thin typer commands over the library API.

Every :class:`~iirp.errors.IirpError` (bad input, artefact or environment)
becomes one line on stderr and exit code 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, TypeVar

import typer

from iirp import clitools
from iirp.errors import IirpError
from iirp.iterstop import DEFAULT_DELTA, DEFAULT_MAX_ITERS

T = TypeVar("T")

run_app = typer.Typer(add_completion=False, help="Register a moving image to a fixed image with IIRP-Net.",
                      pretty_exceptions_enable=False)
export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, cls=clitools.one_line_group("iirp-bench"))
train_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(prog: str, err: BaseException | str, verbose: bool) -> NoReturn:
    clitools.fail(prog, err, verbose)


def _guarded(prog: str, verbose: bool, call: Callable[[], T]) -> T:
    return clitools.guarded(prog, verbose, call)


@run_app.command(
    cls=clitools.one_line_command("iirp-run"),
    epilog=(
        "Without --affine or --initial-transform the moving image keeps its physical position: "
        "the network assumes the pair is already affinely aligned. "
        "Cohort mode: --pairs CSV (columns fixed, moving, optional moving_seg, id) registers every pair "
        "into OUT/<id>/ with the engines loaded once, writes OUT/summary.csv, skips a failing pair and "
        "exits 1 at the end if any failed. --resume keeps the pairs an earlier run finished (outputs checked "
        "against their report.json); --shard I/N runs rows I, I+N, ... into OUT/summary.I-of-N.csv and "
        "--merge-summaries OUT joins the shards; --ray local|auto|ADDRESS runs the pairs on a Ray cluster "
        "(OUT on a filesystem every worker shares; --device cuda with --gpus-per-worker G)."
    )
)
def run(
    fixed: Optional[Path] = typer.Argument(None, help="Fixed image (any format SimpleITK reads)."),
    moving: Optional[Path] = typer.Argument(None, help="Moving image."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Output folder (created; must be new or empty)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier run's outputs in OUT (never other files)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="RP-Net checkpoint (.pt): PyTorch reference."),
    engines: Optional[Path] = typer.Option(None, "--engines", help="Folder written by iirp-export."),
    engine: Optional[str] = typer.Option(
        None, "--engine",
        help="reference | torch | ort | openvino | trt (default: reference with --checkpoint, ort with --engines, "
             "the fastest installed with --demo)."),
    device: Optional[str] = typer.Option(
        None, "--device", help="cpu | cuda | cuda:N (default: cuda for --engine trt, else cpu)."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto | fp32 | bf16 (engine openvino; others compute in the folder's precision)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per library (default: all cores)."),
    low_memory: bool = typer.Option(
        False, "--low-memory", help="Engines ort and openvino: less memory for a little more time; the same flow "
                                    "(README, Memory)."),
    slabs: int = typer.Option(
        1, "--slabs", help="Engine openvino: run the finest flow estimator in N slabs: same flow, less memory, "
                           "a little more time (--low-memory: 8)."),
    iterstop: str = typer.Option("official", "--iterstop", help="official | paper | rpnet | fixed:a,b,c,d"),
    delta: float = typer.Option(DEFAULT_DELTA, "--delta", help="IterStop NCC improvement threshold."),
    max_iters: int = typer.Option(DEFAULT_MAX_ITERS, "--max-iters", help="Maximum passes per level."),
    moving_seg: Optional[Path] = typer.Option(None, "--moving-seg", help="Moving label map to warp."),
    affine: bool = typer.Option(False, "--affine", help="Rigid-then-affine pre-alignment (SimpleITK, Mattes MI)."),
    initial_transform: Optional[Path] = typer.Option(
        None, "--initial-transform", help="Linear ITK transform file (fixed -> moving) instead of --affine."
    ),
    intensity: Optional[str] = typer.Option(
        None, "--intensity", help="minmax | percentile:LO,HI | window:LO,HI (default: the model's, minmax so far)."),
    spacing: Optional[float] = typer.Option(
        None, "--spacing", help="Model grid spacing (mm) for a model that records none; must match one that does."),
    qc: bool = typer.Option(False, "--qc", help="Also write qc.png (slices, checkerboard, grid, Jacobian)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="CSV of pairs: cohort mode (see below)."),
    resume: bool = typer.Option(False, "--resume", help="Cohort: keep the pairs already done; run the rest."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Cohort: run slice I of N (rows I, I+N...): I/N."),
    merge_summaries: Optional[Path] = typer.Option(
        None, "--merge-summaries", help="Join the shard summaries of this cohort folder into its summary.csv."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Cohort on a Ray cluster: local | auto | ADDRESS."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: what the cluster holds)."),
    gpus_per_worker: Optional[float] = typer.Option(
        None, "--gpus-per-worker", help="GPUs per Ray worker, 0..1 (needs --device cuda)."),
    cpus_per_worker: Optional[float] = typer.Option(
        None, "--cpus-per-worker", help="CPUs per Ray worker (default 1; also its solver's threads)."),
    demo: bool = typer.Option(False, "--demo", help="Register the built-in example pair (default -o iirp-demo)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks and library warnings."),
) -> None:
    """Register MOVING to FIXED; write warped image, displacement field, labels and a report."""
    from iirp.cli_cohort import CohortRequest
    from iirp.runtime import RegistrationOptions
    from iirp.runtime.solver_spec import SolverSpec
    from iirp.runtime.solvers import default_device, default_engine, fastest_cpu_engine

    cohort = CohortRequest(resume, shard, ray, workers, gpus_per_worker, cpus_per_worker)
    if merge_summaries is not None:
        if any(v is not None for v in (fixed, moving, pairs, out, checkpoint, engines)) or cohort.given():
            _fail("iirp-run", "--merge-summaries takes only the cohort folder (and --verbose)", verbose)
        from iirp.cli_cohort import merge

        merge(merge_summaries, verbose)
        return
    if out == "":
        _fail("iirp-run", "missing output folder: -o/--out is empty", verbose)
    if pairs is None and cohort.given():
        _fail("iirp-run", f"{', '.join(cohort.given())}: cohort options, for --pairs runs", verbose)
    if demo:
        if fixed is not None or moving is not None or pairs is not None or checkpoint is not None \
                or engines is not None or moving_seg is not None or slabs != 1 or low_memory:
            _fail("iirp-run", "--demo takes no images, --pairs, --moving-seg, --checkpoint, --engines, --slabs or "
                  "--low-memory", verbose)
        _run_demo(Path(out or "iirp-demo"), engine or fastest_cpu_engine(), verbose, as_json)
        return
    if out is None:
        _fail("iirp-run", "missing option -o/--out (the output folder)", verbose)
    if pairs is None and (fixed is None or moving is None):
        _fail("iirp-run", "give FIXED and MOVING images, --pairs CSV, or --demo", verbose)
    if pairs is not None and (fixed is not None or moving_seg is not None):
        _fail("iirp-run", "--pairs takes its images (and moving_seg) from the CSV, not the command line", verbose)
    if (checkpoint is None) == (engines is None):
        _fail("iirp-run", "give exactly one of --checkpoint CKPT or --engines DIR", verbose)
    if affine and initial_transform is not None:
        _fail("iirp-run", "use either --affine or --initial-transform, not both", verbose)
    out_dir = Path(out)
    engine_name = engine or default_engine(checkpoint, engines)
    device = device or default_device(engine_name)

    spec = SolverSpec.of(engine_name, checkpoint=checkpoint, engines=engines, device=device, threads=threads,
                         precision=precision, slabs=slabs, low_memory=low_memory)

    def _options() -> RegistrationOptions:
        # parsed once, cheap checks first: a typo does not wait for the images or the model to load
        return RegistrationOptions(iterstop=iterstop, delta=delta, max_iters=max_iters, intensity=intensity,
                                   affine=affine, initial_transform=initial_transform,
                                   spacing=(spacing,) * 3 if spacing is not None else None)

    if pairs is not None:
        from iirp.cli_cohort import run_cohort

        run_cohort(pairs, out_dir, spec, _options, qc, overwrite, cohort, verbose)
        return
    assert fixed is not None and moving is not None  # refused above without --pairs
    fixed_image, moving_image = fixed, moving

    def _go() -> dict:
        from iirp.runtime.warmup import warm_up_in_background

        warm_up_in_background()  # numba's import and first kernel load, while the images are read on one core
        from iirp.runtime.imageio import REGISTRATION_OUTPUTS, check_output_dir
        from iirp.runtime.register import read_inputs, register_files

        check_output_dir(out_dir, overwrite=overwrite, owned=REGISTRATION_OUTPUTS)
        options = _options()
        spec.check()
        status, step = _progress_steps("iirp-run")  # a transient line on a terminal's stderr, else nothing
        with status:  # stopped before an error line is printed
            step("reading the images")
            inputs = read_inputs(fixed_image, moving_image, moving_seg=moving_seg, options=options)  # before the model
            step("opening the models")
            solver = spec.build()
            return register_files(fixed_image, moving_image, solver, out_dir, moving_seg=moving_seg,
                                  options=options, qc=qc, overwrite=overwrite, inputs=inputs, on_step=step)

    report = _guarded("iirp-run", verbose, _go)
    for text in report.get("warnings", []):
        clitools.warn("iirp-run", text)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _run_demo(out: Path, engine: str, verbose: bool, as_json: bool) -> None:
    """The built-in example (:func:`iirp.demo.run_demo`): prints what happened."""

    def _go() -> dict:
        from iirp.runtime.warmup import warm_up_in_background

        warm_up_in_background()  # numba's import and first kernel load, while the example is prepared
        from iirp.demo import run_demo

        return run_demo(out, engine=engine, progress=True)

    result = _guarded("iirp-run", verbose, _go)
    for text in result["report"].get("warnings", []):
        clitools.warn("iirp-run", text)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    for line in demo_summary(result):
        typer.echo(line)


def demo_summary(result: dict) -> list[str]:
    """The lines ``iirp-run --demo`` prints for a :func:`iirp.demo.run_demo` result."""
    eb, ea = result["epe_before"], result["epe_after"]
    db, da = result["dice_before"], result["dice_after"]
    sec = result["seconds"]
    return [
        "demo: ICBM 2009a template (64x80x64, 2.5 mm) against a copy warped by a known smooth deformation",
        f"engine: {result['report']['engine']} ({result['report']['precision']})  "
        f"iterations (levels 4..1): {result['iterations']}  estimator passes: {result['estimator_passes']}",
        f"end-point error in the brain: {eb['mm']:.2f} mm ({eb['voxels']:.2f} voxels) before, "
        f"{ea['mm']:.2f} mm ({ea['voxels']:.2f} voxels) after",
        f"tissue Dice GM / WM: {db['gm']:.3f} / {db['wm']:.3f} before, {da['gm']:.3f} / {da['wm']:.3f} after",
        f"folding fraction: {result['folding_fraction']:.5f}",
        f"time: {sec['total']:.1f}s (export {sec['export']:.1f}s, register {sec['register']:.1f}s)",
        *(f"{name:>24}: {path}" for name, path in result["outputs"].items()),
    ]


def _print_report(report: dict) -> None:
    t = report["timings_ms"]
    stages = ", ".join(f"{k} {v / 1e3:.1f}s" for k, v in t.items() if k not in ("total", "iirp"))
    typer.echo(f"iterations (levels 4..1): {report['iterations']}  estimator passes: {report['estimator_passes']}")
    typer.echo(backend_summary(report))
    typer.echo(f"folding fraction: {report['folding_fraction']:.5f}")
    typer.echo(f"time: {t['total'] / 1e3:.1f}s ({stages})")
    for name, path in report["outputs"].items():
        typer.echo(f"{name:>13}: {path}")


def backend_summary(report: dict) -> str:
    """``engine openvino, precision fp32 (note); stages: ort-fp32 feature_extractor; ...``: what ran, one line."""
    groups: dict[str, list[str]] = {}
    for stage, runs_on in (report.get("stage_backends") or {}).items():
        groups.setdefault(runs_on, []).append(stage.replace("flow_estimator_", "estimator "))
    stages = "; ".join(f"{runs_on} for {', '.join(names)}" for runs_on, names in groups.items())
    note = f" ({report['precision_note']})" if report.get("precision_note") else ""
    load = f"; load {report['load_ms'] / 1e3:.1f}s" if report.get("load_ms") is not None else ""
    head = f"engine {report['engine']}, precision {report['precision']}{note}"
    return head + (f"; {stages}" if stages else "") + load


@export_app.command(
    cls=clitools.one_line_command("iirp-export"),
    epilog=(
        "Dynamic exports accept 16..256 voxels per axis (multiples of 8; widened to include --shape). "
        "fp16 files keep float32 inputs and outputs. onnxruntime's CPU provider runs fp16 files with "
        "float32 arithmetic, so --verify checks fp16 weights there, not fp16 arithmetic."
    )
)
def export(
    checkpoint: Path = typer.Argument(..., help="RP-Net checkpoint (.pt)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created, or an earlier export replaced)."),
    shape: Optional[tuple[int, int, int]] = typer.Option(
        None, "--shape", help="Model grid D H W (array extents X Y Z, multiples of 8); default: the checkpoint's size."
    ),
    dynamic: bool = typer.Option(False, "--dynamic", help="Symbolic spatial dims (verified at --shape)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 (fp16 weights and compute)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or newer)."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs tensorrt and a GPU)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare every stage with PyTorch (onnxruntime)."),
    verify_pair: Optional[tuple[Path, Path]] = typer.Option(
        None, "--verify-pair", help="FIXED MOVING images to verify with as well (and to gate OpenVINO bf16)."
    ),
    verify_labels: Optional[tuple[Path, Path]] = typer.Option(
        None, "--verify-labels", help="FIXED_SEG MOVING_SEG label maps of the --verify-pair: Dice in the bf16 gate."
    ),
    spacing: Optional[float] = typer.Option(
        None, "--spacing", help="Model grid spacing (mm) the checkpoint was trained on, if it records none."),
    intensity: Optional[str] = typer.Option(
        None, "--intensity", help="Intensity rule it was trained with, if it records none (iirp-run's default)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Export CHECKPOINT to ONNX stages (and TensorRT engines) with a manifest, in folder OUT."""
    from iirp.manifest import Manifest

    def _go() -> Manifest:
        from iirp.export import export_checkpoint

        return export_checkpoint(
            checkpoint, out, shape=shape if shape and None not in shape else None, dynamic=dynamic,
            precision=precision, opset=opset, trt=trt, verify=verify,
            verify_pair=verify_pair if verify_pair and None not in verify_pair else None, progress=True,
            verify_labels=verify_labels if verify_labels and None not in verify_labels else None,
            spacing=spacing, intensity=intensity,
        )

    manifest = _guarded("iirp-export", verbose, _go)
    grid = "dynamic" if manifest.dynamic else "x".join(str(s) for s in manifest.size)
    engines = ", TensorRT engines" if manifest.tensorrt else ""
    typer.echo(f"wrote {out}: {len(manifest.stages)} stages, {manifest.precision}, {grid}, opset {manifest.opset}"
               f" ({manifest.exporter.get('method', '?')} exporter){engines}")
    gate = (manifest.openvino or {}).get("bf16_gate")
    if gate:
        typer.echo(f"OpenVINO bf16 gate: {gate['status']}" + (f" ({gate['reason']})" if gate.get("reason") else ""))


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # None, or a closed or unusual stream
        return False


def _progress_steps(prog: str):  # type: ignore[no-untyped-def]
    """A rich status line on stderr and the ``on_step`` callback that updates it; on a stderr that is not a
    terminal, a context that does nothing and a callback that ignores its text (no import, no thread)."""
    if not _is_terminal(sys.stderr):
        return contextlib.nullcontext(), lambda text: None
    from rich.console import Console

    status = Console(stderr=True).status(f"{prog}: starting")
    return status, lambda text: status.update(f"{prog}: {text}")


@bench_app.command(
    "latency",
    epilog="The PyTorch reference (the folder's source checkpoint) is always timed as the baseline, in the same run.",
)
def bench_latency(
    engines: Path = typer.Option(..., "--engines", help="Folder written by iirp-export."),
    engine: list[str] = typer.Option(
        ["ort", "openvino"], "--engine",
        help="Engine to time (repeatable): ort | openvino (fp32, + bf16 where native) | openvino-fp32 | "
             "openvino-bf16 | trt | torch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    shape: Optional[tuple[int, int, int]] = typer.Option(
        None, "--shape", help="Model grid D H W (default: the folder's)."
    ),
    pair: Optional[tuple[Path, Path]] = typer.Option(
        None, "--pair", help="FIXED MOVING images to time (default: the built-in demo pair, resampled to the grid)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The folder's source checkpoint, if moved."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per engine."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per engine first."),
    iterstop: str = typer.Option("official", "--iterstop", help="official | paper | rpnet | fixed:a,b,c,d"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per library (default: all cores)."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder: latency.md, latency.json, latency.png."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Latency per engine and per stage (median, p90, min), speedup over the reference, memory."""
    from iirp.bench import latency_benchmark

    status, step = _progress_steps("iirp-bench")
    with status:
        payload = _guarded("iirp-bench", verbose, lambda: latency_benchmark(
            out, engines, engines=engine, device=device, checkpoint=checkpoint,
            shape=shape if shape and None not in shape else None,
            pair=pair if pair and None not in pair else None, repeats=repeats, warmup=warmup, iterstop=iterstop,
            threads=threads, on_step=step))
    for e in payload["engines"]:
        speed = "baseline" if e["baseline"] else f"{e['speedup_vs_reference']:.2f}x"
        typer.echo(f"{e['engine']:>14}: median {e['median_ms'] / 1e3:.3f} s ({speed}), iterations {e['iterations']}")
    typer.echo(f"wrote {out / 'latency.md'}, latency.json, latency.png")


@bench_app.command("accuracy")
def bench_accuracy(
    pairs: Path = typer.Option(..., "--pairs", help="CSV: fixed, moving, fixed_seg, moving_seg[, labels, id]."),
    engines: Optional[Path] = typer.Option(None, "--engines", help="Folder written by iirp-export."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="RP-Net checkpoint (PyTorch reference)."),
    engine: Optional[str] = typer.Option(
        None, "--engine", help="reference | torch | ort | openvino | trt (default: ort / reference)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    methods: str = typer.Option("identity,rpnet,official", "--methods",
                                help="Comma-separated: identity (affine only), rpnet, official, paper, fixed:a,b,c,d."),
    intensity: Optional[str] = typer.Option(
        None, "--intensity", help="minmax | percentile:LO,HI | window:LO,HI (default: the model's)."),
    affine: bool = typer.Option(False, "--affine", help="Rigid-then-affine pre-alignment first."),
    qc: bool = typer.Option(False, "--qc", help="Also write qc/<pair>_<method>.png."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder: accuracy.md, accuracy.json, accuracy_dice.png."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Dice, HD95, folding, SDlogJ, MSE, NCC, iterations and time per pair and method."""
    from iirp.bench import accuracy_benchmark
    from iirp.runtime.register import RegistrationOptions

    if (checkpoint is None) == (engines is None):
        _fail("iirp-bench", IirpError("give exactly one of --checkpoint CKPT or --engines DIR"), verbose)
    status, step = _progress_steps("iirp-bench")
    with status:
        payload = _guarded("iirp-bench", verbose, lambda: accuracy_benchmark(
            out, pairs, engines_dir=engines, checkpoint=checkpoint, engine=engine, device=device, methods=methods,
            options=RegistrationOptions(intensity=intensity, affine=affine), qc=qc, on_step=step))  # parsed in guard
    for method, s in payload["summary"].items():
        typer.echo(f"{method:>12}: Dice {s['dice_mean']:.4f} ± {s['dice_std']:.4f}, HD95 {s['hd95_mm_mean']:.3f} mm, "
                   f"folding {100 * s['folding_fraction_mean']:.4f} %")
    typer.echo(f"wrote {out / 'accuracy.md'}, accuracy.json, accuracy_dice.png")


@train_app.command(
    cls=clitools.one_line_command("iirp-train"),
    epilog=(
        "Loss: -local NCC (window^3) of the warped moving image and the fixed image + lambda * diffusion. "
        "Writes latest.pt and best.pt (released format), resume.pt and log.csv in OUT; "
        "--resume continues a run bit for bit (CPU)."
    )
)
def train(
    data: Path = typer.Argument(..., help="Folder of volumes, a CSV listing them, or one volume."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created)."),
    shape: Optional[tuple[int, int, int]] = typer.Option(
        None, "--shape", help="Model grid D H W (multiples of 8); default: the --init checkpoint's, else 160 192 160."
    ),
    spacing: float = typer.Option(1.0, "--spacing", help="Model grid spacing in mm."),
    steps: int = typer.Option(1000, "--steps", help="Total steps (a resumed run continues up to it)."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    lam: float = typer.Option(1.0, "--lambda", help="Weight of the diffusion term."),
    window: int = typer.Option(9, "--window", help="Local NCC window (voxels)."),
    resblocks: Optional[int] = typer.Option(None, "--resblocks", help="ResBlocks per estimator (default 2)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Released checkpoint to fine-tune."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT."),
    val: Optional[Path] = typer.Option(None, "--val", help="CSV: fixed, moving, fixed_seg, moving_seg."),
    val_every: int = typer.Option(100, "--val-every", help="Validate and checkpoint every N steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the pair sampler."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Pairs by random smooth deformation of each volume."),
    max_disp: float = typer.Option(4.0, "--max-disp", help="Synthetic deformation bound (voxels)."),
    supervised: float = typer.Option(
        0.0, "--supervised", help="With --synthetic: add W x end-point error to the true flow to the loss."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Random flips of each pair."),
    jitter: float = typer.Option(0.0, "--jitter", help="Random gamma exp(U(-F, F)) per image."),
    crop: Optional[tuple[int, int, int]] = typer.Option(None, "--crop", help="Train on random D H W windows."),
    intensity: str = typer.Option("minmax", "--intensity", help="minmax | percentile:LO,HI | window:LO,HI"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Train RP-Net without labels on pairs from DATA; write checkpoints to OUT."""

    def _go() -> dict:
        from iirp.model import training

        return training.train(training.TrainConfig(
            data, out, shape=shape if shape and None not in shape else None, spacing=spacing, steps=steps, lr=lr,
            lam=lam, window=window, resblocks=resblocks, init=init, resume=resume, val=val, val_every=val_every,
            seed=seed, synthetic=synthetic, flip=flip, jitter=jitter, max_displacement=max_disp, supervised=supervised,
            crop=crop if crop and None not in crop else None, intensity=intensity, device=device,
        ))

    summary = _guarded("iirp-train", verbose, _go)
    typer.echo(f"trained to step {summary['steps']} (from {summary['resumed_from']}): "
               f"best {summary['best_metric']} {summary['best']:.5f}, {summary['seconds']:.0f} s")
    typer.echo(f"wrote {summary['outputs']['best']}, {summary['outputs']['latest']}, {summary['outputs']['log']}")

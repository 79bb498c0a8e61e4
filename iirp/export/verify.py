"""Check exported stages against PyTorch with onnxruntime (CPU), stage by stage.

Inputs (see :mod:`iirp.export.stages` for the contract):

* ``random``: a seeded uniform ``(2, 1, X, Y, Z)`` image in [0, 1) at the export shape;
* ``pair`` (optional): a real fixed/moving pair on the model grid.

The feature extractor gets the image; each flow estimator gets the *PyTorch* features of
that image at its level (moving = batch 1, fixed = batch 0), so every stage is compared on
identical inputs and errors do not compound.

Error measures, per output: ``max abs`` = max |onnx - reference|; ``max rel`` = max abs /
max |reference|. A check passes when ``max abs <= atol + rtol * max |reference|`` (and the
output is finite, float32 and of the reference's shape).

Tolerances (named constants below):

* fp32 files vs PyTorch fp32: :data:`FP32_TOLERANCE`, max abs 1e-4 on features and flows.
* fp16 files vs PyTorch fp32 (the accuracy budget of an fp16 export): :data:`FP16_TOLERANCE`,
  ``1e-3 + 1e-2 * max |reference|``. Chosen from the released checkpoint at 160x192x160 on
  a real LPBA40 pair, emulating a float16 engine in PyTorch (fp16 weights, every conv and
  block output rounded to fp16): the worst stage, ``flow_estimator_1``, was off by 6.9e-3
  voxels with flows up to 3.0 (2.3e-3 relative, a quarter of this limit); features by at most
  1e-3 relative. fp16 weights alone (what onnxruntime CPU computes) gave 6.7e-3 there.
* fp16 files vs PyTorch with the same float16-rounded weights, float32 everything else
  (:data:`FP16_GRAPH_TOLERANCE`, ``1e-4 + 2^-10 * max |reference|``: float32 noise plus one
  float16 rounding of an input or output). A tight check of the converted graph itself,
  run on the random input only (it costs a second PyTorch pass).

Why the second fp16 check: onnxruntime's CPU provider has no float16 Conv (nor LeakyRelu,
Add, AveragePool), so it wraps them in casts back to float32 (:mod:`iirp.export.fp16`). On
this CPU an fp16 file therefore computes in float32 from float16 weights: measured on
onnxruntime 1.32 at every optimisation level, the feature extractor matched "fp16 weights,
fp32 input and output" to 1e-7 (the input/output casts were folded away), the estimators
matched "fp16 weights and fp16-rounded inputs, fp32 output" to 2e-7 (their first op, Concat,
does run in float16). Float16 arithmetic and float16 activations are not exercised here; only
a GPU engine (TensorRT) does that, so its parity must be checked on the GPU.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from iirp.export.errors import ExportError, VerificationError
from iirp.export.progress import Steps
from iirp.export.stages import FEATURE_EXTRACTOR, FEATURE_OUTPUTS, LEVELS, stage_module
from iirp.manifest import Manifest, estimator_stage

if TYPE_CHECKING:
    import torch

    from iirp.model.rpnet import RPNet

__all__ = [
    "Tolerance",
    "FP32_TOLERANCE",
    "FP16_TOLERANCE",
    "FP16_GRAPH_TOLERANCE",
    "REFERENCE_FP32",
    "REFERENCE_FP16_WEIGHTS",
    "OutputCheck",
    "VerificationReport",
    "compare",
    "torch_reference",
    "run_onnx",
    "verify_export",
    "report_table",
]


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max |actual - reference| <= atol + rtol * max |reference|``.

    Attributes:
        atol: absolute part, in the output's units (feature units, or voxels for a flow).
        rtol: part relative to the largest reference magnitude of that output.
    """

    atol: float
    rtol: float

    def limit(self, scale: float) -> float:
        """The largest allowed max abs error for an output whose max |reference| is ``scale``."""
        return self.atol + self.rtol * scale


#: fp32 files vs PyTorch fp32: max abs 1e-4 on features and flows
FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=0.0)
#: fp16 files vs PyTorch fp32: 1e-3 plus 1 % of the output's range
FP16_TOLERANCE = Tolerance(atol=1e-3, rtol=1e-2)
#: fp16 files vs PyTorch run on the same fp16-rounded weights/inputs/outputs: fp32 noise + 1 fp16 ulp
FP16_GRAPH_TOLERANCE = Tolerance(atol=1e-4, rtol=2.0**-10)

REFERENCE_FP32 = "torch fp32"
REFERENCE_FP16_WEIGHTS = "torch fp16 weights"


@dataclass(frozen=True)
class OutputCheck:
    """One output of one stage on one input, compared with one reference."""

    stage: str
    output: str
    case: str
    reference: str
    max_abs: float
    max_rel: float
    limit: float
    passed: bool
    note: str = ""


@dataclass
class VerificationReport:
    """Every check of one export, with the precision it was judged by."""

    precision: str
    checks: list[OutputCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def raise_for_failure(self) -> None:
        """Raise :class:`VerificationError` naming the worst failing check, if any failed."""
        if not self.checks:
            raise VerificationError("export verification ran no checks")
        failures = self.failures
        if not failures:
            return
        worst = max(failures, key=lambda c: (c.max_abs / c.limit) if c.limit > 0 else float("inf"))
        detail = worst.note or f"max abs error {worst.max_abs:.3g} > {worst.limit:.3g}"
        raise VerificationError(
            f"exported stages do not match PyTorch ({self.precision}): {len(failures)} of {len(self.checks)} "
            f"checks failed; worst: {worst.stage} output {worst.output!r} on the {worst.case} input vs "
            f"{worst.reference}: {detail}"
        )


def compare(
    stage: str, output: str, case: str, reference_name: str,
    actual: np.ndarray, reference: np.ndarray, tolerance: Tolerance,
) -> OutputCheck:
    """Compare one ONNX output with its reference (see the module docstring for the measures)."""
    if actual.shape != reference.shape or actual.dtype != np.float32:
        return OutputCheck(
            stage, output, case, reference_name, float("inf"), float("inf"), 0.0, False,
            note=f"got {actual.dtype} {actual.shape}, expected float32 {reference.shape}",
        )
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    max_abs = float(np.abs(actual - reference).max()) if reference.size else 0.0
    if not np.isfinite(max_abs):
        return OutputCheck(stage, output, case, reference_name, float("inf"), float("inf"), 0.0, False,
                           note="non-finite values")
    limit = tolerance.limit(scale)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputCheck(stage, output, case, reference_name, max_abs, max_rel, limit, max_abs <= limit)


def torch_reference(module: "torch.nn.Module", inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run a stage module in PyTorch on the CPU.

    Args:
        module: the stage module (float32, eval); used as is (not modified).
        inputs: float32 ``(N, C, X, Y, Z)`` arrays in the stage's input order.

    Returns:
        The outputs as C-contiguous float32 arrays, in the stage's output order.
    """
    import torch

    fmt = torch.channels_last_3d  # same math, much faster oneDNN kernels on CPU
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(memory_format=fmt) for a in inputs]
    with torch.inference_mode():
        out = module(*tensors)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [np.ascontiguousarray(o.float().numpy()) for o in outs]


def _fp16_weights(module: "torch.nn.Module") -> "torch.nn.Module":
    """A copy of ``module`` whose weights are rounded to float16 (kept as float32 tensors)."""
    import torch

    twin = copy.deepcopy(module)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.half().float())
    return twin


def _prepared(module: "torch.nn.Module") -> "torch.nn.Module":
    import torch

    return copy.deepcopy(module).float().eval().to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


class _Runner:
    """onnxruntime CPU sessions, one per file, created on first use."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.folder = folder
        self._sessions: dict[str, Any] = {}

    def __call__(self, file: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if file not in self._sessions:
            options = self._ort.SessionOptions()
            options.log_severity_level = 3
            options.enable_cpu_mem_arena = False  # give each run's ~1 GB (full size) back; sessions are kept
            try:
                self._sessions[file] = self._ort.InferenceSession(
                    str(self.folder / file), options, providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # onnxruntime raises its own exception types
                raise ExportError(f"onnxruntime cannot load {file}: {err}") from err
        return [np.asarray(o) for o in self._sessions[file].run(None, feeds)]


def run_onnx(path: os.PathLike[str] | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run one ONNX file with onnxruntime's CPU provider; outputs in graph order."""
    p = Path(os.fspath(path))
    return _Runner(p.parent)(p.name, feeds)


def _stage_checks(
    report: VerificationReport, stage: str, names: Sequence[str], case: str, actual: Sequence[np.ndarray],
    refs: Sequence[tuple[str, Sequence[np.ndarray], "Tolerance"]],
) -> None:
    for k, name in enumerate(names):
        for ref_name, ref, tol in refs:
            report.checks.append(compare(stage, name, case, ref_name, actual[k], ref[k], tol))


def verify_export(
    folder: os.PathLike[str] | str,
    net: "RPNet",
    manifest: Manifest,
    *,
    pair: Optional[tuple[np.ndarray, np.ndarray]] = None,
    steps: Optional[Steps] = None,
    seed: int = 0,
) -> VerificationReport:
    """Run every stage file in ``folder`` with onnxruntime and compare it with ``net``.

    Args:
        folder: the (possibly still temporary) export folder holding the ``.onnx`` files.
        net: the float32 network the files were exported from (not modified).
        manifest: the export's manifest (precision, stage files, model grid size).
        pair: optional ``(fixed, moving)`` ``(X, Y, Z)`` float32 arrays on the model grid.
        steps: progress display; None shows nothing.
        seed: seed of the random input.

    Returns:
        The report; call :meth:`VerificationReport.raise_for_failure` to fail on a mismatch.

    Raises:
        ExportError: onnxruntime cannot load a file.
    """
    steps = steps or Steps(enabled=False)
    t0 = time.perf_counter()
    run = _Runner(Path(os.fspath(folder)))
    report = VerificationReport(manifest.precision)
    fp16 = manifest.precision == "fp16"
    shape = manifest.size
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, np.ndarray]] = [("random", rng.random((2, 1, *shape), dtype=np.float32))]
    if pair is not None:
        cases.append(("pair", np.stack([pair[0], pair[1]])[:, None].astype(np.float32)))

    encoder = _prepared(stage_module(net, FEATURE_EXTRACTOR))
    estimators = {level: _prepared(net.estimator(level)) for level in LEVELS}
    main_tol = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    main_ref = REFERENCE_FP32
    for case, image in cases:
        stage = FEATURE_EXTRACTOR
        with steps.step(f"verify {stage} ({case} input, {'x'.join(map(str, shape))})"):
            feats = torch_reference(encoder, [image])
            refs: list[tuple[str, Sequence[np.ndarray], Tolerance]] = [(main_ref, feats, main_tol)]
            if fp16 and case == "random":
                refs.append((REFERENCE_FP16_WEIGHTS, torch_reference(_fp16_weights(encoder), [image]),
                             FP16_GRAPH_TOLERANCE))
            actual = run(manifest.stages[stage].file, {"image": image})
            _stage_checks(report, stage, FEATURE_OUTPUTS, case, actual, refs)
            del actual, refs
        for level in LEVELS:
            stage = estimator_stage(level)
            with steps.step(f"verify {stage} ({case} input)"):
                moving = np.ascontiguousarray(feats[level - 1][1:2])
                fixed = np.ascontiguousarray(feats[level - 1][0:1])
                flow = torch_reference(estimators[level], [moving, fixed])
                refs = [(main_ref, flow, main_tol)]
                if fp16 and case == "random":
                    twin = _fp16_weights(estimators[level])
                    refs.append((REFERENCE_FP16_WEIGHTS, torch_reference(twin, [moving, fixed]), FP16_GRAPH_TOLERANCE))
                actual = run(
                    manifest.stages[stage].file, {"moving_features": moving, "fixed_features": fixed}
                )
                _stage_checks(report, stage, ["flow"], case, actual, refs)
                del actual, refs
        del feats
    report.seconds = time.perf_counter() - t0
    return report


def report_table(report: VerificationReport) -> Any:
    """The report as a rich ``Table`` (stage, output, input, reference, errors, limit, result)."""
    from rich.table import Table

    table = Table(title=f"onnxruntime (CPU) vs PyTorch, {report.precision}, {report.seconds:.1f} s")
    for col in ("stage", "output", "input", "reference", "max abs err", "max rel err", "limit", "result"):
        table.add_column(col, justify="right" if col.startswith(("max", "limit")) else "left")
    for c in report.checks:
        result = "[green]pass" if c.passed else f"[red]FAIL{(' (' + c.note + ')') if c.note else ''}"
        table.add_row(c.stage, c.output, c.case, c.reference, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}",
                      f"{c.limit:.2e}", result)
    return table

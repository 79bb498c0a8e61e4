"""The bf16 accuracy gate: does OpenVINO in bf16 reproduce the fp32 registration of a real pair?

``iirp-export --verify-pair FIXED MOVING [--verify-labels FIXED_SEG MOVING_SEG]`` runs the whole
IterStop loop (``official`` rule, default delta and passes) with every stage on OpenVINO, once in
fp32 and once in bf16, and records in the manifest (``manifest.openvino["bf16_gate"]``):

* ``iterations``: per precision, and whether they are the same;
* ``flow_difference_voxels``: the 99th and 99.9th percentiles (and max, mean) of
  ``|flow_bf16 - flow_fp32|`` (vector norm, voxels of the model grid) inside the fixed image's
  foreground (Otsu, :func:`iirp.runtime.geometry.foreground_mask`, the runtime's rule);
* ``dice`` with labels: mean Dice over the labels both maps share, the moving labels warped onto
  the fixed image's grid as ``iirp-run`` writes them, per precision and the difference;
* ``status``: ``passed`` when every criterion below holds, ``failed`` otherwise (``reason`` names
  what failed), ``not_run`` where this machine cannot run bf16 natively (``reason`` says why).

``--precision auto`` uses bf16 only where this record says ``passed`` (see
:mod:`iirp.runtime.engines.openvino`). The export itself never fails on the gate.

Criteria (named constants):

* :data:`SAME_ITERATIONS`: IterStop's per-level pass counts must be equal (a different count
  is a different registration; the stopping test compares NCC gains with delta = 0.005).
* :data:`DICE_TOLERANCE`: with labels, |Dice_bf16 - Dice_fp32| <= 0.003 (the issue's bound for
  any faster path).
* :data:`FLOW_P999_VOXELS`: the 99.9th percentile of |flow difference| in the foreground <= 0.5
  voxel. Chosen from a bf16 engine emulated in PyTorch (bf16 weights, every convolution's input
  and output rounded to bf16, float32 accumulation, as OpenVINO's AMX kernels compute) with the
  released checkpoint on LPBA40 S05 <- S20: same iterations [1, 2, 2, 1], Dice 0.62472 vs
  0.62465, p99 0.12 and p99.9 0.28 voxel (``rpnet`` rule: p99.9 0.18). The bound leaves ~2x
  room for the real kernels' different rounding, and stays below a voxel, the scale at which a
  label boundary moves.

Stage-level bf16 tolerance (:data:`BF16_STAGE_TOLERANCE`, used by the tests): OpenVINO bf16 vs
fp32 on the same input, ``max abs <= 1e-3 + 3e-2 * max |fp32|``. The same emulation gave at most
1.4 % of the output's range (``flow_estimator_1`` of the released model on a random input; 0.4 to
0.8 % elsewhere, and on the random-weight tiny model), so the limit is about twice the worst case.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from iirp.export.progress import Steps
from iirp.export.verify import Tolerance
from iirp.manifest import STAGES, Manifest
from iirp.typing import PathLike

__all__ = [
    "SAME_ITERATIONS",
    "DICE_TOLERANCE",
    "FLOW_P999_VOXELS",
    "BF16_STAGE_TOLERANCE",
    "GATE_RULE",
    "bf16_gate",
    "flow_difference",
    "gate_failures",
]

#: bf16 must take the same IterStop passes per level as fp32.
SAME_ITERATIONS = True
#: largest |Dice_bf16 - Dice_fp32| (mean over shared labels) when labels are given.
DICE_TOLERANCE = 0.003
#: largest 99.9th percentile of |flow_bf16 - flow_fp32| (voxels) in the fixed image's foreground.
FLOW_P999_VOXELS = 0.5
#: OpenVINO bf16 stage outputs vs fp32 on the same input (see the module docstring).
BF16_STAGE_TOLERANCE = Tolerance(atol=1e-3, rtol=3e-2)
#: the IterStop rule the gate registers with (the default of iirp-run).
GATE_RULE = "official"


def _criteria() -> dict[str, Any]:
    return {"same_iterations": SAME_ITERATIONS, "dice_tolerance": DICE_TOLERANCE,
            "flow_p99_9_voxels": FLOW_P999_VOXELS, "rule": GATE_RULE}


def flow_difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Percentiles of ``|a - b|`` (vector norm over the 3 components) inside ``mask``.

    Args:
        a, b: ``(3, X, Y, Z)`` float32 flows in voxels.
        mask: ``(X, Y, Z)`` bool foreground; an empty mask measures every voxel.

    Returns:
        ``p99``, ``p99_9``, ``max``, ``mean`` (voxels) and ``voxels`` (how many were measured).
    """
    norm = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=0)
    values = norm[mask] if mask.any() else norm.ravel()
    return {"p99": float(np.percentile(values, 99)), "p99_9": float(np.percentile(values, 99.9)),
            "max": float(values.max()), "mean": float(values.mean()), "voxels": int(values.size)}


def gate_failures(
    iterations: dict[str, list[int]], difference: dict[str, float], dice: Optional[dict[str, float]]
) -> list[str]:
    """The criteria (module docstring) that a bf16 run breaks; empty when it passes.

    Args:
        iterations: ``{"fp32": [...], "bf16": [...]}`` passes per level, coarse to fine.
        difference: :func:`flow_difference` of the two flows.
        dice: ``{"fp32": d, "bf16": d}`` mean Dice, or None without labels.
    """
    failures = []
    if SAME_ITERATIONS and iterations["bf16"] != iterations["fp32"]:
        failures.append(f"iterations differ: fp32 {iterations['fp32']}, bf16 {iterations['bf16']}")
    if not difference["p99_9"] <= FLOW_P999_VOXELS:  # NaN fails too
        failures.append(f"p99.9 |flow difference| {difference['p99_9']:.3f} > {FLOW_P999_VOXELS} voxel")
    if dice is not None and not abs(dice["bf16"] - dice["fp32"]) <= DICE_TOLERANCE:
        failures.append(f"Dice differs by {abs(dice['bf16'] - dice['fp32']):.4f} > {DICE_TOLERANCE}")
    return failures


def _not_run(record: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**record, "status": "not_run", "reason": reason}


def bf16_gate(
    folder: PathLike,
    manifest: Manifest,
    pair: Sequence[PathLike],
    labels: Optional[Sequence[PathLike]] = None,
    *,
    steps: Optional[Steps] = None,
) -> dict[str, Any]:
    """Run the gate on an export folder; returns the record for ``manifest.openvino["bf16_gate"]``.

    Args:
        folder: the (staging) export folder with ``manifest`` saved in it.
        manifest: its manifest.
        pair: ``(FIXED, MOVING)`` image files, prepared as ``iirp-run`` prepares them (minmax).
        labels: ``(FIXED_SEG, MOVING_SEG)`` label maps on those images' grids, or None.
        steps: progress display.

    Returns:
        The record (module docstring); ``status`` ``not_run`` where the CPU has no native bf16,
        OpenVINO is missing or the export is not fp32.

    Raises:
        ImageError: unreadable pair or labels. OpenVINO failures while running are IirpError.
    """
    steps = steps or Steps(enabled=False)
    record: dict[str, Any] = {"criteria": _criteria(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import openvino

        from iirp.runtime.engines.openvino import cpu_capabilities, cpu_has_native_bf16, cpu_name
    except ImportError:
        return _not_run(record, "OpenVINO is not installed on the export machine")
    record.update({"openvino": openvino.__version__, "cpu": cpu_name()})
    if manifest.precision != "fp32":
        return _not_run(record, f"the export is {manifest.precision}; the openvino engine reads fp32 exports")
    if not cpu_has_native_bf16():
        return _not_run(record, f"the export machine's CPU ({record['cpu']}) has no native bf16 (OpenVINO "
                                f"capabilities {', '.join(cpu_capabilities())})")
    with steps.step(f"OpenVINO bf16 gate: fp32 and bf16 registrations of the verify pair ({GATE_RULE})"):
        return _run_gate(Path(folder), record, pair, labels)


def _run_gate(folder: Path, record: dict[str, Any], pair: Sequence[PathLike],
              labels: Optional[Sequence[PathLike]]) -> dict[str, Any]:
    import SimpleITK as sitk

    from iirp.iterstop import parse_iterstop
    from iirp.metrics import label_dice, shared_labels
    from iirp.runtime.deformation import apply_field, displacement_field
    from iirp.runtime.engines.options import BackendOptions
    from iirp.runtime.geometry import array_from_image, foreground_mask, image_from_array
    from iirp.runtime.imageio import read_image, read_labels
    from iirp.runtime.pipeline import EngineSolver
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    fixed, moving = read_image(pair[0], "fixed"), read_image(pair[1], "moving")
    segs = (read_labels(labels[0], "fixed-seg"), read_labels(labels[1], "moving-seg")) if labels else None
    rule = parse_iterstop(GATE_RULE)
    flows, iterations, dice = {}, {}, {}
    prepared = None
    for precision in ("fp32", "bf16"):
        options = BackendOptions(precision=precision, stages={stage: "openvino" for stage in STAGES})
        solver = EngineSolver(folder, "openvino", "cpu", options)
        if prepared is None:
            prepared = prepare_pair(fixed, moving, solver.contract, RegistrationOptions())
        try:
            trace = solver.solve(prepared.moving, prepared.fixed, rule)
        finally:
            solver.close()
        flows[precision], iterations[precision] = trace.flow, list(trace.iterations)
        if segs is not None:
            field = displacement_field(trace.flow, prepared.grid, fixed, prepared.pre_alignment)
            warped = apply_field(segs[1], fixed, field, labels=True)
            shared = shared_labels(sitk.GetArrayViewFromImage(segs[0]), sitk.GetArrayViewFromImage(segs[1]))
            dice[precision] = float(np.mean(list(label_dice(segs[0], warped, shared).values())))
    assert prepared is not None
    mask = array_from_image(foreground_mask(image_from_array(prepared.fixed, prepared.grid)), dtype=None) > 0
    diff = flow_difference(flows["bf16"], flows["fp32"], mask)
    same = iterations["bf16"] == iterations["fp32"]
    failures = gate_failures(iterations, diff, dice or None)
    record.update({
        "status": "failed" if failures else "passed",
        "reason": "; ".join(failures),
        "pair": [str(p) for p in pair],
        "labels": [str(p) for p in labels] if labels else None,
        "iterations": iterations,
        "same_iterations": same,
        "flow_difference_voxels": diff,
        "dice": {**dice, "difference": abs(dice["bf16"] - dice["fp32"])} if dice else None,
    })
    return record

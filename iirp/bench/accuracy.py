"""Registration accuracy over labelled pairs: every method on every pair, one solver for all.

Methods:

* ``identity``: no deformable registration; the moving image keeps its input
  alignment (affine-only for pre-aligned data such as LPBA40 here; with
  ``--affine`` the pre-alignment is applied). Shown as "affine only".
* ``rpnet``, ``official``, ``paper``, ``fixed:a,b,c,d``: the IterStop rules
  (SPEC section 5), with the same solver.

Each result is measured on the fixed image's grid with :func:`iirp.metrics.pair_metrics`:
the fixed labels against the warped moving labels, the field's Jacobian, and
the fixed image against the warped moving image (both under the
registration's intensity rule).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace, parse_iterstop
from iirp.manifest import ModelContract
from iirp.metrics import PairMetrics, pair_metrics, shared_labels
from iirp.runtime.deformation import apply_field
from iirp.runtime.geometry import array_from_image
from iirp.runtime.imageio import read_image, read_labels
from iirp.runtime.intensity import normalize
from iirp.runtime.pairs import ImagePair
from iirp.runtime.register import Registration, RegistrationOptions, register_images
from iirp.runtime.solvers import FlowSolver

__all__ = ["IDENTITY", "METHOD_LABELS", "IdentitySolver", "MethodResult", "parse_methods", "evaluate_pairs"]

IDENTITY = "identity"
#: How reports name the methods.
METHOD_LABELS = {IDENTITY: "affine only", "rpnet": "RP-Net", "official": "IIRP-Net (official)",
                 "paper": "IIRP-Net (paper rule)"}


class IdentitySolver:
    """A :class:`FlowSolver` that returns the zero flow: the "affine only" baseline."""

    engine = IDENTITY
    precision = "fp32"
    device = "cpu"

    def __init__(self, contract: ModelContract, source: str = "", source_sha256: str = "") -> None:
        self.contract = contract
        self.model_size = contract.size
        self.source = source
        self.source_sha256 = source_sha256

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        return IterStopTrace(flow=np.zeros((3, *fixed.shape), np.float32))


@dataclass
class MethodResult:
    """One method on one pair.

    Attributes:
        pair: the pair id.
        method: ``identity`` or an IterStop spec.
        metrics: the measures.
        iterations: passes per level (coarse to fine); zeros for ``identity``.
        estimator_passes: every estimator call.
        seconds: registration wall time (prepare, solve, field, warps).
        labels: how many labels were scored.
    """

    pair: str
    method: str
    metrics: PairMetrics
    iterations: list[int]
    estimator_passes: int
    seconds: float
    labels: int

    def to_dict(self) -> dict[str, Any]:
        return {"pair": self.pair, "method": self.method, "iterations": self.iterations,
                "estimator_passes": self.estimator_passes, "seconds": self.seconds, "labels": self.labels,
                **self.metrics.to_dict()}


def parse_methods(spec: str) -> list[str]:
    """``"identity,rpnet,official"`` -> validated method list (IterStop specs parsed to their names).

    Raises:
        IterStopSpecError: an unknown method.
        ValueError: empty or repeated.
    """
    methods: list[str] = []
    # a fixed:a,b,c,d spec holds commas of its own
    for item in (m.strip().lower() for m in re.findall(r"\s*fixed:[^,]*(?:,[^,]*){0,3}|[^,]+", spec) if m.strip()):
        name = item if item == IDENTITY else parse_iterstop(item).name
        if name in methods:
            raise ValueError(f"method {name!r} is listed twice in --methods {spec!r}")
        methods.append(name)
    if not methods:
        raise ValueError(f"--methods {spec!r} names no method")
    return methods


def evaluate_pairs(
    pairs: Sequence[ImagePair],
    solver: FlowSolver,
    methods: Sequence[str],
    options: RegistrationOptions = RegistrationOptions(),
    *,
    on_result: Optional[Callable[[MethodResult, Registration], None]] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> list[MethodResult]:
    """Run every method on every pair (see the module docstring).

    Args:
        pairs: pairs with ``fixed_seg`` and ``moving_seg``.
        solver: used for every pair and method (loaded once).
        methods: from :func:`parse_methods`.
        options: the registration options; ``iterstop`` is replaced by each method.
        on_result: called after each result with the registration (QC pictures).
        on_step: called with a short description before each registration (progress).

    Raises:
        IirpError: a pair cannot be read or registered (its id is in the message).
    """
    rule = options.intensity_rule(solver.contract)
    identity = IdentitySolver(solver.contract, solver.source, solver.source_sha256)
    results: list[MethodResult] = []
    for pair in pairs:
        if pair.fixed_seg is None or pair.moving_seg is None:
            raise IirpError(f"pair {pair.id}: accuracy needs fixed_seg and moving_seg")
        try:
            fixed, moving = read_image(pair.fixed, "fixed"), read_image(pair.moving, "moving")
            fixed_seg, moving_seg = read_labels(pair.fixed_seg, "fixed-seg"), read_labels(pair.moving_seg, "moving-seg")
            labels = list(pair.labels) if pair.labels else list(
                shared_labels(sitk.GetArrayFromImage(fixed_seg), sitk.GetArrayFromImage(moving_seg)))
            fixed_n = array_from_image(normalize(fixed, rule, f"fixed image {pair.fixed}"))
            moving_n = normalize(moving, rule, f"moving image {pair.moving}")
        except IirpError as err:
            raise type(err)(f"pair {pair.id}: {err}") from err
        for method in methods:
            if on_step is not None:
                on_step(f"{pair.id}: {METHOD_LABELS.get(method, method)}")
            chosen = identity if method == IDENTITY else solver
            opts = replace(options, iterstop="rpnet" if method == IDENTITY else method)
            t0 = time.perf_counter()
            try:
                reg = register_images(fixed, moving, chosen, moving_seg=moving_seg, options=opts,
                                      names=(f"fixed image {pair.fixed}", f"moving image {pair.moving}"))
            except IirpError as err:
                raise type(err)(f"pair {pair.id}, method {method}: {err}") from err
            seconds = time.perf_counter() - t0
            assert reg.warped_seg is not None
            warped_n = array_from_image(apply_field(moving_n, fixed, reg.field))
            try:
                metrics = pair_metrics(fixed_seg, reg.warped_seg, reg.field, fixed_n, warped_n, labels)
            except ValueError as err:
                raise IirpError(f"pair {pair.id}: {err}") from err
            result = MethodResult(
                pair=pair.id, method=method, metrics=metrics,
                iterations=[0, 0, 0, 0] if method == IDENTITY else list(reg.report["iterations"]),
                estimator_passes=int(reg.report["estimator_passes"]), seconds=seconds, labels=len(labels),
            )
            results.append(result)
            if on_result is not None:
                on_result(result, reg)
    return results


def summarize(results: Sequence[MethodResult], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method: mean and (population) std over pairs of every measure, plus mean seconds."""
    keys = ("dice", "hd95_mm", "folding_fraction", "sdlogj", "mse", "ncc")
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        rows = [r for r in results if r.method == method]
        if not rows:
            continue
        stats: dict[str, float] = {"pairs": float(len(rows))}
        for key in keys:
            values = np.asarray([getattr(r.metrics, key) for r in rows], dtype=np.float64)
            stats[f"{key}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            stats[f"{key}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
        stats["seconds_mean"] = float(np.mean([r.seconds for r in rows]))
        stats["estimator_passes_mean"] = float(np.mean([r.estimator_passes for r in rows]))
        out[method] = stats
    return out


def qc_name(result: MethodResult) -> Path:
    """File name of a result's QC picture."""
    return Path(f"{result.pair}_{result.method.replace(':', '-').replace(',', '-')}.png")

"""IterStop: the coarse-to-fine iterative inference of IIRP-Net (SPEC section 5).

This module is the single definition of every stopping rule. It knows
nothing about tensors: the caller supplies the spatial operations and the
estimator through :class:`LevelOps`, so the PyTorch reference
(:mod:`iirp.model.reference`) and the engine runtime share the same loop.

Levels are numbered as in the paper: 4 is the coarsest (1/8 resolution),
1 the finest (full resolution). Reported per-level lists run coarse to fine,
i.e. index 0 is level 4.

Rules:

* ``official`` (default): the released checkpoint's behaviour (SPEC 5a).
* ``paper``: Algorithm 1 of the paper (SPEC 5b).
* ``fixed:a,b,c,d``: exactly a, b, c, d passes at levels 4, 3, 2, 1 (SPEC 5c).
* ``rpnet``: ``fixed:1,1,1,1``, plain RP-Net.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, Optional, Protocol, TypeVar

from iirp.errors import IterStopSpecError

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_MAX_ITERS",
    "LEVELS",
    "IterStopRule",
    "IterStopTrace",
    "LevelOps",
    "parse_iterstop",
    "run_iterstop",
]

DEFAULT_DELTA = 0.005
DEFAULT_MAX_ITERS = 10
#: Pyramid levels in the order they are processed (coarse to fine).
LEVELS: tuple[int, int, int, int] = (4, 3, 2, 1)

RuleKind = Literal["official", "paper", "fixed"]
F = TypeVar("F")


@dataclass(frozen=True)
class IterStopRule:
    """A parsed IterStop rule.

    Attributes:
        kind: ``official``, ``paper`` or ``fixed``.
        counts: passes per level (coarse to fine) for ``fixed``; None otherwise.
        delta: improvement threshold on the NCC score (dimensionless).
        max_iters: maximum estimator passes per level (T).
        name: the spec, stripped and lower-cased (``rpnet`` stays ``rpnet``).
    """

    kind: RuleKind
    counts: Optional[tuple[int, int, int, int]]
    delta: float
    max_iters: int
    name: str


def parse_iterstop(
    spec: str, delta: float = DEFAULT_DELTA, max_iters: int = DEFAULT_MAX_ITERS
) -> IterStopRule:
    """Parse ``official | paper | rpnet | fixed:a,b,c,d``.

    Raises:
        IterStopSpecError: malformed spec, negative counts, ``delta`` not a
            finite number >= 0 or ``max_iters`` < 1.
    """
    text = spec.strip().lower()
    if not (delta >= 0.0 and delta < float("inf")):
        raise IterStopSpecError(f"iterstop 'delta' must be a finite number >= 0, got {delta}")
    if not (max_iters >= 1 and max_iters < float("inf") and int(max_iters) == max_iters):
        raise IterStopSpecError(f"iterstop 'max_iters' must be an integer >= 1, got {max_iters}")
    if text in ("official", "paper"):
        return IterStopRule(text, None, float(delta), int(max_iters), text)  # type: ignore[arg-type]
    if text == "rpnet":
        return IterStopRule("fixed", (1, 1, 1, 1), float(delta), int(max_iters), "rpnet")
    if text.startswith("fixed:"):
        parts = text[len("fixed:") :].split(",")
        try:
            counts = tuple(int(p) for p in parts)
        except ValueError:
            counts = ()
        if len(counts) != 4 or any(c < 0 for c in counts):
            raise IterStopSpecError(
                f"iterstop spec {spec!r}: 'fixed:' needs four integers >= 0 (passes at levels "
                "4,3,2,1, coarse to fine), e.g. 'fixed:1,3,2,2'"
            )
        if max(counts) > max_iters:
            raise IterStopSpecError(
                f"iterstop spec {spec!r}: {max(counts)} passes at one level exceed max_iters {int(max_iters)} "
                "(--max-iters caps every rule)"
            )
        return IterStopRule("fixed", counts, float(delta), int(max_iters), text)  # type: ignore[arg-type]
    raise IterStopSpecError(
        f"iterstop spec {spec!r} not understood: expected 'official', 'paper', 'rpnet' or "
        "'fixed:a,b,c,d'"
    )


class LevelOps(Protocol[F]):
    """What the IterStop loop needs from a backend. ``F`` is its flow type.

    Flows are displacements in voxels of the level's own grid (see
    :mod:`iirp.runtime.geometry`). ``None`` stands for "no flow yet" at
    level 4, so the first estimator pass sees the raw moving features.
    """

    def zero_flow(self, level: int) -> F:
        """An all-zero flow on the grid of ``level``."""
        ...

    def estimate(self, level: int, flow: Optional[F]) -> F:
        """Residual flow ``f_level(warp(F_m^level, flow), F_f^level)``; raw F_m if flow is None."""
        ...

    def compose(self, flow: Optional[F], du: F) -> F:
        """``warp(flow, du) + du``; ``du`` itself when flow is None."""
        ...

    def upsample(self, flow: F, level: int) -> F:
        """``up2`` of a flow of ``level`` onto the grid of ``level - 1`` (vectors doubled)."""
        ...

    def score(self, level: int, flow: F) -> float:
        """Global NCC between ``warp(m, up_{2^(level-1)}(flow))`` and ``f`` at full resolution."""
        ...


@dataclass
class IterStopTrace(Generic[F]):
    """Result of one IterStop run.

    Attributes:
        flow: full-resolution flow of level 1.
        iterations: counted passes per level, coarse to fine (levels 4, 3, 2, 1).
        estimator_passes: every estimator call made, counted or reverted.
        scores: every score computed, per level, coarse to fine, in order.
        timings_ms: wall time per stage, filled in by the caller (e.g. ``features``).
    """

    flow: F
    iterations: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    estimator_passes: int = 0
    scores: list[list[float]] = field(default_factory=lambda: [[], [], [], []])
    timings_ms: dict[str, float] = field(default_factory=dict)


def run_iterstop(ops: LevelOps[F], rule: IterStopRule) -> IterStopTrace[F]:
    """Run the coarse-to-fine loop with ``rule`` over ``ops``.

    Returns:
        The trace; its ``flow`` is the level-1 flow (full resolution).
    """
    trace: IterStopTrace[F] = IterStopTrace(flow=None)  # type: ignore[arg-type]
    flow: Optional[F] = None
    for slot, level in enumerate(LEVELS):
        if level != 4:
            assert flow is not None
            flow = ops.upsample(flow, level + 1)
        if rule.kind == "fixed":
            assert rule.counts is not None
            flow = _fixed_level(ops, trace, level, flow, rule.counts[slot])
        elif rule.kind == "paper":
            flow = _paper_level(ops, trace, slot, level, flow, rule)
        elif level == 4:
            flow = _official_coarsest(ops, trace, slot, flow, rule)
        else:
            flow = _official_finer(ops, trace, slot, level, flow, rule)
        if flow is None:  # level 4 with zero passes
            flow = ops.zero_flow(level)
    assert flow is not None
    trace.flow = flow
    return trace


def _pass(ops: LevelOps[F], trace: IterStopTrace[F], level: int, flow: Optional[F]) -> F:
    """One estimator pass composed into ``flow``."""
    trace.estimator_passes += 1
    return ops.compose(flow, ops.estimate(level, flow))


def _fixed_level(
    ops: LevelOps[F], trace: IterStopTrace[F], level: int, flow: Optional[F], count: int
) -> Optional[F]:
    for _ in range(count):
        flow = _pass(ops, trace, level, flow)
    trace.iterations[LEVELS.index(level)] = count
    return flow


def _official_coarsest(
    ops: LevelOps[F], trace: IterStopTrace[F], slot: int, flow: Optional[F], rule: IterStopRule
) -> Optional[F]:
    """SPEC 5a, level 4: pass, compose, score; revert the pass that fails to improve."""
    best = 0.0
    for t in range(rule.max_iters):
        candidate = _pass(ops, trace, 4, flow)
        score = ops.score(4, candidate)
        trace.scores[slot].append(score)
        if score < best + rule.delta:
            if t == 0:
                # The first pass already fails: keep it (the released code would crash here).
                trace.iterations[slot] = 1
                return candidate
            return flow
        best = score
        flow = candidate
        trace.iterations[slot] += 1
    return flow


def _official_finer(
    ops: LevelOps[F], trace: IterStopTrace[F], slot: int, level: int, flow: Optional[F],
    rule: IterStopRule,
) -> Optional[F]:
    """SPEC 5a, levels 3..1: score the current flow; stop keeping it, else pass."""
    assert flow is not None
    best = 0.0
    for _ in range(rule.max_iters):
        score = ops.score(level, flow)
        trace.scores[slot].append(score)
        if score < best + rule.delta:
            break
        best = score
        trace.iterations[slot] += 1
        flow = _pass(ops, trace, level, flow)
    return flow


def _paper_level(
    ops: LevelOps[F], trace: IterStopTrace[F], slot: int, level: int, flow: Optional[F],
    rule: IterStopRule,
) -> Optional[F]:
    """SPEC 5b: score the incoming flow, then pass/compose/score; revert the last pass."""
    previous = ops.score(level, flow if flow is not None else ops.zero_flow(level))
    trace.scores[slot].append(previous)
    for _ in range(rule.max_iters):
        candidate = _pass(ops, trace, level, flow)
        score = ops.score(level, candidate)
        trace.scores[slot].append(score)
        if score - previous < rule.delta:
            return flow
        previous = score
        flow = candidate
        trace.iterations[slot] += 1
    return flow

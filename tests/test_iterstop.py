"""IterStop rules of SPEC section 5 on a scripted toy backend (no tensors).

The toy flow is a tuple recording its history: ``("est", level, n)`` for the
n-th estimator call at ``level`` and ``("up", level)`` for an upsampling from
``level``. ``score(level, flow)`` looks its value up in a per-level script,
indexed by the number of estimator passes of that level the flow contains,
so a reverted pass and a kept pass are told apart by the flow alone.
"""

from __future__ import annotations

import math

import pytest

from iirp.errors import IirpError, IterStopSpecError
from iirp.iterstop import (
    DEFAULT_DELTA,
    DEFAULT_MAX_ITERS,
    LEVELS,
    IterStopRule,
    parse_iterstop,
    run_iterstop,
)

Flow = tuple


class ToyOps:
    """A :class:`iirp.iterstop.LevelOps` whose flows are history tuples and whose scores are scripted."""

    def __init__(self, scripts: dict[int, list[float]] | None = None) -> None:
        self.scripts = scripts or {}
        self.calls: list[tuple] = []
        self._estimates = {level: 0 for level in LEVELS}

    def zero_flow(self, level: int) -> Flow:
        self.calls.append(("zero_flow", level))
        return ()

    def estimate(self, level: int, flow: Flow | None) -> tuple:
        self.calls.append(("estimate", level, flow))
        marker = ("est", level, self._estimates[level])
        self._estimates[level] += 1
        return marker

    def compose(self, flow: Flow | None, du: tuple) -> Flow:
        self.calls.append(("compose", flow, du))
        return (() if flow is None else flow) + (du,)

    def upsample(self, flow: Flow, level: int) -> Flow:
        self.calls.append(("upsample", flow, level))
        return flow + (("up", level),)

    def score(self, level: int, flow: Flow) -> float:
        self.calls.append(("score", level, flow))
        passes = sum(1 for e in flow if e[0] == "est" and e[1] == level)
        script = self.scripts[level]
        assert passes < len(script), (
            f"script of level {level} too short for {passes} passes"
        )
        return script[passes]

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _est(level: int, *indices: int) -> tuple:
    return tuple(("est", level, n) for n in indices)


def _up(level: int) -> tuple:
    return (("up", level),)


# Level scripts that always improve by 0.1 per pass, starting at 0.1.
RISING = [0.1 * (n + 1) for n in range(30)]


# --------------------------------------------------------------------------- official


def test_official_reverts_at_level_4_and_keeps_at_finer_levels():
    ops = ToyOps(
        {
            # index = passes in the flow; level 4 never scores the empty flow.
            4: [None, 0.3, 0.5, 0.502],  # pass 3 gains 0.002 < delta: reverted
            3: [0.51, 0.6, 0.7, 0.6],  # 3 passes, 4th score drops: stop, keep
            2: [
                0.71,
                0.712,
            ],  # one pass, then a gain of 0.002 < delta: stop, keep that pass
            1: [0.004],  # below best (0) + delta: no pass at all
        }
    )
    trace = run_iterstop(ops, parse_iterstop("official"))

    assert trace.iterations == [2, 3, 1, 0]
    # estimator_passes counts the reverted level-4 pass; finer levels never revert.
    assert trace.estimator_passes == 3 + 3 + 1 + 0
    assert trace.scores == [
        [0.3, 0.5, 0.502],
        [0.51, 0.6, 0.7, 0.6],
        [0.71, 0.712],
        [0.004],
    ]
    expected = (
        _est(4, 0, 1)
        + _up(4)  # ("est", 4, 2) was reverted
        + _est(3, 0, 1, 2)
        + _up(3)  # the pass that scored 0.6 is kept
        + _est(2, 0)
        + _up(2)
    )
    assert trace.flow == expected


def test_official_level_4_first_pass_sees_no_flow_then_the_composed_one():
    ops = ToyOps({4: [None, 0.3, 0.5, 0.4], 3: [0.0], 2: [0.0], 1: [0.0]})
    run_iterstop(ops, parse_iterstop("official"))
    estimates_4 = [c[2] for c in ops.calls if c[0] == "estimate" and c[1] == 4]
    assert estimates_4 == [None, _est(4, 0), _est(4, 0, 1)]
    assert ("zero_flow", 4) not in ops.calls


def test_official_call_order_at_finer_levels_is_score_then_pass():
    ops = ToyOps({4: [None, 0.3, 0.0], 3: [0.4, 0.5, 0.45], 2: [0.0], 1: [0.0]})
    run_iterstop(ops, parse_iterstop("official"))
    level3 = [c for c in ops.calls if (c[0] in ("score", "estimate") and c[1] == 3)]
    assert [c[0] for c in level3] == ["score", "estimate", "score", "estimate", "score"]
    # The finer estimator always runs on the current (upsampled + composed) flow.
    assert level3[1][2] == _est(4, 0) + _up(4)
    assert level3[3][2] == _est(4, 0) + _up(4) + _est(3, 0)
    # Each finer level starts from up2 of the previous one.
    ups = [(c[1], c[2]) for c in ops.calls if c[0] == "upsample"]
    assert ups == [
        (_est(4, 0), 4),
        (_est(4, 0) + _up(4) + _est(3, 0, 1), 3),
        (_est(4, 0) + _up(4) + _est(3, 0, 1) + _up(3), 2),
    ]


def test_official_max_iters_caps_every_level():
    ops = ToyOps({level: RISING for level in LEVELS})
    trace = run_iterstop(ops, parse_iterstop("official", max_iters=3))
    assert trace.iterations == [3, 3, 3, 3]
    assert trace.estimator_passes == 12
    # Level 4 scores after each pass; finer levels score before each pass (no 4th score).
    assert trace.scores[0] == pytest.approx(RISING[1:4])
    for slot in (1, 2, 3):
        assert trace.scores[slot] == pytest.approx(RISING[0:3])
    assert trace.flow == (
        _est(4, 0, 1, 2)
        + _up(4)
        + _est(3, 0, 1, 2)
        + _up(3)
        + _est(2, 0, 1, 2)
        + _up(2)
        + _est(1, 0, 1, 2)
    )


def test_official_default_max_iters_is_ten():
    ops = ToyOps({level: RISING for level in LEVELS})
    trace = run_iterstop(ops, parse_iterstop("official"))
    assert DEFAULT_MAX_ITERS == 10
    assert trace.iterations == [10, 10, 10, 10]
    assert trace.estimator_passes == 40


@pytest.mark.parametrize(
    "second,continues",
    [
        (0.5 + 0.0049, False),  # gain just below delta: stop
        (0.5 + 0.0051, True),  # gain just above delta: continue
    ],
)
def test_official_delta_is_honoured_at_finer_levels(second, continues):
    ops = ToyOps({4: [None, 0.3, 0.0], 3: [0.5, second, 0.0], 2: [0.0], 1: [0.0]})
    trace = run_iterstop(ops, parse_iterstop("official", delta=0.005))
    assert trace.iterations[1] == (2 if continues else 1)
    assert trace.scores[1] == ([0.5, second, 0.0] if continues else [0.5, second])


@pytest.mark.parametrize(
    "second,continues",
    [(0.5 + 0.0049, False), (0.5 + 0.0051, True)],
)
def test_official_delta_is_honoured_at_level_4(second, continues):
    ops = ToyOps({4: [None, 0.5, second, 0.0], 3: [0.0], 2: [0.0], 1: [0.0]})
    trace = run_iterstop(ops, parse_iterstop("official"))
    assert trace.iterations[0] == (2 if continues else 1)
    assert trace.estimator_passes == (3 if continues else 2)
    assert trace.flow[: trace.iterations[0]] == _est(4, *range(trace.iterations[0]))
    assert trace.flow[trace.iterations[0]] == ("up", 4)


def test_official_gain_equal_to_delta_continues():
    # SPEC: stop when the score is *below* best + delta. Binary-exact numbers: 0.5 + 0.25 == 0.75.
    ops = ToyOps(
        {4: [None, 0.5, 0.75, 0.0], 3: [0.25, 0.5, 0.75, 0.0], 2: [0.0], 1: [0.0]}
    )
    trace = run_iterstop(ops, parse_iterstop("official", delta=0.25))
    assert trace.iterations[:2] == [2, 3]


def test_official_best_starts_at_zero_at_every_finer_level():
    # Level 3 ends with a high best (0.9); level 2 starts lower (0.3) and must still pass,
    # because best is reset to 0 there. Level 1's first score is just below 0 + delta.
    ops = ToyOps({4: [None, 0.3, 0.0], 3: [0.8, 0.9, 0.1], 2: [0.3, 0.2], 1: [0.0049]})
    trace = run_iterstop(ops, parse_iterstop("official", delta=0.005))
    assert trace.iterations == [1, 2, 1, 0]
    assert trace.scores[3] == [0.0049]
    assert trace.flow[-1] == ("up", 2)  # level 1 made no pass


@pytest.mark.parametrize("first", [0.0049, 0.0, -0.3])
def test_official_level_4_first_pass_below_delta_keeps_that_flow(first):
    ops = ToyOps({4: [None, first, 0.9], 3: [0.0], 2: [0.0], 1: [0.0]})
    trace = run_iterstop(ops, parse_iterstop("official", delta=0.005))
    assert trace.iterations[0] == 1
    assert trace.estimator_passes == 1
    assert trace.scores[0] == [first]
    assert trace.flow == _est(4, 0) + _up(4) + _up(3) + _up(2)
    assert "zero_flow" not in ops.names()


def test_official_zero_delta_stops_only_on_a_drop():
    # With delta 0 an equal score still counts (0.5 >= 0.5 + 0); only the drop to 0.49 stops.
    # Finer levels score -1 < 0 + 0 and make no pass.
    ops = ToyOps({4: [None, 0.5, 0.5, 0.49], 3: [-1.0], 2: [-1.0], 1: [-1.0]})
    trace = run_iterstop(ops, parse_iterstop("official", delta=0.0))
    assert trace.iterations == [2, 0, 0, 0]
    assert trace.flow[:3] == _est(4, 0, 1) + _up(4)


def test_trace_defaults_and_timings_left_to_caller():
    ops = ToyOps({4: [None, 0.0], 3: [0.0], 2: [0.0], 1: [0.0]})
    trace = run_iterstop(ops, parse_iterstop("official"))
    assert trace.timings_ms == {}
    assert len(trace.iterations) == len(trace.scores) == 4


# --------------------------------------------------------------------------- paper


def test_paper_scores_incoming_flow_first_and_reverts_at_every_level():
    ops = ToyOps(
        {
            4: [0.1, 0.3, 0.302],  # score(zero flow), +0.2 kept, +0.002 reverted
            3: [0.31, 0.4, 0.5, 0.45],  # two kept, third reverted
            2: [0.5, 0.502],  # first pass already fails: reverted, 0 iterations
            1: [
                -0.5,
                -0.3,
                -0.2,
                -0.1999,
            ],  # no best=0 floor: negative scores still improve
        }
    )
    trace = run_iterstop(ops, parse_iterstop("paper"))
    assert trace.iterations == [1, 2, 0, 2]
    assert trace.estimator_passes == 2 + 3 + 1 + 3
    assert trace.scores == [
        [0.1, 0.3, 0.302],
        [0.31, 0.4, 0.5, 0.45],
        [0.5, 0.502],
        [-0.5, -0.3, -0.2, -0.1999],
    ]
    assert trace.flow == _est(4, 0) + _up(4) + _est(3, 0, 1) + _up(3) + _up(2) + _est(
        1, 0, 1
    )
    # Level 4's first score is of a zero flow; its first estimator pass sees no flow.
    assert ops.calls[0] == ("zero_flow", 4)
    assert ops.calls[1] == ("score", 4, ())
    assert ops.calls[2] == ("estimate", 4, None)


def test_paper_level_4_failing_first_pass_gives_zero_flow_then_upsampled():
    ops = ToyOps({4: [0.2, 0.1], 3: [0.0, 0.0], 2: [0.0, 0.0], 1: [0.0, 0.0]})
    trace = run_iterstop(ops, parse_iterstop("paper"))
    assert trace.iterations == [0, 0, 0, 0]
    assert trace.estimator_passes == 4
    assert trace.flow == _up(4) + _up(3) + _up(2)
    assert (
        "upsample",
        (),
        4,
    ) in ops.calls  # the zero flow of level 4 is what gets upsampled


def test_paper_delta_is_relative_to_previous_score():
    # Gains: 0.0051 (kept), 0.0049 (reverted).
    ops = ToyOps({4: [0.5, 0.5051, 0.51], 3: [0.0, 0.0], 2: [0.0, 0.0], 1: [0.0, 0.0]})
    trace = run_iterstop(ops, parse_iterstop("paper", delta=0.005))
    assert trace.iterations[0] == 1
    assert trace.flow[:2] == _est(4, 0) + _up(4)


def test_paper_max_iters_caps_every_level():
    ops = ToyOps({level: RISING for level in LEVELS})
    trace = run_iterstop(ops, parse_iterstop("paper", max_iters=2))
    assert trace.iterations == [2, 2, 2, 2]
    assert trace.estimator_passes == 8
    for slot in range(4):
        assert trace.scores[slot] == pytest.approx(RISING[0:3])


# --------------------------------------------------------------------------- fixed / rpnet


@pytest.mark.parametrize(
    "counts", [(1, 3, 2, 2), (2, 0, 3, 1), (0, 1, 1, 1), (0, 0, 0, 0), (12, 0, 0, 11)]
)
def test_fixed_counts_are_exact_and_never_score(counts):
    ops = ToyOps()  # no scripts: any score() call would raise KeyError
    spec = "fixed:" + ",".join(map(str, counts))
    trace = run_iterstop(ops, parse_iterstop(spec, max_iters=max(12, *counts)))
    assert trace.iterations == list(counts)
    assert trace.estimator_passes == sum(counts)
    assert trace.scores == [[], [], [], []]
    assert "score" not in ops.names()
    expected = _est(4, *range(counts[0])) + _up(4) + _est(3, *range(counts[1])) + _up(3)
    expected += _est(2, *range(counts[2])) + _up(2) + _est(1, *range(counts[3]))
    assert trace.flow == expected


@pytest.mark.parametrize(("spec", "max_iters"), [("fixed:100000,0,0,0", 10), ("fixed:1,1,1,3", 2), ("fixed:11,0,0,0", 10)])
def test_fixed_counts_above_max_iters_are_refused(spec: str, max_iters: int) -> None:
    """--max-iters caps every rule: a fixed count above it is a malformed spec, not a run that never ends."""
    with pytest.raises(IterStopSpecError, match=rf"exceed max_iters {max_iters} \(--max-iters caps every rule\)"):
        parse_iterstop(spec, max_iters=max_iters)


def test_fixed_zero_at_level_4_upsamples_a_zero_flow():
    ops = ToyOps()
    trace = run_iterstop(ops, parse_iterstop("fixed:0,2,0,1"))
    assert ops.calls[0] == ("zero_flow", 4)
    assert ops.calls[1] == ("upsample", (), 4)
    assert trace.flow == _up(4) + _est(3, 0, 1) + _up(3) + _up(2) + _est(1, 0)


def test_rpnet_is_fixed_one_per_level():
    rule = parse_iterstop("rpnet")
    assert rule == IterStopRule(
        "fixed", (1, 1, 1, 1), DEFAULT_DELTA, DEFAULT_MAX_ITERS, "rpnet"
    )
    ops_rp, ops_fixed = ToyOps(), ToyOps()
    trace_rp = run_iterstop(ops_rp, rule)
    trace_fixed = run_iterstop(ops_fixed, parse_iterstop("fixed:1,1,1,1"))
    one_each = (
        _est(4, 0) + _up(4) + _est(3, 0) + _up(3) + _est(2, 0) + _up(2) + _est(1, 0)
    )
    assert trace_rp.flow == trace_fixed.flow == one_each
    assert trace_rp.iterations == trace_fixed.iterations == [1, 1, 1, 1]
    assert ops_rp.calls == ops_fixed.calls
    assert "score" not in ops_rp.names()


# --------------------------------------------------------------------------- parse_iterstop


@pytest.mark.parametrize(
    "spec,kind,counts,name",
    [
        ("official", "official", None, "official"),
        ("paper", "paper", None, "paper"),
        ("rpnet", "fixed", (1, 1, 1, 1), "rpnet"),
        ("fixed:1,3,2,2", "fixed", (1, 3, 2, 2), "fixed:1,3,2,2"),
        ("fixed:0,0,0,0", "fixed", (0, 0, 0, 0), "fixed:0,0,0,0"),
        ("  Official ", "official", None, "official"),
        ("FIXED:2,0,1,10", "fixed", (2, 0, 1, 10), "fixed:2,0,1,10"),
    ],
)
def test_parse_valid_specs(spec, kind, counts, name):
    rule = parse_iterstop(spec)
    assert rule.kind == kind
    assert rule.counts == counts
    assert rule.name == name
    assert rule.delta == DEFAULT_DELTA == 0.005
    assert rule.max_iters == DEFAULT_MAX_ITERS
    if counts is not None:
        assert all(type(c) is int for c in rule.counts)


def test_parse_passes_delta_and_max_iters():
    rule = parse_iterstop("paper", delta=0.01, max_iters=4)
    assert (rule.delta, rule.max_iters) == (0.01, 4)
    assert type(rule.delta) is float and type(rule.max_iters) is int
    assert parse_iterstop("official", delta=0).delta == 0.0
    assert parse_iterstop("official", max_iters=3.0).max_iters == 3


def test_rule_is_frozen():
    rule = parse_iterstop("official")
    with pytest.raises(AttributeError):
        rule.delta = 1.0  # type: ignore[misc]


def test_iterstop_spec_error_is_a_value_error_and_an_iirp_error():
    assert issubclass(IterStopSpecError, ValueError)
    assert issubclass(IterStopSpecError, IirpError)
    with pytest.raises(ValueError):
        parse_iterstop("foo")


FOUR_INTS = r"'fixed:' needs four integers >= 0 \(passes at levels 4,3,2,1, coarse to fine\), e\.g\. 'fixed:1,3,2,2'"


@pytest.mark.parametrize(
    "spec",
    [
        "fixed:1,2,3",
        "fixed:1,2,3,4,5",
        "fixed:a,b,c,d",
        "fixed:-1,1,1,1",
        "fixed:1,1,1,-2",
        "fixed:",
        "fixed:1.5,1,1,1",
        "fixed:1,2,3,4,",
    ],
)
def test_parse_rejects_malformed_fixed(spec):
    with pytest.raises(
        IterStopSpecError,
        match=r"iterstop spec '" + spec.replace(".", r"\.") + "': " + FOUR_INTS,
    ):
        parse_iterstop(spec)


@pytest.mark.parametrize(
    "spec", ["foo", "", "official,paper", "fixed1,1,1,1", "rp-net"]
)
def test_parse_rejects_unknown_spec(spec):
    with pytest.raises(
        IterStopSpecError,
        match=r"iterstop spec '"
        + spec
        + r"' not understood: expected 'official', 'paper', 'rpnet' or 'fixed:a,b,c,d'",
    ):
        parse_iterstop(spec)


@pytest.mark.parametrize("delta", [-0.001, -1.0, math.nan, math.inf, -math.inf])
def test_parse_rejects_bad_delta(delta):
    shown = str(delta).replace("-", r"\-")
    with pytest.raises(
        IterStopSpecError,
        match=r"iterstop 'delta' must be a finite number >= 0, got " + shown,
    ):
        parse_iterstop("official", delta=delta)


@pytest.mark.parametrize("max_iters", [0, -1, 2.5])
def test_parse_rejects_bad_max_iters(max_iters):
    with pytest.raises(
        IterStopSpecError,
        match=r"iterstop 'max_iters' must be an integer >= 1, got " + str(max_iters),
    ):
        parse_iterstop("paper", max_iters=max_iters)


@pytest.mark.parametrize("max_iters", [math.inf, math.nan])
def test_parse_rejects_non_finite_max_iters(max_iters):
    with pytest.raises(IterStopSpecError, match=r"'max_iters' must be an integer >= 1"):
        parse_iterstop("official", max_iters=max_iters)

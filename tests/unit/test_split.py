"""The split model: normalization, kinds, who emits which tokens, and plans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaserve.split import (
    KIND_DECODE,
    KIND_NONE,
    KIND_PD,
    KIND_PROMPT,
    Plan,
    normalize_split,
    split_kind,
    tokens_emitted_by_a,
)

PLEN, OLEN = 10, 5  # prompt and output length of the table below; positions 0..14

# (s, normalized s, kind, tokens emitted by A)
TABLE = [
    (-5, 1, KIND_PROMPT, 0),
    (0, 1, KIND_PROMPT, 0),
    (1, 1, KIND_PROMPT, 0),
    (PLEN - 1, 9, KIND_PROMPT, 0),
    (PLEN, 10, KIND_PD, 1),  # A prefills and emits the first token
    (PLEN + 1, 11, KIND_DECODE, 2),
    (PLEN + OLEN - 2, 13, KIND_DECODE, 4),  # B emits only the last token
    (PLEN + OLEN - 1, 15, KIND_NONE, 5),  # A would emit all o tokens: no split
    (PLEN + OLEN, 15, KIND_NONE, 5),
    (PLEN + OLEN + 1, 15, KIND_NONE, 5),
    (10**9, 15, KIND_NONE, 5),
]


@pytest.mark.parametrize(("s", "norm", "kind", "by_a"), TABLE)
def test_split_table(s: int, norm: int, kind: str, by_a: int) -> None:
    assert normalize_split(PLEN, OLEN, s) == norm
    assert split_kind(PLEN, OLEN, s) == kind
    assert tokens_emitted_by_a(PLEN, OLEN, s) == by_a


@pytest.mark.parametrize(("s", "norm", "kind", "by_a"), TABLE)
def test_plan_make_table(s: int, norm: int, kind: str, by_a: int) -> None:
    plan = Plan.make("A", "B", PLEN, OLEN, s)
    if kind == KIND_NONE:
        assert plan == Plan("A", None, PLEN + OLEN, KIND_NONE)
    else:
        assert plan == Plan("A", "B", norm, kind)


@pytest.mark.parametrize("s", [1, PLEN, PLEN + 1, PLEN + OLEN])
def test_plan_make_same_instance_is_unsplit(s: int) -> None:
    assert Plan.make("A", "A", PLEN, OLEN, s) == Plan("A", None, PLEN + OLEN, KIND_NONE)


def test_plan_whole() -> None:
    assert Plan.whole("w3", 7, 4) == Plan("w3", None, 11, KIND_NONE)


def test_plan_is_frozen() -> None:
    plan = Plan.make("A", "B", PLEN, OLEN, 3)
    with pytest.raises(AttributeError):
        plan.split = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("p", "o", "s", "kind", "by_a"),
    [
        (1, 2, 1, KIND_PD, 1),  # one-token prompt: the only split is PD
        (1, 2, 0, KIND_PD, 1),
        (2, 1, 1, KIND_PROMPT, 0),  # one output token: only a prompt split is possible
        (2, 1, 2, KIND_NONE, 1),  # s = p with o = 1: A emits the only token
        (5, 1, 4, KIND_PROMPT, 0),
        (5, 1, 5, KIND_NONE, 1),
        (1, 3, 2, KIND_DECODE, 2),
    ],
)
def test_short_requests(p: int, o: int, s: int, kind: str, by_a: int) -> None:
    assert split_kind(p, o, s) == kind
    assert tokens_emitted_by_a(p, o, s) == by_a


@pytest.mark.parametrize(("p", "o"), [(0, 5), (5, 0), (-1, 5), (5, -3), (0, 0)])
@pytest.mark.parametrize("fn", [normalize_split, split_kind, tokens_emitted_by_a], ids=lambda f: f.__name__)
def test_invalid_lengths(p: int, o: int, fn: object) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        fn(p, o, 3)  # type: ignore[operator]
    with pytest.raises(ValueError):
        Plan.make("A", "B", p, o, 3)


def test_one_token_request_never_splits() -> None:
    assert normalize_split(1, 1, 0) == 2
    assert Plan.make("A", "B", 1, 1, 0) == Plan("A", None, 2, KIND_NONE)


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(-50, 1000))
def test_tokens_are_conserved(p: int, o: int, s: int) -> None:
    by_a = tokens_emitted_by_a(p, o, s)
    by_b = o - by_a
    assert by_a >= 0 and by_b >= 0
    assert by_a + by_b == o
    norm = normalize_split(p, o, s)
    assert 1 <= norm <= p + o
    kind = split_kind(p, o, s)
    if kind == KIND_NONE:
        assert by_a == o
    elif kind == KIND_PROMPT:
        assert by_a == 0 and norm < p
    elif kind == KIND_PD:
        assert by_a == 1 and norm == p
    else:
        assert kind == KIND_DECODE and norm > p and by_a == norm - p + 1


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(-50, 1000))
def test_split_plans_give_b_work(p: int, o: int, s: int) -> None:
    if p == 1 and o == 1:
        return  # see test_one_token_request_never_splits
    plan = Plan.make("A", "B", p, o, s)
    assert normalize_split(p, o, plan.split) == plan.split  # plans are normalized
    if plan.b is None:
        assert plan.kind == KIND_NONE and plan.split == p + o
    else:
        assert plan.kind != KIND_NONE and 1 <= plan.split < p + o - 1
        assert tokens_emitted_by_a(p, o, plan.split) < o  # B emits at least one token
        assert plan.kind == split_kind(p, o, s)

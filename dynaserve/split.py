"""The micro-request split: who computes which positions and who emits which tokens.

A request has prompt length p and output length o; its positions are 0 .. p+o-1. A split point s sends
positions [0, s) to instance A and [s, p+o) to instance B (B first pulls A's KV of [0, s)).
The token at position i (i >= p) is produced by the forward pass of position i-1, so:

* s < p   (prompt split): A prefills s prompt tokens and emits nothing; B prefills the rest and emits all o.
* s = p   (classic PD):   A prefills the prompt and emits the first token; B emits the other o-1.
* s > p   (decode handoff): A emits s-p+1 tokens; B emits the rest.
* s >= p+o-1: A emits all o tokens; this is no split at all (normalized to s = p+o).
"""

from __future__ import annotations

from dataclasses import dataclass

KIND_NONE = "none"
KIND_PROMPT = "prompt"
KIND_PD = "pd"
KIND_DECODE = "decode"


def normalize_split(p: int, o: int, s: int) -> int:
    """Clamp ``s`` to a meaningful split point in [1, p+o); ``p+o`` means no split."""
    if p < 1 or o < 1:
        raise ValueError(f"prompt and output lengths must be >= 1 (p={p}, o={o})")
    s = max(1, s)
    if s >= p + o - 1:
        return p + o
    return s


def split_kind(p: int, o: int, s: int) -> str:
    """The kind of split ``s`` makes for a request of prompt ``p`` and output ``o``."""
    s = normalize_split(p, o, s)
    if s == p + o:
        return KIND_NONE
    if s < p:
        return KIND_PROMPT
    if s == p:
        return KIND_PD
    return KIND_DECODE


def tokens_emitted_by_a(p: int, o: int, s: int) -> int:
    """How many of the o output tokens instance A emits for split point s."""
    s = normalize_split(p, o, s)
    if s < p:
        return 0
    return min(o, s - p + 1)


@dataclass(frozen=True, slots=True)
class Plan:
    """A global-scheduler decision: A, optional B, split point (p+o when unsplit) and its kind."""

    a: str
    b: str | None
    split: int
    kind: str

    @classmethod
    def whole(cls, instance: str, p: int, o: int) -> Plan:
        return cls(instance, None, p + o, KIND_NONE)

    @classmethod
    def make(cls, a: str, b: str, p: int, o: int, s: int) -> Plan:
        """Build a normalized plan; collapses to an unsplit plan when s means no split or a == b."""
        s = normalize_split(p, o, s)
        if s == p + o or a == b:
            return cls.whole(a, p, o)
        return cls(a, b, s, split_kind(p, o, s))

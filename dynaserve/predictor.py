"""Output-length predictors: the global scheduler never sees true output lengths, only these estimates."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class OutputPredictor(Protocol):
    name: str

    def predict(self, prompt_len: int, max_tokens: int) -> int: ...

    def observe(self, prompt_len: int, output_len: int) -> None: ...


@dataclass
class MaxTokensPredictor:
    """Assume every request runs to max_tokens (exact when clients pass their true length limit)."""

    name: str = "max_tokens"

    def predict(self, prompt_len: int, max_tokens: int) -> int:
        return max(1, max_tokens)

    def observe(self, prompt_len: int, output_len: int) -> None:
        return None


@dataclass
class HistoryPredictor:
    """Mean of recent finished outputs, capped by max_tokens (falls back to max_tokens before any data)."""

    window: int = 512
    name: str = "history"
    _recent: deque[int] = field(default_factory=deque)
    _sum: int = 0

    def predict(self, prompt_len: int, max_tokens: int) -> int:
        if not self._recent:
            return max(1, max_tokens)
        return max(1, min(max_tokens, round(self._sum / len(self._recent))))

    def observe(self, prompt_len: int, output_len: int) -> None:
        self._recent.append(output_len)
        self._sum += output_len
        if len(self._recent) > self.window:
            self._sum -= self._recent.popleft()


PREDICTORS = {"max_tokens": MaxTokensPredictor, "history": HistoryPredictor}


def make_predictor(name: str) -> OutputPredictor:
    try:
        return PREDICTORS[name]()
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}") from None

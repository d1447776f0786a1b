"""Output-length predictors for error studies: a noisy oracle (true length times lognormal noise)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class NoisyOraclePredictor:
    """Predicts ``true_output * exp(N(0, sigma))``, rounded and clamped to [1, max_tokens].

    ``sigma = 0`` is a perfect predictor; the noise is multiplicative, with median 1, so ``sigma = 0.5``
    is off by more than 1.4x (either way) for about a third of the requests. Seeded: the same seed and
    request order give the same predictions. The simulator calls ``predict_with_truth``; the study uses it
    only to measure how a policy's goodput moves with prediction error.
    """

    sigma: float = 0.0
    seed: int = 0
    name: str = "noisy_oracle"
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        self._rng = np.random.default_rng(self.seed)

    def predict_with_truth(self, prompt_len: int, max_tokens: int, true_output: int) -> int:
        noise = math.exp(self.sigma * float(self._rng.standard_normal())) if self.sigma > 0 else 1.0
        return max(1, min(max_tokens, round(true_output * noise)))

    def predict(self, prompt_len: int, max_tokens: int) -> int:
        raise TypeError("NoisyOraclePredictor needs the true output: call predict_with_truth")

    def observe(self, prompt_len: int, output_len: int) -> None:
        return None

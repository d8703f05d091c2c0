"""Least-squares fit of the step-time model to measured step times, with its quality.

Each sample is one engine step that was timed: how many prompt tokens it prefilled, how many sequences it
decoded, how many context tokens those sequences attended to, and how long it took. The model is linear
in four non-negative coefficients, so the fit is a non-negative least squares: solve, drop the most negative
coefficient (pin it to 0), solve again (an active-set method that is exact for four unknowns).
Rows are weighted by 1/measured so the fit minimizes relative error: a 2 ms decode step matters as much as a
300 ms prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from capbalancer.profiling.schema import FitQuality, StepTimeModel

POOR_R_SQUARED = 0.95
POOR_MAX_RELATIVE_ERROR = 0.25


@dataclass(frozen=True, slots=True)
class StepSample:
    prefill_tokens: float
    decode_seqs: float
    context_tokens: float
    seconds: float
    kind: str = ""  # "prefill" or "decode", for reports


@dataclass(frozen=True, slots=True)
class FitResult:
    step: StepTimeModel
    quality: FitQuality
    pinned_to_zero: tuple[str, ...]

    @property
    def poor(self) -> bool:
        return (self.quality.r_squared < POOR_R_SQUARED
                or self.quality.max_relative_error > POOR_MAX_RELATIVE_ERROR)


COEFFICIENTS = ("fixed_seconds", "prefill_seconds_per_token", "decode_seconds_per_seq", "context_seconds_per_token")


def design_matrix(samples: Sequence[StepSample]) -> np.ndarray:
    return np.array([[1.0, s.prefill_tokens, s.decode_seqs, s.context_tokens] for s in samples], dtype=float)


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, list[int]]:
    active = list(range(a.shape[1]))
    pinned: list[int] = []
    while active:
        coef, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (coef >= 0).all():
            full = np.zeros(a.shape[1])
            full[active] = coef
            return full, pinned
        worst = active[int(np.argmin(coef))]
        active.remove(worst)
        pinned.append(worst)
    return np.zeros(a.shape[1]), pinned


def fit_step_model(samples: Sequence[StepSample]) -> FitResult:
    # A step timed at zero or less was not measured (its tokens arrived in one burst): it says nothing
    # about the cost, so it is left out rather than allowed to pull the fit to zero.
    samples = [s for s in samples if s.seconds > 0]
    if len(samples) < 4:
        raise ValueError(f"need at least 4 timed steps with a measurable duration to fit 4 coefficients, "
                         f"got {len(samples)}")
    a = design_matrix(samples)
    y = np.array([s.seconds for s in samples], dtype=float)
    weights = 1.0 / y
    coef, pinned = nonnegative_lstsq(a * weights[:, None], y * weights)
    predicted = a @ coef
    residual = y - predicted
    total = float(((y - y.mean()) ** 2).sum())
    r_squared = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    quality = FitQuality(r_squared=r_squared, rmse_seconds=float(np.sqrt((residual**2).mean())),
                         max_relative_error=float(np.max(np.abs(residual) / y)), samples=len(samples))
    step = StepTimeModel(*(float(c) for c in coef))
    return FitResult(step=step, quality=quality, pinned_to_zero=tuple(COEFFICIENTS[i] for i in pinned))

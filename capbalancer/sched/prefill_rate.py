"""The prompt tokens a backend was recently sent to prefill, per second: what its decode steps share the GPU with.

The capacity model's TPOT prediction counts prefill churn in steady state (each finishing sequence replaced by a
new one). While a backend's batch grows, after an idle spell or on a step in load, it is sent prompts faster than
its sequences finish, and chunked prefill takes most of every step: measured on a 0.4 -> 1.5x ramp (H100 with
Llama-3.1-8B), requests admitted at a predicted 10-30 ms per token decoded at 90-150 ms while the batch grew from
30 to 400. With prefill taking a fraction f of the GPU's time, a decode step sees its own time / (1 - f): the
model takes the larger of that and the steady-state figure. Pure: time-decayed on the times it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 5.0  # time constant of the decay: a burst's admissions over a request's life, not one instant


@dataclass(slots=True)
class PrefillRate:
    tokens: float = 0.0  # time-decayed sum of prompt tokens sent (to compute, i.e. not cached)
    at_s: float = 0.0

    def _decay(self, now: float) -> None:
        dt = now - self.at_s
        if dt > 0:
            self.tokens *= math.exp(-dt / WINDOW_S)
            self.at_s = now

    def add(self, prompt_tokens: int, now: float) -> None:
        self._decay(now)
        self.tokens += prompt_tokens

    def per_s(self, now: float) -> float:
        """Prompt tokens per second sent lately (a steady stream of r tokens/s reads r)."""
        self._decay(now)
        return self.tokens / WINDOW_S

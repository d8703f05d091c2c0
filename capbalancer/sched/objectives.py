"""Default TPOT objective of `capacity` when the user set none: where a backend stops filling seats.

With no TPOT objective every seat of every backend is filled under load, and a slow GPU's full batch runs
at several hundred ms per token (an L4 serving Llama-3.1-8B: ~300 ms at 256 sequences), so its requests
all miss any interactive objective while the proxy counts them as served. The default caps each backend's
batch where its predicted TPOT reaches max(floor, factor x its own one-sequence TPOT): the floor (100 ms,
10 tokens/s, faster than people read) for any backend that can reach it, and a backend too slow to reach
it is still allowed a batch (factor x its idle step) instead of being left idle. Pure arithmetic on the
profile's step model; the step is the calibrated one, so a wrong profile heals as observations come in.
"""

from __future__ import annotations

from capbalancer.profiling.schema import StepTimeModel


def derived_tpot_objective_s(step: StepTimeModel, context_tokens: int, factor: float, floor_s: float,
                             correction: float = 1.0) -> float | None:
    """The default TPOT objective of one backend: max(floor, factor x its TPOT with one sequence of
    `context_tokens` running), the step scaled by the backend's calibration `correction`. None when
    factor is 0 (the default off: fill every seat, as before)."""
    if factor <= 0:
        return None
    idle_tpot_s = step.decode_step_seconds(1, max(0, context_tokens)) * correction
    return max(floor_s, factor * idle_tpot_s)

"""Does a measured step model look like a time-scaled copy of the roofline estimate?

A simulator run with --time-scale X (capbalancer sim) is X times slower in every cost at once, while a real
engine departs from its roofline unevenly (fixed overheads, kernels that miss peak bandwidth at small
batches). So when the measured step time, at several operating points, is the estimate times one common
factor well above 1, the engine is most likely time-scaled, and its profile should be taken with
`profile --time-scale X` (which divides the times by X).
"""

from __future__ import annotations

import statistics

from capbalancer.profiling.schema import StepTimeModel

SLOWER_FACTOR = 1.5  # below this, a real engine off its roofline is the likelier story
SPREAD = 1.35  # the largest ratio over the smallest, for "one common factor"

# (prefill tokens, decoding sequences, context tokens): a lone decode, a large batch, a prefill chunk
_POINTS = ((0, 1, 512), (0, 32, 32 * 512), (1024, 0, 0), (512, 16, 16 * 512))


def apparent_time_scale(measured: StepTimeModel, estimate: StepTimeModel) -> float | None:
    """The common factor by which `measured` is slower than `estimate`, if it looks time-scaled; else None."""
    ratios = []
    for prefill, seqs, ctx in _POINTS:
        est = estimate.step_seconds(prefill, seqs, ctx)
        if est <= 0:
            return None
        ratios.append(measured.step_seconds(prefill, seqs, ctx) / est)
    low, high = min(ratios), max(ratios)
    if low >= SLOWER_FACTOR and high / low <= SPREAD:
        return statistics.median(ratios)
    return None

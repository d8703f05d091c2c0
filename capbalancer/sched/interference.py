"""Learned interference between engines that share a GPU (`gpu_group`), and when an engine is net-negative.

The capacity model's first-order view of a shared card is sum-of-steps: each step of an engine waits for one
step of each busy sibling. Real co-location is often worse and depends on the hardware, the driver and MPS:
on an H200 without MPS a small-KV vLLM beside a large one cost the large one about 3x its TPOT, where the sum of
the two steps says about 2x. So the factor is learned per backend, online, from what its requests show:

    observed TPOT  ~=  c * own step (profile, at the batch it had)  +  k * the busy siblings' steps (sum)

`c` is the backend's own calibration (`tpot_correction`); `k` (this module, prior 1.0 = sum-of-steps) is fitted
by least squares through the origin on the residual, with exponential forgetting so that a change of driver or
MPS setting is followed, and a prior pseudo-observation so that a few noisy samples cannot swing it.

With `k` known for every member, the group's decode throughput (sequences / TPOT, summed) can be compared with
and without a member: an engine whose steps cost its busy siblings more throughput than its own batch adds is
net-negative, and the capacity model gives it no new work while that holds (it stays idle, or drains). That is
the H200 lesson: keep the small instance idle rather than let it slow the large one.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_FACTOR = 1.0  # sum-of-steps, the first-order model
FACTOR_BOUNDS = (0.0, 10.0)


@dataclass(slots=True)
class InterferenceEstimate:
    """How much the busy siblings' steps slow one backend: `factor` x their summed step time.

    Least squares through the origin of (observed TPOT - own calibrated step) on the siblings' summed step averaged
    over the request's decode, with exponential forgetting and a prior pseudo-observation at 1.0. The own scale
    comes from the backend's calibration while it had the GPU to itself (as its profile was measured); fitting both
    at once proved fragile (completions beside busy siblings alone cannot tell them apart).
    """

    forgetting: float = 0.98  # weight the past keeps at each observation (~50 observations of memory)
    prior_weight_s2: float = 4e-4  # the prior's weight, in squared seconds of sibling step (a few observations)
    sxx: float = 0.0  # sum of w * shared^2
    sxy: float = 0.0  # sum of w * shared * (observed - own)
    count: int = 0  # observations with a busy sibling
    # The siblings' summed step over time (piecewise constant between the scheduler's events), so a completion is
    # compared with what its neighbours did while it decoded, not with a sample taken as it ends.
    shared_integral_s2: float = 0.0
    shared_now_s: float = 0.0
    shared_since_s: float = 0.0

    def set_shared(self, now: float, shared_s: float) -> None:
        self.shared_integral_s2 = self.integral_at(now)
        self.shared_since_s = now
        self.shared_now_s = shared_s

    def integral_at(self, now: float) -> float:
        dt = now - self.shared_since_s
        return self.shared_integral_s2 + (self.shared_now_s * dt if dt > 0 else 0.0)

    @property
    def factor(self) -> float:
        w0 = self.prior_weight_s2
        k = (self.sxy + w0 * PRIOR_FACTOR) / (self.sxx + w0)
        lo, hi = FACTOR_BOUNDS
        return lo if k < lo else hi if k > hi else k

    def observe(self, own_s: float, shared_s: float, observed_tpot_s: float) -> None:
        """One completion beside busy siblings: its own calibrated step (sibling-free), the siblings' summed step
        averaged over its decode, and the TPOT it saw. One sample moves the residual by at most the bounds."""
        if shared_s <= 0 or observed_tpot_s <= 0:
            return
        lo, hi = FACTOR_BOUNDS
        residual = min(hi * shared_s, max(lo * shared_s, observed_tpot_s - own_s))
        f = self.forgetting
        self.sxx = f * self.sxx + shared_s * shared_s
        self.sxy = f * self.sxy + shared_s * residual
        self.count += 1


@dataclass(frozen=True, slots=True)
class MemberCapacity:
    """One engine of a shared GPU at saturation, as the net-negative test sees it."""

    seats: int  # the batch it runs when saturated (seats, and KV for the typical request)
    step_s: float  # its own step at that batch (calibrated, without siblings)
    factor: float  # how much its busy siblings' steps slow it (learned)


def group_throughput(members: list[MemberCapacity]) -> float:
    """Sequences per second a GPU's engines decode when all of them are saturated at once."""
    busy_steps = sum(m.step_s for m in members)
    return sum(m.seats / (m.step_s + m.factor * (busy_steps - m.step_s)) for m in members)


def is_net_negative(candidate: MemberCapacity, siblings: list[MemberCapacity]) -> bool:
    """Whether the GPU decodes less at saturation with the candidate in use than with it idle.

    Judged at saturation, not at the load of the moment: at low load any member will do, and a judgment on the
    current batches would favour whichever member happened to start first. Two equal halves of a card tie
    (neither is negative); a small-KV engine beside a large one loses whenever its steps cost the large one's big
    batch more than its own small batch decodes.
    """
    if not siblings:
        return False
    return group_throughput([candidate, *siblings]) < group_throughput(siblings)

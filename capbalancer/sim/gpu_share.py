"""Engines sharing one GPU: the contention model of the simulator (fleet `gpu_group`).

Several engine processes on one card (vLLM instances started with a fraction of its memory each) share its
compute: the GPU time-slices between them, so while several are busy their steps interleave. The model is
first order, the same one the scheduler's capacity model uses (`CapacityModel.shared_gpu_step_seconds`):

    a step of an engine lasts its own step time (its profile, measured alone on the whole GPU)
    plus the current step time of every other busy engine of its group;
    an idle engine costs its siblings nothing.

"Current step time" of a sibling is its own (solo) step time as of the last change of its batch: the
number of decoding sequences or of prefill tokens in its step, or going busy or idle. The slow growth of its
context between such changes (microseconds per step) is not passed on, so that a sibling's long run of
identical decode steps stays one run (the engine's closed-form plan) instead of being cut at every step.

How the timing stays exact under this model while each EngineModel plans runs of steps ahead: an engine
publishes its step time when it composes a step whose batch differs from the last one it published (or goes
idle); every sibling is then told, at that model time, and re-times or cuts its own plan (a plan that has
not started yet takes the new figure at once; one under way keeps the step in flight and recomposes after
it). The driver learns which engines' next events moved through the `on_change` callback it registered.

Interference beyond sum-of-steps (fleet key `interference`, per instance, default 1.0): on real GPUs two
processes without MPS slow each other more than by taking turns (context switches, caches and memory bandwidth
thrashed): measured on an H200, a small-KV vLLM beside a large one cost the large one about 3x its TPOT, where
the sum of the two steps says about 2x. An engine's `interference` multiplies the sibling step time each of its
steps waits for: 1.0 is the first-order model above, 2.0 makes a busy neighbour cost twice its own step.

Members must run on one clock: the discrete-event runner has one, and the HTTP simulator gives a group one
time origin (`origin_s`) and one time scale (the fleet description enforces equal `time_scale` in a group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capbalancer.sim.engine import EngineModel


@dataclass(slots=True, eq=False)
class GpuMember:
    """One engine's place on a shared GPU."""

    gpu: SharedGpu
    engine: EngineModel
    on_change: Callable[[float], None] | None = None  # the driver's "this engine's next event moved"
    step_s: float = 0.0  # its published step time; 0 while idle
    interference: float = 1.0  # multiplies the siblings' steps this engine's steps wait for (1.0: sum-of-steps)
    batch: tuple[int, int] | None = None  # (prefill tokens, decode sequences) it was published for

    def extra_step_seconds(self) -> float:
        """What each step of this engine waits for: the published steps of its busy siblings."""
        total = 0.0
        for m in self.gpu.members:
            if m is not self:
                total += m.step_s
        return total * self.interference

    def publish(self, batch: tuple[int, int] | None, step_s: float, now: float) -> None:
        """This engine composed a step for `batch` taking `step_s` of its own at `now` (None, 0.0: idle)."""
        if batch == self.batch:
            return
        self.batch = batch
        if step_s == self.step_s:
            return
        self.step_s = step_s
        for m in self.gpu.members:
            if m is not self:
                m.engine.sibling_changed(now)
                if m.on_change is not None:
                    m.on_change(now)


@dataclass(slots=True, eq=False)
class SharedGpu:
    """One GPU's engines; an engine joins with `EngineModel.share_gpu(gpu, on_change)`."""

    name: str = ""
    members: list[GpuMember] = field(default_factory=list)
    origin_s: float | None = None  # drivers on real time: the members' common clock origin

    def join(self, engine: EngineModel, on_change: Callable[[float], None] | None = None,
             interference: float = 1.0) -> GpuMember:
        member = GpuMember(self, engine, on_change, interference=interference)
        self.members.append(member)
        return member


def share_gpus(groups: dict[str, list[EngineModel]],
               on_change: Callable[[EngineModel, float], None] | None = None,
               interference: dict[int, float] | None = None) -> dict[str, SharedGpu]:
    """Put each group's engines on one SharedGpu (groups of one engine too: nothing to share, no cost).
    `interference`: by id(engine), the factor on its siblings' steps (default 1.0)."""
    out = {}
    for name, engines in groups.items():
        gpu = SharedGpu(name)
        for eng in engines:
            callback = None if on_change is None else (lambda now, e=eng: on_change(e, now))
            eng.share_gpu(gpu, callback, (interference or {}).get(id(eng), 1.0))
        out[name] = gpu
    return out

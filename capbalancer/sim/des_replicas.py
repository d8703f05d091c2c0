"""N proxy replicas in the discrete-event runner: each its own Scheduler, one fleet of engines.

What a Kubernetes Service in front of N replicas does, on a virtual clock:

- each arrival goes to one replica (random, as kube-proxy spreads connections, or round robin);
- each replica polls the engines on its own phase (replica r at r/N of the poll interval, so between them the
  engines are polled N times as often, but each replica sees a snapshot up to one interval old);
- with sharing, every `share_interval_s` (each replica on its own phase too) a replica publishes its own
  reservations to the store and reads the others' latest ones, which reach it `share_delay_s` later (the
  store round trip). They enter its scheduler through `observe_remote`, exactly as in the live proxy
  (capbalancer/cluster/sharing.py); a store outage (`store_down`) makes every replica forget the others
  at once and count alone until the store answers again.

Everything else (engines, statistics) is capbalancer/sim/des.py's, so rows compare with one-proxy rows.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capbalancer.fleet.description import FleetDescription
from capbalancer.profiling.schema import Profile
from capbalancer.sched.remote import ReplicaState
from capbalancer.sched.types import Demand, Hold, Route
from capbalancer.sim.des import (
    _ARRIVAL,
    _ENGINE,
    _POLL,
    _TICK,
    DesInstance,
    DesOptions,
    DesResult,
    _Run,
    run_des,
)
from capbalancer.sim.engine import Finished, FirstToken
from capbalancer.sim.workload import DesRequest, DesWorkload

_SHARE, _RECEIVE = 4, 5


@dataclass(frozen=True, slots=True)
class ReplicaOptions:
    replicas: int = 3
    sharing: bool = True
    share_interval_s: float = 0.05  # how often each replica exchanges with the store
    share_delay_s: float = 0.0002  # the store round trip: what a replica reads reaches its scheduler this late
    staleness_s: float = 1.0  # a replica not heard from for this long stops counting
    assignment: str = "random"  # random | round_robin: how arrivals are spread over the replicas
    store_down: tuple[float, float] | None = None  # (from_s, to_s): the store answers no one meanwhile
    # A closed loop's first `concurrency` users start spread evenly over this long rather than all at t=0:
    # no store can coordinate replicas within the same instant, and real users do not start at once.
    ramp_s: float = 0.0


class ReplicaRun(_Run):
    def __init__(self, instances: list[DesInstance], requests: list[DesRequest], wl: DesWorkload, policy: str,
                 opts: DesOptions, replicas: ReplicaOptions) -> None:
        super().__init__(instances, requests, wl, policy, opts)
        self.ropts = replicas
        n = max(1, replicas.replicas)
        models = list(self.sched.pools)
        self.scheds = [self.sched] + [self.make_scheduler(models, policy, seed_offset=r) for r in range(1, n)]
        self.names = [f"replica-{r}" for r in range(n)]
        self.owner = [0] * len(requests)
        self.ticks_at: list[float | None] = [None] * n
        self.store: dict[int, ReplicaState] = {}
        self.deliveries: dict[int, list[ReplicaState]] = {}
        self._delivery_seq = 0
        self._rng = random.Random(wl.seed * 7919 + n)

    # --- requests -----------------------------------------------------------------------------------
    def arrive(self, i: int, now: float) -> None:
        n = len(self.scheds)
        r = i % n if self.ropts.assignment == "round_robin" else self._rng.randrange(n)
        self.owner[i] = r
        req = self.requests[i]
        self.arrival_s[i] = now
        self.records[i].start_s = now
        demand = Demand(request_id=str(i), pool=self.model, prompt_tokens=req.prompt_tokens,
                        max_tokens=req.max_tokens, arrival_s=now, stream=True)
        decision = self.scheds[r].submit(demand, now)
        if isinstance(decision, Route):
            self.start_on(i, self.index_of[decision.backend_id], now)
        elif isinstance(decision, Hold):
            self.ensure_replica_tick(r)
        else:
            self.fail(i, decision.status, decision.reason, now)

    def handle_engine_events(self, k: int, events: list) -> None:
        for ev in events:
            i = int(ev.request_id)
            sched = self.scheds[self.owner[i]]
            if isinstance(ev, FirstToken):
                sched.on_first_token(ev.request_id, ev.time_s)
                self.records[i].ttft_s = ev.time_s - self.arrival_s[i]
            elif isinstance(ev, Finished):
                rec = self.records[i]
                rec.success, rec.status = True, 200
                rec.e2el_s = ev.time_s - self.arrival_s[i]
                rec.output_tokens, rec.output_tokens_source = ev.output_tokens, "usage"
                rec.prompt_tokens = ev.prompt_tokens
                self.done(ev.time_s)
                self.handle_sched_events(sched.finish(ev.request_id, ev.time_s, output_tokens=ev.output_tokens,
                                                      prompt_tokens=ev.prompt_tokens), ev.time_s)

    def ensure_replica_tick(self, r: int) -> None:
        w = self.scheds[r].next_wakeup_s()
        if w is not None and (self.ticks_at[r] is None or w < self.ticks_at[r]):
            self.ticks_at[r] = w
            self.push(w, _TICK, r)

    def ensure_tick(self) -> None:  # the base class's calls: every replica
        for r in range(len(self.scheds)):
            self.ensure_replica_tick(r)

    # --- polls and sharing ---------------------------------------------------------------------------
    def poll_replica(self, r: int, now: float) -> None:
        sched = self.scheds[r]
        for k, eng in enumerate(self.engines):
            self.handle_engine_events(k, eng.advance_to(now))
            inst = self.instances[k]
            self.handle_sched_events(sched.observe(inst.name, eng.snapshot(now, inst.engine), now), now)
            if self.opts.progress_at_polls:
                epoch = eng.epoch
                for req in eng.running.values():
                    if self.owner[int(req.request_id)] != r:
                        continue
                    generated = epoch - req.decode_offset if req.decoding else req.generated
                    if generated > 1:
                        sched.on_progress(req.request_id, generated, now)
            self.reschedule(k)

    def store_up(self, now: float) -> bool:
        down = self.ropts.store_down
        return down is None or not (down[0] <= now < down[1])

    def share(self, r: int, now: float) -> None:
        sched = self.scheds[r]
        if not self.store_up(now):
            # The call times out: this replica counts alone from now on (cluster/sharing.py's degrade).
            self.handle_sched_events(sched.forget_remote(now), now)
            return
        self.store[r] = sched.local_state(self.names[r], now)
        others = [st for q, st in self.store.items() if q != r]
        if self.ropts.share_delay_s <= 0:
            self.receive(r, others, now)
            return
        self._delivery_seq += 1
        self.deliveries[self._delivery_seq] = others
        self.push(now + self.ropts.share_delay_s, _RECEIVE, r, self._delivery_seq)

    def receive(self, r: int, others: list[ReplicaState], now: float) -> None:
        self.handle_sched_events(self.scheds[r].observe_remote(others, now, self.ropts.staleness_s), now)
        self.ensure_replica_tick(r)

    # --- the loop --------------------------------------------------------------------------------------
    def run(self) -> float:
        n = len(self.requests)
        replicas = len(self.scheds)
        if self.wl.concurrency is not None:
            first = min(self.wl.concurrency, n)
            for i in range(first):
                self.push(self.ropts.ramp_s * i / first, _ARRIVAL, i)
            self.next_arrival = first
        else:
            self.push(self.requests[0].arrival_s, _ARRIVAL, 0)
            self.next_arrival = 1
        for r in range(replicas):
            self.push(self.opts.poll_interval_s * r / replicas, _POLL, r)
            if self.ropts.sharing and replicas > 1:
                self.push(self.ropts.share_interval_s * r / replicas, _SHARE, r)
        heap = self.heap
        now = 0.0
        while heap and self.resolved < n:
            now, kind, _, a, b = heapq.heappop(heap)
            self.events += 1
            if now > self.opts.max_sim_seconds:
                break
            if kind == _ENGINE:
                self.on_engine_event(a, b, now)
            elif kind == _ARRIVAL:
                self.arrive(a, now)
                if self.wl.concurrency is None and self.next_arrival < n:
                    self.push(self.requests[self.next_arrival].arrival_s, _ARRIVAL, self.next_arrival)
                    self.next_arrival += 1
            elif kind == _TICK:
                if self.ticks_at[a] is not None and now >= self.ticks_at[a]:
                    self.ticks_at[a] = None
                self.handle_sched_events(self.scheds[a].tick(now), now)
                self.ensure_replica_tick(a)
            elif kind == _POLL:
                self.poll_replica(a, now)
                self.handle_sched_events(self.scheds[a].tick(now), now)
                self.ensure_replica_tick(a)
                self.push(now + self.opts.poll_interval_s, _POLL, a)
            elif kind == _SHARE:
                self.share(a, now)
                self.push(now + self.ropts.share_interval_s, _SHARE, a)
            else:
                self.receive(a, self.deliveries.pop(b), now)
            self.reschedule_moved()
        return now


def run_des_replicas(
    fleet: FleetDescription | str | Path | Sequence[DesInstance] | Sequence[tuple[str, Profile]],
    workload: DesWorkload | str | dict[str, Any],
    policy: str = "capacity",
    options: DesOptions | None = None,
    replicas: ReplicaOptions | None = None,
    seed: int | None = None,
) -> DesResult:
    """`run_des` with N proxy replicas (sharing or not) in front of the fleet; deterministic for a seed."""
    ropts = replicas or ReplicaOptions()

    def make(instances: list[DesInstance], requests: list[DesRequest], wl: DesWorkload, pol: str,
             opts: DesOptions) -> ReplicaRun:
        return ReplicaRun(instances, requests, wl, pol, opts, ropts)

    result = run_des(fleet, workload, policy, options, seed=seed, run_class=make)
    result.workload = {**result.workload, "replicas": ropts.replicas, "sharing": ropts.sharing}
    return result

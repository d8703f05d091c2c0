"""The discrete-event runner: the proxy's own Scheduler against EngineModels on a virtual clock.

No sockets, no sleeping. The driver does what the live proxy does, with the same object
(`capbalancer.sched.scheduler.Scheduler`, DESIGN invariant 1):

- an arrival becomes a Demand and goes to `submit`; Route adds it to that engine, Hold keeps it until a
  Dispatch event, Reject answers it at once;
- every `poll_interval_s` each engine's snapshot goes to `observe` (taken_at_s = now), as the fleet
  monitor's /metrics polls do, and (coarse) progress goes to `on_progress`;
- an engine's first token goes to `on_first_token`, a completion to `finish(output_tokens, prompt_tokens)`;
- `tick` runs at `next_wakeup_s` (held requests' deadlines).

Each engine says when its step (or run of identical decode steps) ends; those times, arrivals, polls and
ticks are one event heap. Statistics come from `capbalancer.loadtest.stats`, so a DES report reads like a
load-test report (no ITL: the runner does not time single tokens; TPOT is the per-token figure). Per
instance: `share` of the requests, `utilisation` = fraction of the run the engine was executing steps
(busy, not "full": a busy engine may still have room), `preemptions`, `steps`.

Instances with the same `gpu_group` share one GPU (capbalancer/sim/gpu_share.py): each step waits for the
busy siblings' steps. A sibling's change moves an engine's next event; the runner reschedules it at once.
The scheduler is told the groups too (BackendSpec.gpu_group) unless `DesOptions.gpu_groups_to_scheduler`
is off: the contention is then simulated but hidden from it (an ablation).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capbalancer.fleet.description import FleetDescription, load_fleet
from capbalancer.loadtest.client import RequestRecord
from capbalancer.loadtest.stats import Slo, backend_shares, summarize
from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.schema import Profile
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import (
    BackendSpec,
    Demand,
    Dispatch,
    Expire,
    HealthSettings,
    Hold,
    PoolSettings,
    Route,
)
from capbalancer.sim.engine import EngineConfig, EngineModel, Finished, FirstToken, SimRequest
from capbalancer.sim.gpu_share import share_gpus
from capbalancer.sim.workload import DesRequest, DesWorkload, generate_requests, parse_workload

# Heap event kinds, in the order they run at equal times: completions free room before arrivals look
# for it, and a poll sees the state after both.
_ENGINE, _ARRIVAL, _TICK, _POLL = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class DesInstance:
    name: str
    profile: Profile
    model: str = "sim"
    engine: str = "vllm"
    gpu_group: str | None = None  # instances naming the same group share one GPU
    weight: float | None = None  # the `weighted` policy's static weight (None: from the profile)
    interference: float = 1.0  # factor on its GPU siblings' steps (sim/gpu_share.py); 1.0: sum-of-steps


@dataclass(frozen=True, slots=True)
class DesOptions:
    poll_interval_s: float = 0.5  # how often each engine's snapshot reaches the scheduler
    progress_at_polls: bool = True  # report output tokens so far of every running request at each poll
    slo: Slo | None = None
    policy_options: dict[str, float] = field(default_factory=dict)
    hold_timeout_s: float = 30.0
    hold_max_requests: int = 1024
    default_max_tokens: int = 256
    stale_after_s: float = 3.0
    seed: int = 0  # the scheduler's own seed (random policies)
    max_sim_seconds: float = 1e7  # safety stop
    gpu_groups_to_scheduler: bool = True  # False: engines still share their GPUs, the scheduler is not told
    # The scheduler knows only what a user would: each instance's profile as given to the scheduler is off
    # from the simulated engine's truth by a factor drawn in [1 - e, 1 + e] per instance (its calibration
    # has to find the rest). 0: the scheduler's profiles are the engines' truth (flatters `capacity`).
    profile_error: float = 0.15
    # A closed-loop user refused (429/503) waits the Retry-After before sending again, as real clients do,
    # instead of resubmitting in the same instant.
    closed_loop_backoff: bool = True


@dataclass(slots=True)
class DesResult:
    policy: str
    workload: dict[str, Any]
    summary: dict[str, Any]
    instances: dict[str, dict[str, Any]]
    records: list[RequestRecord]
    sim_seconds: float
    wall_seconds: float
    events: int

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = {"policy": self.policy, "workload": self.workload, "summary": self.summary,
               "instances": self.instances, "sim_seconds": self.sim_seconds,
               "wall_seconds": self.wall_seconds, "events": self.events}
        if with_records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


def instances_from_fleet(fleet: FleetDescription | str | Path, apply_time_scale: bool = False) -> list[DesInstance]:
    """The fleet's instances with their profiles. `time_scale` only slows the HTTP simulator down for a small
    machine, so the DES ignores it unless asked (to compare with a live run of the same file)."""
    if not isinstance(fleet, FleetDescription):
        fleet = load_fleet(fleet)
    base = Path(fleet.source).resolve().parent if fleet.source and not fleet.source.startswith("<") else None
    out = []
    for inst in fleet.instances:
        if inst.profile is None:
            raise ValueError(f"{fleet.source}: instance {inst.name!r} has no profile; the simulator needs one")
        profile = resolve_profile(inst.profile, base)
        if apply_time_scale and inst.time_scale != 1.0:
            profile = dataclasses.replace(profile, step=profile.step.scaled(inst.time_scale))
        out.append(DesInstance(inst.name, profile, inst.model, inst.engine, inst.gpu_group,
                               interference=inst.interference))
    return out


def _gpu_groups(instances: Sequence[DesInstance], engines: Sequence[EngineModel]) -> dict[str, list[EngineModel]]:
    """The engines of each gpu_group that has more than one instance (one alone has nothing to share)."""
    groups: dict[str, list[EngineModel]] = {}
    for inst, eng in zip(instances, engines, strict=True):
        if inst.gpu_group is not None:
            groups.setdefault(inst.gpu_group, []).append(eng)
    return {g: engs for g, engs in groups.items() if len(engs) > 1}


def _as_instances(fleet: FleetDescription | str | Path | Sequence[DesInstance] | Sequence[tuple[str, Profile]]
                  ) -> list[DesInstance]:
    if isinstance(fleet, (FleetDescription, str, Path)):
        return instances_from_fleet(fleet)
    out = []
    for item in fleet:
        out.append(item if isinstance(item, DesInstance) else DesInstance(item[0], item[1]))
    return out


def _as_believed(profile: Profile, error: float, seed: int, name: str) -> Profile:
    """`profile` as a user's profiling run would have measured it: off by up to `error` either way, the same
    factor for every run of this instance and seed (so every policy is judged on the same belief)."""
    if error <= 0:
        return profile
    factor = 1.0 + error * (2.0 * random.Random(f"{seed}:{name}").random() - 1.0)
    return dataclasses.replace(profile, step=profile.step.scaled(factor))


class _Run:
    """One simulation: the state the event handlers share."""

    def __init__(self, instances: list[DesInstance], requests: list[DesRequest], wl: DesWorkload, policy: str,
                 opts: DesOptions) -> None:
        self.instances = instances
        self.requests = requests
        self.wl = wl
        self.opts = opts
        models = list(dict.fromkeys(i.model for i in instances))
        self.model = wl.model or models[0]
        if self.model not in models:
            raise ValueError(f"workload model {self.model!r} is served by no instance (fleet has {models})")
        self.sched = self.make_scheduler(models, policy)
        self.engines = [EngineModel(EngineConfig.from_profile(i.profile, i.engine)) for i in instances]
        self.index_of = {i.name: k for k, i in enumerate(instances)}
        # Engines whose next event a GPU sibling moved: rescheduled after the event that moved it.
        self.moved: set[int] = set()
        groups = _gpu_groups(instances, self.engines)
        if groups:
            engine_index = {id(e): k for k, e in enumerate(self.engines)}
            share_gpus(groups, lambda eng, _now: self.moved.add(engine_index[id(eng)]),
                       {id(e): i.interference for i, e in zip(instances, self.engines, strict=True)})
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.scheduled_at: list[float | None] = [None] * len(instances)
        self.version = [0] * len(instances)
        self.records = [RequestRecord(index=r.index, start_s=0.0, prompt_len=r.prompt_tokens, max_tokens=r.max_tokens)
                        for r in requests]
        self.arrival_s = [0.0] * len(requests)
        self.routed_to = [-1] * len(requests)
        self.resolved = 0
        self.next_arrival = 0
        self.tick_at: float | None = None
        self.events = 0
        self.last_done_s = 0.0

    def make_scheduler(self, models: list[str], policy: str, seed_offset: int = 0) -> Scheduler:
        opts, instances = self.opts, self.instances
        return Scheduler(
            [PoolSettings(name=m, policy=policy, policy_options=dict(opts.policy_options),
                          default_max_tokens=opts.default_max_tokens, hold_max_requests=opts.hold_max_requests,
                          hold_timeout_s=opts.hold_timeout_s) for m in models],
            [BackendSpec(backend_id=i.name, pool=i.model, url=f"sim://{i.name}", engine=i.engine,
                         profile=_as_believed(i.profile, opts.profile_error, opts.seed, i.name),
                         gpu_group=i.gpu_group if opts.gpu_groups_to_scheduler else None, weight=i.weight)
             for i in instances],
            health=HealthSettings(stale_after_s=opts.stale_after_s), seed=opts.seed + seed_offset)

    # --- heap ------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, a, b))

    def reschedule(self, k: int) -> None:
        t = self.engines[k].next_event_s()
        if t is not None and t != self.scheduled_at[k]:
            self.version[k] += 1
            self.scheduled_at[k] = t
            self.push(t, _ENGINE, k, self.version[k])

    def ensure_tick(self) -> None:
        w = self.sched.next_wakeup_s()
        if w is not None and (self.tick_at is None or w < self.tick_at):
            self.tick_at = w
            self.push(w, _TICK)

    # --- requests ------------------------------------------------------------------------------
    def arrive(self, i: int, now: float) -> None:
        r = self.requests[i]
        self.arrival_s[i] = now
        self.records[i].start_s = now
        demand = Demand(request_id=str(i), pool=self.model, prompt_tokens=r.prompt_tokens,
                        max_tokens=r.max_tokens, arrival_s=now, stream=True)
        decision = self.sched.submit(demand, now)
        if isinstance(decision, Route):
            self.start_on(i, self.index_of[decision.backend_id], now)
        elif isinstance(decision, Hold):
            self.ensure_tick()
        else:
            self.fail(i, decision.status, decision.reason, now, decision.retry_after_s)

    def start_on(self, i: int, k: int, now: float) -> None:
        r = self.requests[i]
        self.routed_to[i] = k
        self.records[i].backend = self.instances[k].name
        eng = self.engines[k]
        events = eng.add_request(SimRequest(str(i), r.prompt_tokens, r.output_tokens, r.max_tokens, now), now)
        self.handle_engine_events(k, events)
        self.reschedule(k)

    def fail(self, i: int, status: int, reason: str, now: float, retry_after_s: float = 0.0) -> None:
        rec = self.records[i]
        rec.success = False
        rec.status = status
        rec.error = f"http_{status}"
        rec.error_detail = reason
        self.done(now, retry_after_s if self.opts.closed_loop_backoff else 0.0)

    def done(self, now: float, backoff_s: float = 0.0) -> None:
        self.resolved += 1
        self.last_done_s = max(self.last_done_s, now)
        if self.wl.concurrency is not None and self.next_arrival < len(self.requests):
            self.push(now + backoff_s, _ARRIVAL, self.next_arrival)
            self.next_arrival += 1

    def handle_sched_events(self, events: list, now: float) -> None:
        for ev in events:
            if isinstance(ev, Dispatch):
                self.start_on(int(ev.request_id), self.index_of[ev.backend_id], now)
            elif isinstance(ev, Expire):
                self.fail(int(ev.request_id), ev.status, ev.reason, now, ev.retry_after_s)

    def handle_engine_events(self, k: int, events: list) -> None:
        sched = self.sched
        for ev in events:
            i = int(ev.request_id)
            if isinstance(ev, FirstToken):
                sched.on_first_token(ev.request_id, ev.time_s)
                self.records[i].ttft_s = ev.time_s - self.arrival_s[i]
            elif isinstance(ev, Finished):
                rec = self.records[i]
                rec.success = True
                rec.status = 200
                rec.e2el_s = ev.time_s - self.arrival_s[i]
                rec.output_tokens = ev.output_tokens
                rec.output_tokens_source = "usage"
                rec.prompt_tokens = ev.prompt_tokens
                self.done(ev.time_s)
                self.handle_sched_events(
                    sched.finish(ev.request_id, ev.time_s, output_tokens=ev.output_tokens,
                                 prompt_tokens=ev.prompt_tokens), ev.time_s)

    def poll(self, now: float) -> None:
        sched = self.sched
        for k, eng in enumerate(self.engines):
            self.handle_engine_events(k, eng.advance_to(now))
            inst = self.instances[k]
            self.handle_sched_events(sched.observe(inst.name, eng.snapshot(now, inst.engine), now), now)
            if self.opts.progress_at_polls:
                epoch = eng.epoch
                for req in eng.running.values():
                    generated = epoch - req.decode_offset if req.decoding else req.generated
                    if generated > 1:
                        sched.on_progress(req.request_id, generated, now)
            self.reschedule(k)

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> float:
        n = len(self.requests)
        if self.wl.concurrency is not None:
            first = min(self.wl.concurrency, n)
            for i in range(first):
                self.push(0.0, _ARRIVAL, i)
            self.next_arrival = first
        else:
            self.push(self.requests[0].arrival_s, _ARRIVAL, 0)
            self.next_arrival = 1
        self.push(0.0, _POLL)
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
                self.on_tick(now)
            else:
                self.on_poll(now)
            self.reschedule_moved()
        return now

    def on_tick(self, now: float) -> None:
        """The scheduler's own timer (a hold deadline, a planned release) came due."""
        if self.tick_at is not None and now >= self.tick_at:
            self.tick_at = None
        self.handle_sched_events(self.sched.tick(now), now)
        self.ensure_tick()

    def on_poll(self, now: float) -> None:
        """The proxy's metrics poll: snapshots in, the scheduler ticks, the next poll is due an interval later."""
        self.poll(now)
        self.handle_sched_events(self.sched.tick(now), now)
        self.ensure_tick()
        self.push(now + self.opts.poll_interval_s, _POLL)

    def on_engine_event(self, backend: int, version: int, now: float) -> None:
        """An engine's scheduled step came due; a stale one (rescheduled since) is dropped."""
        if version != self.version[backend]:
            return
        self.scheduled_at[backend] = None
        self.handle_engine_events(backend, self.engines[backend].advance_to(now))
        self.reschedule(backend)

    def reschedule_moved(self) -> None:
        moved = self.moved
        while moved:
            self.reschedule(moved.pop())  # may compose a plan, which may move a sibling again


def run_des(
    fleet: FleetDescription | str | Path | Sequence[DesInstance] | Sequence[tuple[str, Profile]],
    workload: DesWorkload | str | dict[str, Any],
    policy: str = "round_robin",
    options: DesOptions | None = None,
    seed: int | None = None,
    run_class: Any = None,
) -> DesResult:
    """Simulate `workload` on `fleet` under `policy`; deterministic for a given seed. `run_class` replaces the
    one-proxy runner (sim/des_replicas.py models N proxy replicas)."""
    opts = options or DesOptions()
    instances = _as_instances(fleet)
    if not instances:
        raise ValueError("a fleet needs at least one instance")
    wl = workload if isinstance(workload, DesWorkload) else parse_workload(workload)
    if seed is not None:
        wl = parse_workload({**_workload_keys(wl), "seed": seed})
    max_model_len = min(min(i.profile.max_model_len, i.profile.kv_capacity_tokens) for i in instances)
    started = time.perf_counter()
    if wl.shape is not None:
        from capbalancer.sim.des_sessions import SessionRun, sessions_from_shape

        sessions = sessions_from_shape(wl.shape, wl.n, wl.rate_per_s, wl.seed, wl.output, max_model_len)
        models = list(dict.fromkeys(i.model for i in instances))
        run: _Run = SessionRun(instances, sessions, wl.model or models[0], policy, opts)
        requests = run.requests
    else:
        requests = generate_requests(wl, max_model_len)
        run = (run_class or _Run)(instances, requests, wl, policy, opts)
    end_s = run.run()
    wall = time.perf_counter() - started
    first_s = min(run.arrival_s) if requests else 0.0
    duration = max(run.last_done_s - first_s, 1e-9)
    summary = summarize(run.records, duration, opts.slo)
    for key in [k for k in summary if k.endswith("_itl_ms")]:
        del summary[key]  # the runner does not time individual tokens; TPOT is the per-token figure
    summary["rejected"] = sum(1 for r in run.records if r.status is not None and r.status != 200)
    shares = backend_shares(run.records, opts.slo)
    per_instance: dict[str, dict[str, Any]] = {}
    for k, inst in enumerate(instances):
        eng = run.engines[k]
        row: dict[str, Any] = dict(shares.get(inst.name, {"requests": 0, "share": 0.0, "completed": 0,
                                                            "output_tokens": 0}))
        row.update({"profile": inst.profile.name, "preemptions": eng.preemptions_total,
                    "utilisation": min(1.0, eng.busy_seconds / duration),
                    "steps": eng.steps_total,
                    "generation_tokens": eng.generation_tokens_total})
        per_instance[inst.name] = {key: (None if isinstance(v, float) and math.isnan(v) else v)
                                   for key, v in row.items()}
    summary["preemptions"] = sum(e.preemptions_total for e in run.engines)
    summary["held"] = sum(p.held_total for sched in getattr(run, "scheds", [run.sched]) for p in sched.pools.values())
    if wl.shape is not None:
        caches = [e.prefix_cache for e in run.engines if e.prefix_cache is not None]
        queried = sum(c.queries_tokens_total for c in caches)
        # the engines' own counters: prompt tokens found cached over prompt tokens looked up
        summary["prefix_hit_rate"] = sum(c.hits_tokens_total for c in caches) / queried if queried else 0.0
    return DesResult(policy=policy, workload=wl.describe(), summary=summary, instances=per_instance,
                     records=run.records, sim_seconds=end_s, wall_seconds=wall, events=run.events)


def _workload_keys(wl: DesWorkload) -> dict[str, Any]:
    return {"n": wl.n, "rate": wl.rate_per_s, "concurrency": wl.concurrency, "prompt": wl.prompt.describe(),
            "output": wl.output.describe(), "max_tokens": wl.max_tokens or "exact",
            "burstiness": wl.burstiness, "seed": wl.seed, "model": wl.model, "shape": wl.shape}


def instance_capacity(profile: Profile, workload: DesWorkload | str | dict[str, Any], n: int = 2000,
                      concurrency: int | None = None) -> dict[str, float]:
    """One instance's own best throughput on this workload's lengths: kept saturated (closed loop, a
    queue always waiting), measured between the 10th and 90th percentile completions so that the
    ramp-up and the drain do not count. The "ideal" of a cluster is the sum over its instances.
    """
    wl = workload if isinstance(workload, DesWorkload) else parse_workload(workload)
    # Enough outstanding requests to fill every seat twice over, but few enough that most of the n requests
    # run in the steady state rather than in one initial burst.
    conc = concurrency or min(profile.max_num_seqs * 2, max(16, n // 4))
    wl = parse_workload({**_workload_keys(wl), "n": n, "concurrency": conc, "rate": "inf"})
    requests = generate_requests(wl, min(profile.max_model_len, profile.kv_capacity_tokens))
    eng = EngineModel(EngineConfig.from_profile(profile))
    finishes: list[tuple[float, int]] = []
    nxt = 0
    pending: list[float] = []  # times at which a new request must be added (closed loop)

    def add(i: int, now: float) -> None:
        r = requests[i]
        collect(eng.add_request(SimRequest(str(i), r.prompt_tokens, r.output_tokens, r.max_tokens, now), now))

    def collect(events: list) -> None:
        for ev in events:
            if isinstance(ev, Finished):
                finishes.append((ev.time_s, ev.output_tokens))
                pending.append(ev.time_s)

    for i in range(min(conc, n)):
        add(i, 0.0)
    nxt = min(conc, n)
    while len(finishes) < n:
        while pending and nxt < n:
            add(nxt, pending.pop())
            nxt += 1
        pending.clear()
        t = eng.next_event_s()
        if t is None:
            break
        collect(eng.advance_to(t))
    times = sorted(t for t, _ in finishes)
    lo, hi = int(0.1 * len(times)), int(0.9 * len(times))
    span = times[hi - 1] - times[lo] if hi - 1 > lo else max(times[-1], 1e-9)
    window = [tok for t, tok in finishes if times[lo] < t <= times[hi - 1]]
    count = max(1, len(window))
    return {"request_throughput": count / span if span > 0 else math.inf,
            "output_throughput": sum(window) / span if span > 0 else math.inf,
            "preemptions": float(eng.preemptions_total)}


def shared_gpu_capacity(profiles: Sequence[Profile], workload: DesWorkload | str | dict[str, Any], n: int = 2000
                        ) -> list[dict[str, float]]:
    """Engines sharing one GPU, each kept saturated by its own closed loop at once (as `instance_capacity`
    keeps one): each one's throughput while all of them are busy, the group's best static split. Every
    engine runs until each has completed n requests; the window runs from the latest 10th-percentile
    completion (each engine's n/10-th) to the moment the last engine completed its n-th, so that every
    engine was saturated throughout it."""
    wl = workload if isinstance(workload, DesWorkload) else parse_workload(workload)
    engines = [EngineModel(EngineConfig.from_profile(p)) for p in profiles]
    share_gpus({"gpu": engines})
    loops = []
    for p in profiles:
        conc = min(p.max_num_seqs * 2, max(16, n // 4))
        spec = parse_workload({**_workload_keys(wl), "n": n, "concurrency": conc, "rate": "inf"})
        loops.append((conc, generate_requests(spec, min(p.max_model_len, p.kv_capacity_tokens))))
    finishes: list[list[tuple[float, int]]] = [[] for _ in engines]
    sent = [0] * len(engines)

    def add(k: int, now: float) -> None:
        reqs = loops[k][1]
        r = reqs[sent[k] % len(reqs)]
        sid = f"{k}-{sent[k]}"
        sent[k] += 1
        collect(k, engines[k].add_request(SimRequest(sid, r.prompt_tokens, r.output_tokens, r.max_tokens, now),
                                          now))

    def collect(k: int, events: list) -> None:
        for ev in events:
            if isinstance(ev, Finished):
                finishes[k].append((ev.time_s, ev.output_tokens))
                add(k, ev.time_s)  # the closed loop: a new request as soon as one ends

    for k, (conc, _) in enumerate(loops):
        for _ in range(conc):
            add(k, 0.0)
    while min(len(f) for f in finishes) < n:
        times = [e.next_event_s() for e in engines]
        k = min(range(len(engines)), key=lambda j: math.inf if times[j] is None else times[j])
        if times[k] is None:
            break
        collect(k, engines[k].advance_to(times[k]))
    lo = max(f[n // 10][0] for f in finishes)
    hi = max(f[n - 1][0] for f in finishes)
    out = []
    for k, f in enumerate(finishes):
        window = [tok for t, tok in f if lo < t <= hi]
        span = hi - lo
        out.append({"request_throughput": len(window) / span if span > 0 else math.inf,
                    "output_throughput": sum(window) / span if span > 0 else math.inf,
                    "preemptions": float(engines[k].preemptions_total)})
    return out


def ideal_throughput(fleet: FleetDescription | str | Path | Sequence[DesInstance] | Sequence[tuple[str, Profile]],
                     workload: DesWorkload | str | dict[str, Any], n: int = 2000) -> dict[str, Any]:
    """The fleet's "ideal": the sum of each instance's own saturated throughput (instance_capacity), with
    the per-instance figures. Instances that share a profile are measured once. Instances sharing a GPU
    (gpu_group) are measured together, all saturated at once (shared_gpu_capacity)."""
    per_profile: dict[str, dict[str, float]] = {}
    per_instance: dict[str, dict[str, float]] = {}
    instances = _as_instances(fleet)
    grouped: dict[str, list[DesInstance]] = {}
    for inst in instances:
        if inst.gpu_group is not None:
            grouped.setdefault(inst.gpu_group, []).append(inst)
    for members in grouped.values():
        if len(members) > 1:
            for inst, cap in zip(members, shared_gpu_capacity([m.profile for m in members], workload, n=n),
                                 strict=True):
                per_instance[inst.name] = cap
    for inst in instances:
        if inst.name in per_instance:
            continue
        key = inst.profile.name
        if key not in per_profile:
            per_profile[key] = instance_capacity(inst.profile, workload, n=n)
        per_instance[inst.name] = per_profile[key]
    per_instance = {i.name: per_instance[i.name] for i in instances}
    return {"request_throughput": sum(c["request_throughput"] for c in per_instance.values()),
            "output_throughput": sum(c["output_throughput"] for c in per_instance.values()),
            "instances": per_instance}

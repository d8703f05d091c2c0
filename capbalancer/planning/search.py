"""Exhaustive search for the deployment of a cluster: TP degree and instances per machine.

Every machine's GPUs are split into instances (any multiset of supported TP degrees whose sum fits the
machine; the rest stay idle), each instance's throughput is predicted from its profile, and the plan
maximizes the cluster's total (throughput, or goodput under an SLO).

Pruning, and why it is safe: both objectives are sums of per-instance terms and no constraint couples two
machines (an instance never spans machines), so the cluster optimum is the per-machine optima side by
side; machines of the same (GPU, count, interconnect) share one search. The second-best cluster plan
differs from the best in exactly one machine (switching more machines can only lose more), so the runner-up
is the best plan with the cheapest single-machine switch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from capbalancer.planning.catalog import ProfileCatalog, ProfileChoice
from capbalancer.planning.cluster import Cluster, Machine, Workload
from capbalancer.planning.predict import InstancePrediction, Slo, predict_instance
from capbalancer.profiling.roofline import TP_DEGREES

STRATEGIES = ("best", "max-tp", "tp1", "min-tp")


@dataclass(frozen=True, slots=True)
class InstanceOption:
    tp: int
    choice: ProfileChoice
    prediction: InstancePrediction


@dataclass(frozen=True, slots=True)
class MachineOption:
    instances: tuple[InstanceOption, ...]  # TP non-increasing

    @property
    def value(self) -> float:
        return sum(i.prediction.output_tokens_per_second for i in self.instances)

    @property
    def gpus_used(self) -> int:
        return sum(i.tp for i in self.instances)

    @property
    def kv_tokens(self) -> int:
        return sum(i.prediction.kv_capacity_tokens for i in self.instances)

    @property
    def shape(self) -> str:
        if not self.instances:
            return "nothing"
        counts: dict[int, int] = {}
        for inst in self.instances:
            counts[inst.tp] = counts.get(inst.tp, 0) + 1
        return " + ".join(f"{n}x TP{tp}" for tp, n in sorted(counts.items(), reverse=True))

    def sort_key(self) -> tuple[float, int, int]:
        # Best first: more throughput, then fewer GPUs (spares are worth something), then more KV.
        return (-round(self.value, 6), self.gpus_used, -self.kv_tokens)


@dataclass(frozen=True, slots=True)
class MachinePlan:
    machine: Machine
    chosen: MachineOption
    runner_up: MachineOption | None
    options_considered: int
    unusable_tp: dict[int, str]  # TP degree -> why it cannot run here

    @property
    def leftover_gpus(self) -> int:
        return self.machine.count - self.chosen.gpus_used


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    model: str
    objective: str
    strategy: str
    workload: Workload
    slo: Slo | None
    machines: tuple[MachinePlan, ...]

    @property
    def value(self) -> float:
        return sum(m.chosen.value for m in self.machines)

    def runner_up(self) -> tuple[MachinePlan, float] | None:
        """The machine whose switch to its own runner-up costs least, and that cost (tokens/s)."""
        best: tuple[MachinePlan, float] | None = None
        for mp in self.machines:
            if mp.runner_up is None:
                continue
            loss = mp.chosen.value - mp.runner_up.value
            if best is None or loss < best[1]:
                best = (mp, loss)
        return best


def tp_candidates(machine: Machine, catalog: ProfileCatalog, workload: Workload, slo: Slo | None
                  ) -> tuple[dict[int, InstanceOption], dict[int, str]]:
    usable: dict[int, InstanceOption] = {}
    unusable: dict[int, str] = {}
    model = catalog.specs.model(catalog.model)
    for tp in TP_DEGREES:
        if tp > machine.count:
            break
        if not model.tp_supported(tp):
            unusable[tp] = f"{model.heads} heads / {model.kv_heads} KV heads do not split {tp} ways"
            continue
        got = catalog.get(machine.gpu, tp, machine.interconnect)
        if isinstance(got, str):
            unusable[tp] = got
            continue
        prediction = predict_instance(got.profile, workload, slo)
        if prediction.output_tokens_per_second <= 0:
            unusable[tp] = f"predicted batch 0 (limited by {prediction.limit})"
            continue
        usable[tp] = InstanceOption(tp=tp, choice=got, prediction=prediction)
    return usable, unusable


def machine_options(gpus: int, usable: dict[int, InstanceOption]) -> Iterator[MachineOption]:
    """Every multiset of usable TP degrees whose sum is at most the machine's GPUs (the empty one too)."""
    degrees = sorted(usable, reverse=True)

    def rec(start: int, left: int, acc: tuple[InstanceOption, ...]) -> Iterator[MachineOption]:
        yield MachineOption(acc)
        for i in range(start, len(degrees)):
            tp = degrees[i]
            if tp <= left:
                yield from rec(i, left - tp, acc + (usable[tp],))

    yield from rec(0, gpus, ())


def _strategy_option(gpus: int, usable: dict[int, InstanceOption], strategy: str) -> MachineOption:
    """The naive plans: max-tp = one TP degree as large as fits the machine, as many instances as fit;
    tp1 = TP=1 on every GPU (nothing where one GPU cannot hold the model); min-tp = the smallest TP that runs."""
    if strategy == "tp1":
        return MachineOption((usable[1],) * gpus) if 1 in usable else MachineOption(())
    if not usable:
        return MachineOption(())
    tp = max(usable) if strategy == "max-tp" else min(usable)
    return MachineOption((usable[tp],) * (gpus // tp))


def plan_machine(machine: Machine, catalog: ProfileCatalog, workload: Workload, slo: Slo | None,
                 strategy: str = "best") -> MachinePlan:
    usable, unusable = tp_candidates(machine, catalog, workload, slo)
    options = sorted(machine_options(machine.count, usable), key=MachineOption.sort_key)
    if strategy == "best":
        chosen = options[0]
    else:
        chosen = _strategy_option(machine.count, usable, strategy)
    runner_up = next((o for o in options if o.shape != chosen.shape), None)
    return MachinePlan(machine=machine, chosen=chosen, runner_up=runner_up, options_considered=len(options),
                       unusable_tp=unusable)


def plan_cluster(cluster: Cluster, catalog: ProfileCatalog, objective: str = "throughput", slo: Slo | None = None,
                 strategy: str = "best", workload: Workload | None = None) -> ClusterPlan:
    if objective not in ("throughput", "goodput"):
        raise ValueError(f"objective must be throughput or goodput, got {objective!r}")
    if objective == "goodput" and (slo is None or (slo.ttft_seconds is None and slo.tpot_seconds is None)):
        raise ValueError("the goodput objective needs an SLO (ttft and/or tpot)")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    workload = workload or cluster.workload
    effective_slo = slo if objective == "goodput" else None
    shared: dict[tuple[str, int, str], MachinePlan] = {}
    plans = []
    for machine in cluster.machines:
        key = (machine.gpu, machine.count, machine.interconnect)
        if key not in shared:
            shared[key] = plan_machine(machine, catalog, workload, effective_slo, strategy)
        template = shared[key]
        plans.append(MachinePlan(machine=machine, chosen=template.chosen, runner_up=template.runner_up,
                                 options_considered=template.options_considered, unusable_tp=template.unusable_tp))
    return ClusterPlan(model=catalog.model, objective=objective, strategy=strategy, workload=workload,
                       slo=effective_slo, machines=tuple(plans))


def explain_loss(chosen: MachineOption, other: MachineOption) -> str:
    """Why `other` predicts less than `chosen`, in terms of what limits each instance's batch."""
    def describe(option: MachineOption) -> str:
        if not option.instances:
            return "nothing deployed"
        parts = []
        for inst in option.instances:
            p = inst.prediction
            parts.append(f"TP{inst.tp}: batch {p.batch} ({p.limit}-bound), step {p.step_seconds * 1e3:.1f} ms, "
                         f"{p.output_tokens_per_second:,.0f} tok/s")
        unique = list(dict.fromkeys(parts))
        return "; ".join(f"{parts.count(u)}x [{u}]" if parts.count(u) > 1 else f"[{u}]" for u in unique)

    return f"{other.shape} = {describe(other)} vs chosen {chosen.shape} = {describe(chosen)}"

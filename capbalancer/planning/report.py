"""The plan as a human reads it: one row per instance, the totals, and why the runner-up lost."""

from __future__ import annotations

from capbalancer.planning.search import ClusterPlan, explain_loss


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(r, widths, strict=False)))
    return out


def render_plan_table(plan: ClusterPlan) -> str:
    wl = plan.workload
    lines = [f"plan for {plan.model}: objective {plan.objective}, strategy {plan.strategy}, "
             f"workload {wl.prompt_tokens} prompt / {wl.output_tokens} output tokens"]
    if plan.slo is not None:
        ttft = "-" if plan.slo.ttft_seconds is None else f"{plan.slo.ttft_seconds * 1e3:g} ms"
        tpot = "-" if plan.slo.tpot_seconds is None else f"{plan.slo.tpot_seconds * 1e3:g} ms"
        lines.append(f"SLO: TTFT <= {ttft}, TPOT <= {tpot}")
    rows = []
    for mp in plan.machines:
        gpu_at = 0
        for k, inst in enumerate(mp.chosen.instances):
            p = inst.prediction
            rows.append([mp.machine.name, f"{mp.machine.count}x {mp.machine.gpu}", f"{mp.machine.name}-i{k}",
                         str(inst.tp), ",".join(str(g) for g in range(gpu_at, gpu_at + inst.tp)),
                         f"{p.kv_capacity_tokens:,}", f"{p.batch} ({p.limit})", f"{p.tpot_seconds * 1e3:.1f}",
                         f"{p.output_tokens_per_second:,.0f}", inst.choice.profile.source])
            gpu_at += inst.tp
        if not mp.chosen.instances:
            rows.append([mp.machine.name, f"{mp.machine.count}x {mp.machine.gpu}", "(none)", "-", "-", "-", "-",
                         "-", "0", "-"])
    lines += _table(["machine", "GPUs", "instance", "TP", "gpu ids", "KV tokens", "batch (limit)", "TPOT ms",
                     "tok/s", "profile"], rows)
    lines.append(f"predicted cluster output throughput: {plan.value:,.0f} tokens/s "
                 f"({sum(len(m.chosen.instances) for m in plan.machines)} instances, "
                 f"{sum(m.chosen.gpus_used for m in plan.machines)}/{sum(m.machine.count for m in plan.machines)} GPUs)")
    for mp in plan.machines:
        if mp.leftover_gpus:
            lines.append(f"  {mp.machine.name}: {mp.leftover_gpus} GPU(s) left idle")
        for tp, why in sorted(mp.unusable_tp.items()):
            lines.append(f"  {mp.machine.name}: TP{tp} unusable: {why}")
    runner = plan.runner_up()
    if runner is None:
        lines.append("runner-up: none (every machine had a single option)")
    else:
        mp, loss = runner
        assert mp.runner_up is not None
        pct = loss / plan.value * 100 if plan.value else 0.0
        lines.append(f"runner-up: {mp.machine.name} as {mp.runner_up.shape} -> {plan.value - loss:,.0f} tokens/s "
                     f"(-{loss:,.0f}, -{pct:.1f}%)")
        lines.append(f"  why it lost: {explain_loss(mp.chosen, mp.runner_up)}")
    return "\n".join(lines)

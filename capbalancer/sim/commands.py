"""`capbalancer sim` (serve simulated instances) and `capbalancer des` (evaluate policies on a virtual clock)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import click


def _run_loop(main_coro) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_coro)


async def _serve_until_signal(start) -> None:
    from capbalancer.sim.cluster import SimCluster

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    cluster: SimCluster = await start()
    try:
        for s in cluster.served:
            inst = s.instance
            click.echo(f"sim {s.name}: {inst.engine_kind} serving {inst.model!r} with profile {inst.profile.name} "
                       f"(time scale {inst.time_scale:g}) on {s.url}")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await cluster.stop()


@click.command(name="sim")
@click.option("--engine", type=click.Choice(["vllm", "tgi", "sglang"]), default="vllm", show_default=True,
              help="Which engine's API and metric names to serve.")
@click.option("--profile", "profile_ref", help="Profile name (e.g. a100-80g/llama-2-13b-tp1) or file.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8100, show_default=True)
@click.option("--model", default=None, help="Served model name (default: the profile's model).")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="Real seconds per modelled second: 5 runs five times slower than the modelled GPU.")
@click.option("--cluster", "cluster_file", type=click.Path(exists=True, dir_okay=False),
              help="Serve every instance of this fleet description instead (each on its own port).")
@click.option("--only", multiple=True, help="With --cluster: serve only these instance names.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds output lengths of EOS-ended requests.")
@click.option("--lora-modules", multiple=True, metavar="NAME=PATH",
              help="LoRA adapters to serve besides the base model, as vLLM's --lora-modules (repeatable).")
@click.option("--max-concurrent-requests", type=int, default=None,
              help="TGI: answer 429 past this many requests in flight (TGI's default 128).")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
              help="Automatic prefix caching, on by default as in vLLM (sim/prefix_cache.py).")
@click.option("--frontend-ms", type=float, default=None,
              help="API-server time per request before the engine queues it, in ms (default: the profile's "
                   "frontend_seconds, 0 when unmeasured; bench/results/prefix3.md).")
@click.option("--frontend-us-per-token", type=float, default=None,
              help="API-server time per prompt token (tokenizing), in µs (default: the profile's).")
def sim(engine: str, profile_ref: str | None, host: str, port: int, model: str | None, time_scale: float,
        cluster_file: str | None, only: tuple[str, ...], seed: int, lora_modules: tuple[str, ...],
        max_concurrent_requests: int | None, enable_prefix_caching: bool, frontend_ms: float | None,
        frontend_us_per_token: float | None) -> None:
    """Serve simulated vLLM/TGI/SGLang instances: the same APIs and /metrics as the real engines, with
    continuous batching, paged KV and preemption modelled from a GPU profile."""
    from capbalancer.fleet.description import FleetError, load_fleet
    from capbalancer.profiling.library import resolve_profile
    from capbalancer.profiling.schema import ProfileError
    from capbalancer.sim.cluster import SimCluster, serve_fleet
    from capbalancer.sim.http.instance import SimInstance

    if time_scale <= 0:
        raise click.BadParameter("must be > 0", param_hint="--time-scale")
    for value, hint in ((frontend_ms, "--frontend-ms"), (frontend_us_per_token, "--frontend-us-per-token")):
        if value is not None and value < 0:
            raise click.BadParameter("must be >= 0", param_hint=hint)
    frontend = (None if frontend_ms is None else frontend_ms / 1000.0,
                None if frontend_us_per_token is None else frontend_us_per_token / 1e6)
    if cluster_file:
        try:
            fleet = load_fleet(cluster_file)
        except FleetError as exc:
            raise click.ClickException(str(exc)) from None

        async def start() -> SimCluster:
            return await serve_fleet(fleet, names=only or None, seed=seed, enable_prefix_caching=enable_prefix_caching,
                                     frontend=frontend)
    else:
        if not profile_ref:
            raise click.UsageError("give --profile (or --cluster FILE)")
        try:
            profile = resolve_profile(profile_ref, Path.cwd())
        except ProfileError as exc:
            raise click.ClickException(str(exc)) from None

        async def start() -> SimCluster:
            cluster = SimCluster()
            inst = SimInstance(profile, engine_kind=engine, model=model or profile.model, time_scale=time_scale,
                               seed=seed, max_concurrent_requests=max_concurrent_requests,
                               enable_prefix_caching=enable_prefix_caching,
                               lora_modules=dict(m.partition("=")[::2] for m in lora_modules),
                               frontend_seconds=frontend[0], frontend_seconds_per_prompt_token=frontend[1])
            await cluster.add("sim", inst, host, port)
            return cluster

    try:
        _run_loop(_serve_until_signal(start))
    except (ProfileError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


DEFAULT_DES_SLO = "ttft=2000,tpot=100"  # bench/RESULTS.md's SLO
DEFAULT_LOAD_FRACTION = 0.8  # of the fleet's ideal throughput, when the workload names no rate


@click.command(name="des")
@click.option("--cluster", "cluster_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Fleet description (the same file `sim --cluster` serves).")
@click.option("--workload", default="n=1000", show_default=True,
              help="k=v,... spec or YAML file (see capbalancer/sim/workload.py). Without rate= or concurrency=, "
                   "the rate is 80%% of the fleet's ideal throughput (each instance saturated alone, summed).")
@click.option("--policy", default="round_robin,capacity", show_default=True,
              help="Routing policy; several, comma-separated, are compared on the same workload.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--seed", type=int, default=None, help="Override the workload's seed.")
@click.option("--slo", default=DEFAULT_DES_SLO, show_default=True, help="Goodput SLO in ms (the verdict's criterion).")
@click.option("--poll-interval", type=float, default=0.5, show_default=True,
              help="Seconds between snapshots delivered to the scheduler.")
@click.option("--hold-timeout", type=float, default=30.0, show_default=True,
              help="Deadline of a held request, in seconds.")
@click.option("--records/--no-records", default=False, help="Include per-request records in --json.")
@click.option("--apply-time-scale", is_flag=True,
              help="Slow each instance by its time_scale, as `sim --cluster` does (default: modelled GPU speed).")
def des(cluster_file: str, workload: str, policy: str, json_out: str | None, seed: int | None, slo: str | None,
        poll_interval: float, hold_timeout: float, records: bool, apply_time_scale: bool) -> None:
    """Run the proxy's scheduler against simulated engines on a virtual clock (no sockets) and report
    throughput, goodput, TTFT/TPOT/E2E percentiles, preemptions and per-instance load."""
    from capbalancer.fleet.description import FleetError
    from capbalancer.loadtest.stats import parse_slo
    from capbalancer.profiling.schema import ProfileError
    from capbalancer.sched.policies import UnknownPolicy
    from capbalancer.sim.des import DesOptions, instances_from_fleet, run_des
    from capbalancer.sim.workload import WorkloadSpecError, parse_workload

    try:
        instances = instances_from_fleet(cluster_file, apply_time_scale)
        wl = parse_workload(workload, seed=seed)
        opts = DesOptions(poll_interval_s=poll_interval, hold_timeout_s=hold_timeout,
                          slo=parse_slo(slo) if slo else None)
        load_text, wl = _size_rate(instances, wl, workload)
        click.echo(f"workload: {load_text} ({wl.n} requests)")
        results = [run_des(instances, wl, p.strip(), opts) for p in policy.split(",") if p.strip()]
    except (FleetError, ProfileError, WorkloadSpecError, UnknownPolicy, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for res in results:
        _print_result(res)
    from capbalancer.sim.verdict import verdict

    click.echo(verdict(results, slo or "none", load_text.split(" (set rate")[0]))
    if json_out:
        payload = [r.to_dict(with_records=records) for r in results]
        Path(json_out).write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        click.echo(f"wrote {json_out}")


def _size_rate(instances, wl, spec: str):  # -> (description, workload)
    """Give a workload without rate= or concurrency= a rate this fleet can carry: DEFAULT_LOAD_FRACTION of
    its ideal throughput (rate=10 on a small fleet would only show a queue growing without end)."""
    import dataclasses
    import math

    from capbalancer.sim.des import ideal_throughput

    keys = {part.split("=", 1)[0].strip() for part in spec.split(",")} if "=" in spec else set()
    ideal = ideal_throughput(instances, wl, n=min(wl.n, 500))["request_throughput"]
    if wl.concurrency is not None:
        return f"closed loop, {wl.concurrency} in flight (fleet ideal {ideal:.2f} req/s)", wl
    if "rate" in keys or not math.isinf(wl.rate_per_s):
        return f"rate {wl.rate_per_s:g} req/s = {wl.rate_per_s / ideal:.0%} of the fleet's ideal {ideal:.2f}", wl
    rate = round(DEFAULT_LOAD_FRACTION * ideal, 3)
    return (f"rate {rate:g} req/s = {DEFAULT_LOAD_FRACTION:.0%} of the fleet's ideal {ideal:.2f} "
            f"(set rate=R to change)", dataclasses.replace(wl, rate_per_s=rate))


def _print_result(res) -> None:
    s = res.summary
    click.echo(f"== policy {res.policy}: {s['completed']} completed, {s['failed']} failed, "
               f"{s['held']} held, {s['preemptions']} preemptions  "
               f"(simulated {s['duration_s']:.1f} s in {res.wall_seconds:.2f} s wall, {res.events} events)")
    goodput = s.get("request_goodput")
    click.echo(f"   throughput {s['request_throughput']:.2f} req/s, {s['output_throughput']:.0f} output tok/s"
               + (f", goodput {goodput:.2f} req/s (SLO attainment {s['slo_attainment']:.1%})"
                  if goodput is not None else "")
               + (f", prefix-cache hit rate {s['prefix_hit_rate']:.1%}" if "prefix_hit_rate" in s else ""))
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E ")):
        click.echo(f"   {label} ms  p50 {s[f'median_{name}_ms']:9.1f}  p90 {s[f'p90_{name}_ms']:9.1f}  "
                   f"p99 {s[f'p99_{name}_ms']:9.1f}")
    click.echo(f"   {'instance':<20}{'profile':<32}{'share':>7}{'util':>7}{'preempt':>9}{'mean TTFT ms':>14}")
    for name, row in res.instances.items():
        ttft = row.get("mean_ttft_ms")
        click.echo(f"   {name:<20}{row['profile']:<32}{row['share']:>7.1%}{row['utilisation']:>7.1%}"
                   f"{row['preemptions']:>9}{(f'{ttft:.0f}' if ttft is not None else '-'):>14}")

"""`capbalancer plan` and `capbalancer deploy`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from capbalancer.planning.cluster import Cluster, ClusterError, Workload, load_cluster
from capbalancer.planning.predict import Slo
from capbalancer.planning.search import STRATEGIES


def parse_slo(text: str | None) -> Slo | None:
    """'ttft=500,tpot=50' (milliseconds) -> Slo."""
    if not text:
        return None
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot"):
            raise click.BadParameter(f"expected ttft=MS,tpot=MS, got {part!r}", param_hint="--slo")
        try:
            ms = float(value)
        except ValueError:
            raise click.BadParameter(f"{key}: {value!r} is not a number of milliseconds", param_hint="--slo") from None
        if ms <= 0:
            raise click.BadParameter(f"{key} must be > 0 ms", param_hint="--slo")
        values[key] = ms / 1e3
    return Slo(ttft_seconds=values.get("ttft"), tpot_seconds=values.get("tpot"))


def _hels_report(cluster: Cluster, model_name: str, requests: list[int], link_name: str | None,
                 gpu_memory_utilization: float) -> str:
    from capbalancer.planning.hels import build_group, render_hels, solve
    from capbalancer.profiling.specs import load_specs

    specs = load_specs()
    gpus = [specs.gpu(m.gpu) for m in cluster.machines for _ in range(m.count)]
    if link_name is None:
        # One machine: its own link. Several: the group's all-reduce crosses hosts.
        link_name = cluster.machines[0].interconnect if len(cluster.machines) == 1 else "eth100"
    group = build_group(specs.model(model_name), gpus, specs.interconnect(link_name), gpu_memory_utilization)
    wl = cluster.workload
    ctx = wl.prompt_tokens + wl.output_tokens / 2
    return render_hels([solve(group, r, ctx) for r in requests], group, link_name)


@click.command(help="Choose TP degree and instances per machine for a cluster (exhaustive search).")
@click.option("--cluster", "cluster_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="cluster file: machines with GPU type, count, interconnect, address")
@click.option("--model", default=None, help="model name from profiles/models.yaml (default: the cluster file's)")
@click.option("--objective", type=click.Choice(["throughput", "goodput"]), default="throughput", show_default=True)
@click.option("--slo", default=None, help="goodput SLO in milliseconds: ttft=MS,tpot=MS")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="best", show_default=True,
              help="best = exhaustive search; max-tp, tp1 (TP=1 everywhere), min-tp (smallest TP that fits) = naive plans to compare against")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=None, help="override the cluster's workload")
@click.option("--output-tokens", type=click.IntRange(min=1), default=None, help="override the cluster's workload")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 1.0), default=0.9, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="write the plan here (YAML)")
@click.option("--hels", is_flag=True, help="also solve the Hels head/KV split over all the cluster's GPUs (advice)")
@click.option("--hels-requests", default="32,64,128,256", show_default=True, help="batch sizes for --hels")
@click.option("--hels-interconnect", default=None, help="link of the Hels group (default: eth100 across machines)")
def plan(cluster_path: str, model: str | None, objective: str, slo: str | None, strategy: str,
         prompt_tokens: int | None, output_tokens: int | None, gpu_memory_utilization: float,
         out_path: str | None, hels: bool, hels_requests: str, hels_interconnect: str | None) -> None:
    from capbalancer.planning.catalog import ProfileCatalog
    from capbalancer.planning.plan import save_plan
    from capbalancer.planning.report import render_plan_table
    from capbalancer.planning.search import plan_cluster
    from capbalancer.profiling.specs import SpecError, load_specs

    specs = load_specs()
    try:
        cluster = load_cluster(cluster_path, specs)
        model_name = model or cluster.model
        if not model_name:
            raise click.UsageError("no model: pass --model or set model: in the cluster file")
        specs.model(model_name)
    except (ClusterError, SpecError) as exc:
        raise click.ClickException(str(exc)) from None
    slo_value = parse_slo(slo)
    if objective == "goodput" and slo_value is None:
        raise click.UsageError("--objective goodput needs --slo ttft=MS,tpot=MS")
    workload = Workload(prompt_tokens=prompt_tokens or cluster.workload.prompt_tokens,
                        output_tokens=output_tokens or cluster.workload.output_tokens)
    cluster = Cluster(machines=cluster.machines, model=model_name, workload=workload, source=cluster.source)
    catalog = ProfileCatalog(specs=specs, model=model_name, gpu_memory_utilization=gpu_memory_utilization)
    result = plan_cluster(cluster, catalog, objective=objective, slo=slo_value, strategy=strategy)
    click.echo(render_plan_table(result))
    if result.value <= 0:
        click.echo("warning: no machine can serve this model under these constraints", err=True)
    if hels:
        try:
            requests = [int(r) for r in hels_requests.split(",") if r.strip()]
        except ValueError:
            raise click.BadParameter("a comma-separated list of integers", param_hint="--hels-requests") from None
        click.echo("")
        try:
            click.echo(_hels_report(cluster, model_name, requests, hels_interconnect, gpu_memory_utilization))
        except SpecError as exc:
            raise click.ClickException(str(exc)) from None
    if out_path:
        save_plan(result, out_path)
        click.echo(f"plan written to {out_path}")
        from capbalancer.planning.colocation import colocation_warnings
        from capbalancer.planning.plan import load_plan

        for line in colocation_warnings(load_plan(out_path).instances):
            click.echo(line, err=True)


@click.command(help="Render or start the instances of a plan.")
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["scripts", "kubernetes", "local"]), required=True)
@click.option("--engine", type=click.Choice(["vllm", "tgi", "sim"]), default="vllm", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--model-path", default=None, help="weights path or HF id the engines load (default: the model's hf_id)")
@click.option("--image", default=None, help="the engines' container image for --target kubernetes (the proxy runs "
              "capbalancer:<version>, built by `make image`; a kustomize overlay can point it at a registry)")
@click.option("--proxy-port", type=int, default=8080, show_default=True)
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="--engine sim: run the simulated GPUs this many times slower (for small hosts)")
@click.option("--base-port", type=int, default=None, help="--target local: first port (default: free ports)")
@click.option("--ready-timeout", type=float, default=120.0, show_default=True, help="--target local: seconds")
@click.option("--exit-when-ready", is_flag=True, help="--target local: stop everything once healthy (smoke test)")
@click.option("--proxy-replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="--target kubernetes: proxy replicas sharing reservations through a store (docs/replicas.md)")
@click.option("--store-url", default=None,
              help="--target kubernetes with --proxy-replicas > 1: an existing Redis/Valkey (default: render one)")
def deploy(plan_path: str, target: str, engine: str, out_dir: str, model_path: str | None, image: str | None,
           proxy_port: int, time_scale: float, base_port: int | None, ready_timeout: float,
           exit_when_ready: bool, proxy_replicas: int = 1, store_url: str | None = None) -> None:
    from capbalancer.planning.plan import PlanError, load_plan
    from capbalancer.planning.render_common import write_common

    try:
        plan_file = load_plan(plan_path)
    except PlanError as exc:
        raise click.ClickException(str(exc)) from None
    if engine == "sim" and target != "local":
        raise click.UsageError("--engine sim runs only with --target local (scripts and manifests are for vllm or tgi)")
    if engine != "sim":  # simulated GPUs have no MPS to miss
        from capbalancer.planning.colocation import colocation_warnings

        for line in colocation_warnings(plan_file.instances):
            click.echo(line, err=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if target == "local":
        from capbalancer.planning.local import run_local

        code = run_local(plan_file, out, engine=engine, time_scale=time_scale, base_port=base_port,
                         proxy_port=proxy_port, ready_timeout_s=ready_timeout, exit_when_ready=exit_when_ready,
                         echo=click.echo)
        sys.exit(code)
    written = write_common(plan_file, out, engine=engine, proxy_port=proxy_port)
    if target == "scripts":
        from capbalancer.planning.render_scripts import write_scripts

        written += write_scripts(plan_file, out, engine=engine, model_path=model_path)
    else:
        from capbalancer.planning.render_k8s import write_manifests

        written += write_manifests(plan_file, out, engine=engine, model_path=model_path, image=image,
                                   proxy_port=proxy_port, proxy_replicas=proxy_replicas, store_url=store_url)
    for path in written:
        click.echo(str(path))

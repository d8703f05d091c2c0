"""`capbalancer loadtest URL`: the command-line face of run_loadtest."""

from __future__ import annotations

import asyncio
import math
import os
import sys

import click

from capbalancer.loadtest.client import APIS
from capbalancer.loadtest.sessions import SessionWorkload, parse_workload_spec
from capbalancer.loadtest.stats import parse_slo
from capbalancer.loadtest.workloads import (
    DEFAULT_OUTPUT_LEN,
    DEFAULT_PROMPT_LEN,
    SyntheticWorkload,
    Workload,
    WorkloadError,
    load_dataset,
    load_trace,
    parse_length,
)

DEFAULT_NUM_REQUESTS = 200


def _rate(value: str) -> float:
    if value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'inf'") from None
    if rate <= 0:
        raise click.BadParameter("must be > 0 (or inf)")
    return rate


def build_workload(prompt_len: str, output_len: str, dataset: str | None, trace: str | None, seed: int,
                   output_len_given: bool, workload: str = "none") -> Workload:
    try:
        out_dist = parse_length(output_len)
        kind, options = parse_workload_spec(workload)
        if kind != "none":
            if dataset or trace:
                raise WorkloadError("--workload builds its own prompts: give it without --dataset/--trace")
            return SessionWorkload(kind, options, out_dist, seed=seed)
        if trace:
            return load_trace(trace, default_output_len=int(out_dist.mean), seed=seed)
        if dataset:
            # A dataset's own reply lengths rule unless --output-len was given explicitly.
            return load_dataset(dataset, default_output_len=int(out_dist.mean), seed=seed,
                                output_len_override=out_dist if output_len_given else None)
        return SyntheticWorkload(parse_length(prompt_len), out_dist, seed=seed)
    except WorkloadError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(name="loadtest")
@click.argument("url")
@click.option("--api", type=click.Choice(APIS), default="completions", show_default=True,
              help="Request flavour: OpenAI completions, OpenAI chat, or TGI /generate_stream.")
@click.option("--model", default=None, help="Model name to send (default: the first of GET /v1/models).")
@click.option("--endpoint", default=None, help="Path to POST to (default by --api).")
@click.option("--api-key", envvar="CAPBALANCER_API_KEY", default=None,
              help="Bearer token (env CAPBALANCER_API_KEY).")
@click.option("--request-rate", default="inf", show_default=True,
              help="Mean requests per second (Poisson/gamma arrivals), or inf to send all at once.")
@click.option("--burstiness", type=float, default=1.0, show_default=True,
              help="Gamma shape of the gaps: 1 Poisson, <1 burstier, >1 more even (as vllm bench serve).")
@click.option("--max-concurrency", type=int, default=None,
              help="Cap on requests in flight; with --request-rate inf, a closed loop of N users.")
@click.option("--num-requests", type=int, default=None,
              help=f"Stop after this many (default {DEFAULT_NUM_REQUESTS} unless --duration is given).")
@click.option("--duration", type=float, default=None, help="Stop sending after this many seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompt-len", default=DEFAULT_PROMPT_LEN, show_default=True,
              help="Synthetic prompt tokens: N, uniform:A:B or lognormal:mean=M:sigma=S[:max=X].")
@click.option("--output-len", default=DEFAULT_OUTPUT_LEN, show_default=True,
              help="Output tokens (max_tokens), same forms as --prompt-len.")
@click.option("--workload", "workload_spec", default="none", show_default=True,
              help="Prefix-reusing sessions: multi-turn, shared-prompt or agentic, with options as "
                   "NAME:key=value:... (see capbalancer/loadtest/sessions.py); none: independent prompts.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON/JSONL prompts: ShareGPT conversations or {prompt, output_len} lines.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL/CSV with timestamps to replay (timestamp, prompt or prompt_len, output_len).")
@click.option("--trace-speed", type=float, default=1.0, show_default=True, help="Replay speed-up factor.")
@click.option("--ignore-eos", is_flag=True, help="Ask the engine to generate exactly max_tokens (vLLM/SGLang).")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--request-timeout", type=float, default=300.0, show_default=True,
              help="Seconds before a request counts as a timeout.")
@click.option("--slo", default=None, help="Goodput objectives in ms, e.g. ttft=500,tpot=50,e2e=10000.")
@click.option("--percentiles", default="50,90,99", show_default=True, help="Latency percentiles to report.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write everything, per-request records included, to this file.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Draw latency CDFs and throughput over time (needs matplotlib).")
@click.option("--label", default="", help="A name for this run in reports and plots.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def loadtest(url: str, api: str, model: str | None, endpoint: str | None, api_key: str | None,
             request_rate: str, burstiness: float, max_concurrency: int | None, num_requests: int | None,
             duration: float | None, seed: int, prompt_len: str, output_len: str, dataset: str | None,
             trace: str | None, trace_speed: float, ignore_eos: bool, temperature: float,
             request_timeout: float, slo: str | None, percentiles: str, json_out: str | None,
             plot_out: str | None, label: str, quiet: bool, workload_spec: str) -> None:
    """Load-test the OpenAI-compatible or TGI endpoint at URL and report latency, throughput and goodput.

    Only URL is contacted. Every run stops by itself: after --num-requests, or --duration plus at most
    --request-timeout for requests in flight.
    """
    # Imported here so `capbalancer loadtest --help` stays fast.
    from capbalancer.loadtest.progress import ProgressBar
    from capbalancer.loadtest.report import format_report, write_json
    from capbalancer.loadtest.runner import LoadtestConfig, run_loadtest
    from capbalancer.loadtest.stats import Slo

    if ignore_eos and api == "tgi":
        click.echo("note: TGI has no ignore_eos; outputs may end before max_new_tokens", err=True)
    if dataset and trace:
        raise click.UsageError("give --dataset or --trace, not both")
    output_len_given = click.get_current_context().get_parameter_source("output_len") \
        != click.core.ParameterSource.DEFAULT
    workload = build_workload(prompt_len, output_len, dataset, trace, seed, output_len_given, workload_spec)
    try:
        slo_obj = parse_slo(slo) if slo else Slo()
        pcts = tuple(float(p) for p in percentiles.split(",") if p.strip())
        if not pcts or not all(0 <= p <= 100 for p in pcts):
            raise ValueError("percentiles must be in 0..100")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if num_requests is None and duration is None and not workload.is_trace:
        num_requests = DEFAULT_NUM_REQUESTS
    if num_requests is None and duration is None and workload.is_trace:
        num_requests = len(workload.requests)  # type: ignore[attr-defined]
    if plot_out:
        from capbalancer.loadtest.plot import MISSING_MATPLOTLIB, matplotlib_available
        if not matplotlib_available():
            raise click.UsageError(MISSING_MATPLOTLIB)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    config = LoadtestConfig(
        url=url, workload=workload, api=api, model=model, endpoint=endpoint,
        request_rate_per_s=_rate(request_rate), burstiness=burstiness, max_concurrency=max_concurrency,
        num_requests=num_requests, duration_s=duration, seed=seed, ignore_eos=ignore_eos,
        temperature=temperature, request_timeout_s=request_timeout, trace_speed=trace_speed,
        slo=slo_obj, percentiles=pcts, headers=headers, label=label)
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    bar = ProgressBar(num_requests, duration, label=label, enabled=False if quiet else None)
    try:
        result = _run(run_loadtest(config, progress=bar if bar.enabled else None))
    finally:
        bar.close()
    click.echo(format_report(result))
    if json_out:
        write_json(result, json_out)
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        from capbalancer.loadtest.plot import plot_results
        plot_results({label or "run": result}, plot_out, title=url)
        click.echo(f"wrote {plot_out}", err=True)
    if result.summary["completed"] == 0:
        sys.exit(1)


def _run(coro):
    # uvloop where available: the client's own overhead should not be what the test measures.
    if os.environ.get("CAPBALANCER_NO_UVLOOP") != "1":
        try:
            import uvloop
            return uvloop.run(coro) if hasattr(uvloop, "run") else _uvloop_legacy(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def _uvloop_legacy(coro):
    import uvloop
    uvloop.install()
    return asyncio.run(coro)

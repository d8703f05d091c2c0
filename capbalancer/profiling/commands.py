"""`capbalancer profile`: measure a live engine into a profile file (or write a roofline estimate)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from capbalancer.profiling.schema import ENGINE_KINDS, Profile, save_profile


def _roofline_or_none(gpu: str | None, model: str | None, tp: int, gpu_memory_utilization: float = 0.9):
    if not gpu or not model:
        return None
    from capbalancer.profiling.roofline import DoesNotFit, estimate_by_name
    from capbalancer.profiling.specs import SpecError

    try:
        return estimate_by_name(gpu, model, tp, gpu_memory_utilization=gpu_memory_utilization)
    except (DoesNotFit, SpecError):
        return None


@click.command(help="Profile a live engine instance (or, with --estimate, write a roofline estimate).")
@click.option("--url", default=None, help="the engine's base URL, e.g. http://10.0.0.5:8000")
@click.option("--engine", type=click.Choice([e for e in ENGINE_KINDS if e != "openai"]), default="vllm",
              show_default=True)
@click.option("--gpu", default=None, help="GPU name (profiles/gpus.yaml), recorded and used for defaults")
@click.option("--model", default=None, help="model name (profiles/models.yaml; default: what the engine serves)")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="most requests the probe keeps in flight (how much it may disturb a serving instance)")
@click.option("--decode-tokens", type=click.IntRange(min=8), default=48, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None, help="the engine's, if it is not readable")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None)
@click.option("--max-model-len", type=click.IntRange(min=32), default=None)
@click.option("--kv-capacity-tokens", type=click.IntRange(min=1), default=None,
              help="when the engine does not expose it")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="divide measured times by this (a `capbalancer sim --time-scale X` instance)")
@click.option("--name", default=None, help="profile name (default: <gpu>/<model>-tp<N>)")
@click.option("--estimate", is_flag=True, help="no probing: write the roofline estimate for --gpu --model --tp")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
def profile(url: str | None, engine: str, gpu: str | None, model: str | None, tp: int, max_concurrency: int,
            decode_tokens: int, max_num_seqs: int | None, max_num_batched_tokens: int | None,
            max_model_len: int | None, kv_capacity_tokens: int | None, time_scale: float, name: str | None,
            estimate: bool, out_path: str) -> None:
    if estimate:
        if not gpu or not model:
            raise click.UsageError("--estimate needs --gpu and --model")
        from capbalancer.profiling.roofline import DoesNotFit, estimate_by_name
        from capbalancer.profiling.specs import SpecError

        try:
            result = estimate_by_name(gpu, model, tp, engine=engine)
        except (DoesNotFit, SpecError) as exc:
            raise click.ClickException(str(exc)) from None
        save_profile(result, out_path)
        click.echo(f"roofline estimate {result.name} written to {out_path}")
        return
    if not url:
        raise click.UsageError("--url is required (or --estimate)")
    if time_scale <= 0:
        raise click.BadParameter("must be > 0", param_hint="--time-scale")

    from capbalancer.profiling.fit import fit_step_model
    from capbalancer.profiling.profiler import ProbeError, run_probes

    try:
        probes = asyncio.run(run_probes(url, engine, max_concurrency, time_scale=time_scale,
                                        max_model_len=max_model_len, decode_tokens=decode_tokens,
                                        progress=lambda line: click.echo(f"  {line}")))
    except (ProbeError, OSError) as exc:
        raise click.ClickException(f"probing {url} failed: {exc}") from None
    info = probes.info
    try:
        fit = fit_step_model(probes.samples)
    except ValueError as exc:
        raise click.ClickException(f"cannot fit: {exc}") from None
    kv = kv_capacity_tokens or info.kv_capacity_tokens
    if not kv:
        raise click.ClickException("the engine exposes no KV capacity; pass --kv-capacity-tokens")
    model_name = model or info.model or "unknown"
    estimate_profile = _roofline_or_none(gpu, model_name, tp, info.gpu_memory_utilization or 0.9)
    defaults = estimate_profile
    profile_obj = Profile(
        name=name or (f"{gpu}/{model_name}-tp{tp}" if gpu else Path(out_path).stem),
        gpu=gpu or "unknown", model=model_name, tp=info.tp or tp, engine=engine, kv_capacity_tokens=kv,
        step=fit.step, source="measured", block_size=info.block_size or 16,
        gpu_memory_utilization=info.gpu_memory_utilization or 0.9,
        max_num_seqs=max_num_seqs or info.max_num_seqs or (defaults.max_num_seqs if defaults else 256),
        max_num_batched_tokens=max_num_batched_tokens or info.max_num_batched_tokens
        or (defaults.max_num_batched_tokens if defaults else 2048),
        max_model_len=max_model_len or info.max_model_len or 4096, fit=fit.quality,
        engine_version=info.version, engine_flags=info.flags,
        notes=(f"measured by capbalancer profile against {url} in {probes.elapsed_s:.0f} s, "
               f"{probes.plan.total_requests} requests, max concurrency {max_concurrency}; KV from {info.kv_source or 'the command line'}"
               + (f"; times divided by time_scale {time_scale:g}" if time_scale != 1.0 else "")
               + (f"; pinned to 0 by the non-negative fit: {', '.join(fit.pinned_to_zero)}" if fit.pinned_to_zero else "")),
    )
    profile_obj.validate(out_path)
    save_profile(profile_obj, out_path)
    s = fit.step
    click.echo(f"fit over {fit.quality.samples} timed steps: fixed {s.fixed_seconds * 1e3:.3f} ms, prefill "
               f"{s.prefill_seconds_per_token * 1e6:.2f} us/token, decode {s.decode_seconds_per_seq * 1e6:.2f} us/seq, "
               f"context {s.context_seconds_per_token * 1e9:.2f} ns/token")
    click.echo(f"fit quality: R^2 {fit.quality.r_squared:.4f}, RMSE {fit.quality.rmse_seconds * 1e3:.3f} ms, "
               f"max relative error {fit.quality.max_relative_error:.1%}")
    if estimate_profile is not None:
        e = estimate_profile.step
        click.echo(f"roofline estimate for comparison: fixed {e.fixed_seconds * 1e3:.3f} ms, prefill "
                   f"{e.prefill_seconds_per_token * 1e6:.2f} us/token, decode {e.decode_seconds_per_seq * 1e6:.2f} us/seq, "
                   f"context {e.context_seconds_per_token * 1e9:.2f} ns/token, KV {estimate_profile.kv_capacity_tokens:,}")
        from capbalancer.profiling.scaled import apparent_time_scale

        k = apparent_time_scale(fit.step, e)
        if k is not None:
            click.secho(f"WARNING: every measured cost is ~{k:.1f}x the roofline estimate for {estimate_profile.name}: "
                        f"this engine looks time-scaled (a `capbalancer sim --time-scale {k:.0f}`?). If so, profile "
                        f"it with --time-scale {k:.0f}; as written, the profile describes a GPU {k:.1f}x slower.",
                        fg="yellow", bold=True, err=True)
    if fit.poor:
        click.secho(f"WARNING: POOR FIT (R^2 {fit.quality.r_squared:.3f}, worst step off by "
                    f"{fit.quality.max_relative_error:.0%}): the linear step model does not describe this engine "
                    f"well; the instance may have been busy with other traffic, or --max-concurrency too low to "
                    f"separate the costs. Re-run on an idle instance before trusting this profile.",
                    fg="red", bold=True, err=True)
    click.echo(f"profile {profile_obj.name} written to {out_path} ({probes.elapsed_s:.1f} s, "
               f"{probes.plan.total_requests} requests)")

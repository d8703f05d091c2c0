"""Roofline estimates: a `Profile` for any (GPU, model, TP) from the spec sheets alone.

Memory: each GPU of an instance holds 1/tp of the weights, a runtime reserve (CUDA context, activations of
one max_num_batched_tokens chunk, the sampler's logits) and, in what is left of gpu_memory_utilization of its
memory, the KV cache of its share of the KV heads.

Time: a continuous-batching step streams the weights once (bandwidth-bound), computes 2 FLOPs per weight per
token (compute-bound), reads each decoding sequence's KV, and, under TP, all-reduces twice per layer. The
true cost is roughly overhead + max(weight read, compute) + KV read; the schema's model is linear
(fixed + per prefill token + per decoding sequence + per context token), so the max() is linearized so that
a full prefill chunk (max_num_batched_tokens) and a full decode batch (max_num_seqs) cost exactly their
roofline time: each slope is the compute per token minus the weight read it overlaps. Below those sizes the
linear model overstates mixed steps somewhat; profiles/README.md measures by how much.

Run `python -m capbalancer.profiling.roofline --write-library` to regenerate profiles/<gpu>/<model>-tp<N>.yaml,
and `--check` to print the comparison with real measurements.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from capbalancer.profiling.library import SHIPPED_PROFILES_DIR
from capbalancer.profiling.schema import Profile, StepTimeModel, save_profile
from capbalancer.profiling.specs import GIB, GpuSpec, InterconnectSpec, ModelSpec, SpecBook, load_specs

DEFAULT_MAX_MODEL_LEN = 4096
TP_DEGREES = (1, 2, 4, 8)
# Logits are materialized in fp32 for sampling.
LOGIT_BYTES = 4
# vLLM refuses to start unless the KV cache holds at least one max_model_len sequence (its own rule; the
# planner, not this check, decides whether such a small cache is worth deploying).
MIN_KV_SEQUENCES = 1


class DoesNotFit(ValueError):
    """The model does not fit this GPU at this TP degree; the message says by how much."""


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16
    gpu_memory_utilization: float = 0.9


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Per-GPU memory of one instance, in bytes."""

    budget_bytes: float
    weight_bytes: float
    reserve_bytes: float
    kv_bytes: float
    kv_bytes_per_token: float  # per GPU: this GPU's share of the KV heads
    kv_capacity_tokens: int  # of the whole instance (every GPU holds its heads of every token)

    @property
    def fits(self) -> bool:
        return self.kv_bytes > 0


def default_limits(gpu: GpuSpec, model: ModelSpec, gpu_memory_utilization: float = 0.9,
                   max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> EngineLimits:
    """vLLM's own serve defaults per GPU (arg_utils.get_batch_defaults): GPUs with >= 70 GiB that are not
    A100s get 1024 sequences / 8192 batched tokens, the others 256 / 2048 (see research/peers-and-engines.md 5a)."""
    big = gpu.memory_gib >= 70 and "a100" not in gpu.name.lower()
    return EngineLimits(max_num_seqs=1024 if big else 256, max_num_batched_tokens=8192 if big else 2048,
                        max_model_len=min(max_model_len, model.max_position),
                        gpu_memory_utilization=gpu_memory_utilization)


def estimate_memory(gpu: GpuSpec, model: ModelSpec, tp: int, limits: EngineLimits) -> MemoryEstimate:
    budget = limits.gpu_memory_utilization * gpu.memory_bytes
    weights = model.weight_bytes / tp
    # Peak activation of one chunk: the MLP's intermediate (gate and up) plus a few hidden-sized buffers.
    act_per_token = (2 * model.intermediate / tp + 4 * model.hidden) * model.bytes_per_param
    reserve = (gpu.runtime_reserve_gib * GIB + limits.max_num_batched_tokens * act_per_token
               + limits.max_num_seqs * model.vocab * LOGIT_BYTES)
    kv_bytes = budget - weights - reserve
    kv_per_token = 2 * model.layers * model.kv_heads_per_gpu(tp) * model.head_dim * model.bytes_per_param
    blocks = max(0, math.floor(kv_bytes / (kv_per_token * limits.block_size)))
    return MemoryEstimate(budget_bytes=budget, weight_bytes=weights, reserve_bytes=reserve, kv_bytes=kv_bytes,
                          kv_bytes_per_token=kv_per_token, kv_capacity_tokens=blocks * limits.block_size)


def estimate_step(gpu: GpuSpec, model: ModelSpec, tp: int, link: InterconnectSpec | None,
                  limits: EngineLimits) -> StepTimeModel:
    bandwidth = gpu.memory_bandwidth_gb_s * 1e9 * gpu.bandwidth_efficiency
    flops = gpu.peak_tflops * 1e12 * gpu.compute_efficiency
    weight_read_s = model.decode_read_bytes / tp / bandwidth
    comm_fixed_s = 0.0
    comm_per_token_s = 0.0
    if tp > 1:
        if link is None:
            raise ValueError("tp > 1 needs an interconnect")
        allreduces = 2 * model.layers  # after attention and after the MLP, in every layer
        ring = 2.0 * (tp - 1) / tp
        comm_fixed_s = allreduces * link.allreduce_latency_us * 1e-6
        comm_per_token_s = allreduces * ring * model.hidden * model.bytes_per_param / (link.allreduce_bus_gb_s * 1e9)
    prefill_compute_s = model.prefill_flops_per_token / tp / flops
    decode_compute_s = model.decode_flops_per_token / tp / flops
    # Linearize max(weight read, compute): a full chunk / full batch costs its roofline time. Never let the
    # slope fall below half the compute, so small GPUs with huge chunks keep a sane per-token cost.
    prefill_slope_s = max(0.5 * prefill_compute_s, prefill_compute_s - weight_read_s / limits.max_num_batched_tokens)
    decode_slope_s = max(0.0, decode_compute_s - weight_read_s / limits.max_num_seqs)
    context_s = 2 * model.layers * model.kv_heads_per_gpu(tp) * model.head_dim * model.bytes_per_param / bandwidth
    return StepTimeModel(
        fixed_seconds=gpu.step_overhead_ms * 1e-3 + weight_read_s + comm_fixed_s,
        prefill_seconds_per_token=prefill_slope_s + comm_per_token_s,
        decode_seconds_per_seq=decode_slope_s + comm_per_token_s + gpu.per_seq_overhead_us * 1e-6,
        context_seconds_per_token=context_s,
    )


def profile_name(gpu: str, model: str, tp: int) -> str:
    return f"{gpu}/{model}-tp{tp}"


def estimate_profile(gpu: GpuSpec, model: ModelSpec, tp: int, link: InterconnectSpec | None = None,
                     limits: EngineLimits | None = None, engine: str = "vllm", name: str | None = None) -> Profile:
    """The roofline profile of one instance; raises DoesNotFit when it cannot hold the model and
    MIN_KV_SEQUENCES sequences of max_model_len."""
    if not model.tp_supported(tp):
        raise DoesNotFit(f"{model.name}: tp={tp} does not divide {model.heads} heads / {model.kv_heads} KV heads")
    limits = limits or default_limits(gpu, model)
    memory = estimate_memory(gpu, model, tp, limits)
    need = MIN_KV_SEQUENCES * limits.max_model_len
    if memory.kv_capacity_tokens < need:
        short_gib = (need * memory.kv_bytes_per_token - memory.kv_bytes) / GIB
        raise DoesNotFit(f"{model.name} on {tp}x {gpu.name}: {memory.weight_bytes / GIB:.1f} GiB weights + "
                         f"{memory.reserve_bytes / GIB:.1f} GiB reserve per GPU leave "
                         f"{max(0, memory.kv_capacity_tokens)} KV tokens, {need} needed "
                         f"({short_gib:.1f} GiB short per GPU)")
    step = estimate_step(gpu, model, tp, link, limits)
    link_name = link.name if (link is not None and tp > 1) else "none"
    return Profile(
        name=name or profile_name(gpu.name, model.name, tp), gpu=gpu.name, model=model.name, tp=tp,
        engine=engine, kv_capacity_tokens=memory.kv_capacity_tokens, step=step, source="estimated",
        block_size=limits.block_size, gpu_memory_utilization=limits.gpu_memory_utilization,
        max_num_seqs=limits.max_num_seqs, max_num_batched_tokens=limits.max_num_batched_tokens,
        max_model_len=limits.max_model_len,
        notes=(f"roofline estimate from profiles/gpus.yaml and models.yaml: {gpu.product}, "
               f"{gpu.memory_bandwidth_gb_s:g} GB/s x {gpu.bandwidth_efficiency:g}, {gpu.peak_tflops:g} TFLOPS x "
               f"{gpu.compute_efficiency:g}, interconnect {link_name}; weights {memory.weight_bytes / GIB:.2f} GiB "
               f"per GPU, reserve {memory.reserve_bytes / GIB:.2f} GiB, KV {memory.kv_bytes / GIB:.2f} GiB"),
    )


def estimate_by_name(gpu: str, model: str, tp: int, specs: SpecBook | None = None,
                     interconnect: str | None = None, gpu_memory_utilization: float = 0.9,
                     engine: str = "vllm") -> Profile:
    specs = specs or load_specs()
    g = specs.gpu(gpu)
    m = specs.model(model)
    link = specs.interconnect(interconnect or g.interconnect) if tp > 1 else None
    return estimate_profile(g, m, tp, link, default_limits(g, m, gpu_memory_utilization), engine=engine)


# ----------------------------------------------------------------------------------------------------------
# The library of shipped estimates, and the check against real measurements.

LIBRARY_MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "opt-30b")


def write_library(out_dir: Path = SHIPPED_PROFILES_DIR, specs: SpecBook | None = None) -> list[Path]:
    """Every (GPU, model, TP<=8) that fits, as profiles/<gpu>/<model>-tp<N>.yaml (measured ones are kept)."""
    specs = specs or load_specs(out_dir)
    written = []
    for gpu in specs.gpus:
        for model in LIBRARY_MODELS:
            for tp in TP_DEGREES:
                try:
                    profile = estimate_by_name(gpu, model, tp, specs)
                except DoesNotFit:
                    continue
                path = out_dir / f"{profile.name}.yaml"
                if path.exists() and "source: measured" in path.read_text():
                    continue
                save_profile(profile, path)
                written.append(path)
    return written


@dataclass(frozen=True, slots=True)
class ClosedLoopEstimate:
    tpot_seconds: float
    output_tokens_per_second: float


def closed_loop_estimate(profile: Profile, concurrency: int, prompt_tokens: int, output_tokens: int
                         ) -> ClosedLoopEstimate:
    """Steady state of `concurrency` clients each sending prompt -> output_tokens back to back: every step
    decodes the batch and, amortized, prefills the prompts of the requests that replace finished ones."""
    c = concurrency
    mean_context = prompt_tokens + output_tokens / 2
    # One request's TPOT sees the other requests' prefills interleaved with its decode steps.
    prefill_per_step = (c - 1) * prompt_tokens / output_tokens
    step = profile.step.step_seconds(0, c, 0) + profile.step.context_seconds_per_token * c * mean_context \
        + profile.step.prefill_seconds_per_token * prefill_per_step
    ttft = profile.step.step_seconds(prompt_tokens, 0, 0) if c == 1 else step
    per_request = ttft + (output_tokens - 1) * step
    return ClosedLoopEstimate(tpot_seconds=step, output_tokens_per_second=c * output_tokens / per_request)


# (gpu, model, gpu_memory_utilization, concurrency, prompt, output, measured TPOT p50 ms, measured output
#  tok/s or None, measured KV tokens or None, where)
M8B = "llama-3.1-8b-vocab4096"
MEASUREMENTS = (
    ("h100-80g", M8B, 0.45, 1, 512, 128, 6.28, 158, 175_440, "gpu-vllm/README.md"),
    ("h100-80g", M8B, 0.45, 8, 512, 128, 6.68, 1_098, 175_440, "gpu-vllm/README.md"),
    ("h100-80g", M8B, 0.45, 32, 512, 128, 8.50, 3_025, 175_440, "gpu-vllm/README.md"),
    ("h100-80g", M8B, 0.45, 128, 512, 128, 15.71, 5_521, 175_440, "gpu-vllm/README.md"),
    ("h200", M8B, 0.85, 96, 512, 128, 12.0, 5_924, 856_928, "research/real-gpu-heterogeneity.md (A alone)"),
    ("h200", M8B, 0.85, 96, 1024, 512, 12.6, 6_915, 856_928, "research/real-gpu-heterogeneity.md (A, 1024/512)"),
    ("h200", M8B, 0.13, 30, 1024, 512, 6.8, 3_255, 32_352,
     "research/real-gpu-heterogeneity.md (B, KV-bound, ~30 running)"),
    # Published third-party runs of the real Llama-3.1-8B (128k vocabulary), vLLM defaults:
    ("a100-40g", "llama-3.1-8b", 0.9, 1, 1024, 128, 13.3, None, None,
     "johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM 0.23, ~75 tok/s decode at C=1)"),
    ("h100-80g", "llama-3.1-8b", 0.9, 1, 256, 128, 6.48, None, None,
     "yobitelcomm.github.io/bench/recipes/concurrency-sweep (vLLM 0.21, 'chatbot-short'; lengths not given, 256/128 assumed)"),
    ("h100-80g", "llama-3.1-8b", 0.9, 4, 256, 128, 6.59, None, None,
     "yobitelcomm.github.io/bench/recipes/concurrency-sweep (as above, C=4)"),
)


def check_rows(specs: SpecBook | None = None) -> list[str]:
    specs = specs or load_specs()
    rows = ["| GPU | model | mem util | conc | in/out | TPOT est / meas ms (err) | tok/s est / meas (err) "
            "| KV tokens est / meas (err) | source |", "|---|---|---:|---:|---|---|---|---|---|"]
    for gpu_name, model_name, util, conc, p, o, tpot_ms, tps, kv, where in MEASUREMENTS:
        gpu = specs.gpu(gpu_name)
        model = specs.model(model_name)
        profile = estimate_profile(gpu, model, 1, None, default_limits(gpu, model, util))
        est = closed_loop_estimate(profile, conc, p, o)
        e_tpot = est.tpot_seconds * 1e3
        e_tps = est.output_tokens_per_second
        tps_cell = f"{e_tps:,.0f} / {tps:,} ({_err(e_tps, tps)})" if tps else f"{e_tps:,.0f} / -"
        kv_cell = (f"{profile.kv_capacity_tokens:,} / {kv:,} ({_err(profile.kv_capacity_tokens, kv)})" if kv
                   else f"{profile.kv_capacity_tokens:,} / -")
        rows.append(f"| {gpu_name} | {model_name} | {util} | {conc} | {p}/{o} | {e_tpot:.2f} / {tpot_ms} "
                    f"({_err(e_tpot, tpot_ms)}) | {tps_cell} | {kv_cell} | {where} |")
    return rows


def _err(estimate: float, measured: float) -> str:
    return f"{(estimate - measured) / measured * 100:+.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-library", action="store_true", help="regenerate profiles/<gpu>/<model>-tp<N>.yaml")
    parser.add_argument("--check", action="store_true", help="print estimate vs measured (markdown)")
    args = parser.parse_args(argv)
    if args.write_library:
        for path in write_library():
            print(path.relative_to(SHIPPED_PROFILES_DIR))
    if args.check:
        print("\n".join(check_rows()))


if __name__ == "__main__":
    main()

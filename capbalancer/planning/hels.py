"""The Hels head-assignment / KV-proportion solver (papers/002), as advice for a group of unequal GPUs.

Problem (poster, eq. 1): given R requests and GPUs j = 1..N, choose attention heads H_j (integers summing to
the model's TH) and KV proportions P_j (summing to 1) to minimize max_j f_j(R, P_j, H_j), where f_j is GPU
j's latency for one decode step, linear in its arguments. Our f_j, from the roofline of GPU j:

    f_j = overhead_j + (H_j / TH) * (W / bw_j + R * F / flops_j) + P_j * R * L * kv_bytes / bw_j + comm

W = weight bytes streamed per step, F = FLOPs per token, L = mean context per request: the layers are split
by heads (weights and compute follow H_j), attention reads the KV each GPU stores (P_j of it), and every
step all-reduces twice per layer over the group's slowest link (the same `comm` for every GPU).
The step takes max_j f_j: every GPU waits for the all-reduce.

Algorithm (poster, section 3): start from an even split; in each iteration give every GPU the KV proportion
its free memory allows (P_j = free_j / sum free, free_j = memory left after its head share of the weights),
evaluate f_j, and move one head from the slowest GPU to the fastest; stop when the latencies (sorted, slowest
first) no longer fall, which with several equal GPUs is what 'the maximum no longer falls' has to mean.

The baseline is what vLLM and TGI actually run: an even head split with each GPU holding the KV of its own
heads (P_j = 1/N), which runs out of memory on the smallest GPU first. Neither vLLM nor TGI can run an
uneven head split, so `capbalancer deploy` uses this result only as advice (e.g. to see how much a group of
unequal GPUs would gain from a Hels-style engine), never as a deployment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from capbalancer.profiling.specs import GIB, GpuSpec, InterconnectSpec, ModelSpec

UNSUPPORTED_NOTE = ("vLLM and TGI split heads evenly across tensor-parallel ranks and cannot run an uneven head "
                    "split; this is advice only, deploy does not use it.")


@dataclass(frozen=True, slots=True)
class GpuLatencyModel:
    """f_j's coefficients for one GPU (seconds, bytes)."""

    name: str
    overhead_s: float
    per_head_fraction_s: float  # seconds for the whole model's heads at R=0 (weights): times H_j/TH
    per_head_fraction_per_request_s: float  # compute per request for all heads: times H_j/TH * R
    per_kv_byte_s: float
    memory_bytes: float  # what weights and KV may use (gpu_memory_utilization x memory - reserve)


@dataclass(frozen=True, slots=True)
class Split:
    heads: tuple[int, ...]
    kv_fraction: tuple[float, ...]
    latency_s: tuple[float, ...]  # per GPU; inf where the split does not fit in memory

    @property
    def tpot_s(self) -> float:
        return max(self.latency_s)

    @property
    def fits(self) -> bool:
        return self.tpot_s != float("inf")


@dataclass(frozen=True, slots=True)
class HelsResult:
    requests: int
    mean_context_tokens: float
    hels: Split
    even: Split
    iterations: int

    @property
    def speedup(self) -> float | None:
        if not self.even.fits or not self.hels.fits:
            return None
        return self.even.tpot_s / self.hels.tpot_s


@dataclass(frozen=True, slots=True)
class HelsGroup:
    model: ModelSpec
    gpus: tuple[GpuLatencyModel, ...]
    comm_fixed_s: float
    comm_per_request_s: float

    @property
    def total_heads(self) -> int:
        return self.model.heads

    def kv_bytes(self, requests: int, mean_context_tokens: float) -> float:
        return requests * mean_context_tokens * self.model.kv_bytes_per_token

    def weight_bytes(self, j: int, heads: int) -> float:
        return self.model.weight_bytes * heads / self.total_heads

    def latency(self, j: int, heads: int, kv_fraction: float, requests: int, mean_context_tokens: float) -> float:
        g = self.gpus[j]
        share = heads / self.total_heads
        kv = kv_fraction * self.kv_bytes(requests, mean_context_tokens)
        if self.weight_bytes(j, heads) + kv > g.memory_bytes * (1 + 1e-9):
            return float("inf")
        return (g.overhead_s + share * (g.per_head_fraction_s + requests * g.per_head_fraction_per_request_s)
                + kv * g.per_kv_byte_s + self.comm_fixed_s + requests * self.comm_per_request_s)

    def memory_split(self, heads: Sequence[int]) -> tuple[float, ...] | None:
        """KV proportions by free memory (the poster's 'according to their memory capability')."""
        free = [max(0.0, g.memory_bytes - self.weight_bytes(j, h)) for j, (g, h) in enumerate(zip(self.gpus, heads, strict=False))]
        total = sum(free)
        if total <= 0:
            return None
        return tuple(f / total for f in free)

    def evaluate(self, heads: Sequence[int], kv_fraction: Sequence[float], requests: int, ctx: float) -> Split:
        lat = tuple(self.latency(j, h, p, requests, ctx) for j, (h, p) in enumerate(zip(heads, kv_fraction, strict=False)))
        return Split(tuple(heads), tuple(kv_fraction), lat)

    def hels_split(self, heads: Sequence[int], requests: int, ctx: float) -> Split:
        fractions = self.memory_split(heads)
        if fractions is None:
            return Split(tuple(heads), tuple(0.0 for _ in heads), tuple(float("inf") for _ in heads))
        return self.evaluate(heads, fractions, requests, ctx)


def even_heads(total: int, n: int) -> tuple[int, ...]:
    return tuple(total // n + (1 if j < total % n else 0) for j in range(n))


def solve(group: HelsGroup, requests: int, mean_context_tokens: float, max_iterations: int = 10_000) -> HelsResult:
    n = len(group.gpus)
    start = even_heads(group.total_heads, n)
    even = group.evaluate(start, tuple(h / group.total_heads for h in start), requests, mean_context_tokens)
    current = group.hels_split(start, requests, mean_context_tokens)
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        slow = max(range(n), key=lambda j: current.latency_s[j])
        fast = min(range(n), key=lambda j: current.latency_s[j])
        if slow == fast or current.heads[slow] <= 1:
            break
        heads = list(current.heads)
        heads[slow] -= 1
        heads[fast] += 1
        candidate = group.hels_split(heads, requests, mean_context_tokens)
        # Compare the latencies sorted slowest first: with several equal GPUs the maximum only falls once
        # each of them has given a head, so a move that lowers one of the tied slowest GPUs is progress.
        if not sorted(candidate.latency_s, reverse=True) < sorted(current.latency_s, reverse=True):
            break
        current = candidate
    return HelsResult(requests=requests, mean_context_tokens=mean_context_tokens, hels=current, even=even,
                      iterations=iterations)


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to give `parts` GPUs at least one head each, `total` in all (for brute-force checks)."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def brute_force(group: HelsGroup, requests: int, mean_context_tokens: float) -> Split:
    """The best head split under the same memory-proportional KV rule, by enumeration."""
    best: Split | None = None
    for heads in compositions(group.total_heads, len(group.gpus)):
        split = group.hels_split(heads, requests, mean_context_tokens)
        if best is None or split.tpot_s < best.tpot_s:
            best = split
    assert best is not None
    return best


def build_group(model: ModelSpec, gpus: Sequence[GpuSpec], link: InterconnectSpec,
                gpu_memory_utilization: float = 0.9) -> HelsGroup:
    models = []
    for g in gpus:
        bandwidth = g.memory_bandwidth_gb_s * 1e9 * g.bandwidth_efficiency
        flops = g.peak_tflops * 1e12 * g.compute_efficiency
        models.append(GpuLatencyModel(
            name=g.name, overhead_s=g.step_overhead_ms * 1e-3,
            per_head_fraction_s=model.decode_read_bytes / bandwidth,
            per_head_fraction_per_request_s=model.decode_flops_per_token / flops,
            per_kv_byte_s=1.0 / bandwidth,
            memory_bytes=gpu_memory_utilization * g.memory_bytes - g.runtime_reserve_gib * GIB))
    n = len(gpus)
    allreduces = 2 * model.layers
    ring = 2.0 * (n - 1) / n if n > 1 else 0.0
    comm_fixed = allreduces * link.allreduce_latency_us * 1e-6 if n > 1 else 0.0
    comm_per_request = allreduces * ring * model.hidden * model.bytes_per_param / (link.allreduce_bus_gb_s * 1e9)
    return HelsGroup(model=model, gpus=tuple(models), comm_fixed_s=comm_fixed, comm_per_request_s=comm_per_request)


def render_hels(results: Sequence[HelsResult], group: HelsGroup, link_name: str) -> str:
    names = [g.name for g in group.gpus]
    lines = [f"Hels head/KV split for {group.model.name} ({group.total_heads} heads) over "
             f"{len(names)} GPUs [{', '.join(names)}], all-reduce over {link_name}:",
             f"{'requests':>8}  {'even split TPOT':>15}  {'Hels TPOT':>10}  {'speedup':>7}  heads per GPU / KV share"]
    for r in results:
        even = f"{r.even.tpot_s * 1e3:.1f} ms" if r.even.fits else "OOM"
        hels = f"{r.hels.tpot_s * 1e3:.1f} ms" if r.hels.fits else "OOM"
        speed = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        split = (", ".join(f"{h}/{p:.0%}" for h, p in zip(r.hels.heads, r.hels.kv_fraction, strict=False))
                 if r.hels.fits else "(the group's memory cannot hold this many requests)")
        lines.append(f"{r.requests:>8}  {even:>15}  {hels:>10}  {speed:>7}  {split}")
    lines.append(UNSUPPORTED_NOTE)
    return "\n".join(lines)

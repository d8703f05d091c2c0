"""GPU, interconnect and model specs, read from profiles/gpus.yaml and profiles/models.yaml.

The numbers live in data files (each with its source) so that adding a GPU or a model is a data change;
this module only types them and derives the sizes the roofline needs (parameter counts, bytes per KV token).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from capbalancer.profiling.library import SHIPPED_PROFILES_DIR
from capbalancer.yamlfile import read_yaml

GIB = 1024**3


class SpecError(ValueError):
    """A spec file or name that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class InterconnectSpec:
    name: str
    link_gb_s: float
    allreduce_bus_gb_s: float
    allreduce_latency_us: float


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    product: str
    k8s_product_label: str
    memory_gib: float
    memory_bandwidth_gb_s: float
    peak_tflops: float
    interconnect: str
    bandwidth_efficiency: float
    compute_efficiency: float
    step_overhead_ms: float
    per_seq_overhead_us: float
    runtime_reserve_gib: float
    supports_bf16: bool

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    hf_id: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int
    mlp: str  # "gated" (3 matrices) or "plain" (2)
    tied_embeddings: bool
    bytes_per_param: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one transformer layer (biases and norms are negligible and left out)."""
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = (3 if self.mlp == "gated" else 2) * self.hidden * self.intermediate
        return q_and_o + k_and_v + mlp

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        stored_lm_head = 0 if self.tied_embeddings else self.lm_head_params
        return self.layers * self.layer_params + self.embedding_params + stored_lm_head

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.bytes_per_param

    @property
    def decode_read_bytes(self) -> int:
        """Weight bytes one decode step streams from memory: every layer and the LM head, while the
        embedding table is only gathered a row per token."""
        return (self.layers * self.layer_params + self.lm_head_params) * self.bytes_per_param

    @property
    def prefill_flops_per_token(self) -> float:
        """2 FLOPs per weight per token through the layers; the LM head runs on a prompt's last token only."""
        return 2.0 * self.layers * self.layer_params

    @property
    def decode_flops_per_token(self) -> float:
        return 2.0 * (self.layers * self.layer_params + self.lm_head_params)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, all KV heads (the whole model, before any tensor-parallel split)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    def kv_heads_per_gpu(self, tp: int) -> int:
        # vLLM replicates KV heads when tp exceeds them (GQA with few KV heads).
        return max(1, self.kv_heads // tp)

    def tp_supported(self, tp: int) -> bool:
        """The TP degrees vLLM accepts: heads divide evenly, and KV heads divide or are replicated evenly."""
        if tp < 1 or self.heads % tp:
            return False
        return self.kv_heads % tp == 0 or tp % self.kv_heads == 0


@dataclass(frozen=True, slots=True)
class SpecBook:
    gpus: dict[str, GpuSpec]
    interconnects: dict[str, InterconnectSpec]
    models: dict[str, ModelSpec]

    def gpu(self, name: str) -> GpuSpec:
        try:
            return self.gpus[name]
        except KeyError:
            raise SpecError(f"unknown GPU {name!r} (known: {', '.join(sorted(self.gpus))})") from None

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise SpecError(f"unknown model {name!r} (known: {', '.join(sorted(self.models))})") from None

    def interconnect(self, name: str) -> InterconnectSpec:
        try:
            return self.interconnects[name]
        except KeyError:
            raise SpecError(f"unknown interconnect {name!r} (known: {', '.join(sorted(self.interconnects))})") \
                from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, SpecError)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: must be a mapping")
    return data


def _num(row: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = row.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise SpecError(f"{where}.{key}: must be a number >= 0, got {value!r}")
    return float(value)


def parse_gpus(data: dict[str, Any], where: str) -> tuple[dict[str, GpuSpec], dict[str, InterconnectSpec]]:
    defaults = data.get("defaults") or {}
    links: dict[str, InterconnectSpec] = {}
    for name, row in (data.get("interconnects") or {}).items():
        w = f"{where}: interconnects.{name}"
        links[name] = InterconnectSpec(name=name, link_gb_s=_num(row, "link_gb_s", w),
                                       allreduce_bus_gb_s=_num(row, "allreduce_bus_gb_s", w),
                                       allreduce_latency_us=_num(row, "allreduce_latency_us", w))
    gpus: dict[str, GpuSpec] = {}
    for name, row in (data.get("gpus") or {}).items():
        w = f"{where}: gpus.{name}"
        link = row.get("interconnect", "pcie4")
        if link not in links:
            raise SpecError(f"{w}.interconnect: {link!r} is not one of {', '.join(sorted(links))}")

        def pick(key: str, _row: dict[str, Any] = row, _w: str = w) -> float:
            return _num(_row, key, _w, defaults.get(key))

        gpus[name] = GpuSpec(
            name=name, product=str(row.get("product", name)),
            k8s_product_label=str(row.get("k8s_product_label", row.get("product", name))),
            memory_gib=pick("memory_gib"), memory_bandwidth_gb_s=pick("memory_bandwidth_gb_s"),
            peak_tflops=pick("peak_tflops"), interconnect=link,
            bandwidth_efficiency=pick("bandwidth_efficiency"), compute_efficiency=pick("compute_efficiency"),
            step_overhead_ms=pick("step_overhead_ms"), per_seq_overhead_us=pick("per_seq_overhead_us"),
            runtime_reserve_gib=pick("runtime_reserve_gib"),
            supports_bf16="bf16" in (row.get("dtypes") or ["bf16"]),
        )
    return gpus, links


def parse_models(data: dict[str, Any], where: str) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for name, row in (data.get("models") or {}).items():
        w = f"{where}: models.{name}"
        ints = {}
        for key in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_position",
                    "bytes_per_param"):
            value = row.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"{w}.{key}: must be a positive integer, got {value!r}")
            ints[key] = value
        mlp = row.get("mlp", "gated")
        if mlp not in ("gated", "plain"):
            raise SpecError(f"{w}.mlp: must be 'gated' or 'plain', got {mlp!r}")
        if ints["hidden"] % ints["heads"]:
            raise SpecError(f"{w}: hidden {ints['hidden']} is not a multiple of heads {ints['heads']}")
        models[name] = ModelSpec(name=name, hf_id=str(row.get("hf_id", name)), mlp=mlp,
                                 tied_embeddings=bool(row.get("tied_embeddings", False)), **ints)
    return models


def load_specs(profiles_dir: Path | None = None) -> SpecBook:
    base = profiles_dir or SHIPPED_PROFILES_DIR
    return _load_specs_cached(str(base))


@lru_cache(maxsize=8)
def _load_specs_cached(base: str) -> SpecBook:
    gpu_path = Path(base) / "gpus.yaml"
    model_path = Path(base) / "models.yaml"
    gpus, links = parse_gpus(_read_yaml(gpu_path), str(gpu_path))
    models = parse_models(_read_yaml(model_path), str(model_path))
    return SpecBook(gpus=gpus, interconnects=links, models=models)

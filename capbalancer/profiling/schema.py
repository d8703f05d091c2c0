"""The profile schema: what one engine instance costs per token, and how much KV cache it holds.

One definition, read by the simulator (step times), the scheduler (capacity and predicted latency),
the profiler (what it fits and writes) and the planner (what it predicts). Units are in the names.

A profile describes one (GPU, model, tensor-parallel degree, engine) combination. Its step-time model is
linear in what an engine step does, which is how continuous-batching engines behave to first order:

    step_seconds = fixed_seconds
                 + prefill_seconds_per_token  * prefill tokens computed in the step
                 + decode_seconds_per_seq     * sequences decoding in the step
                 + context_seconds_per_token  * context tokens those decoding sequences attend to

Prefill is compute-bound (cost per token), decode is bandwidth-bound (a fixed weight read shared by the
batch, plus per-sequence and per-context-token KV reads), which is what the four terms capture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capbalancer.yamlfile import read_yaml

PROFILE_SOURCES = ("measured", "estimated", "hand")
ENGINE_KINDS = ("vllm", "tgi", "sglang", "openai")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    fixed_seconds: float
    prefill_seconds_per_token: float
    decode_seconds_per_seq: float
    context_seconds_per_token: float

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return (
            self.fixed_seconds
            + self.prefill_seconds_per_token * prefill_tokens
            + self.decode_seconds_per_seq * decode_seqs
            + self.context_seconds_per_token * context_tokens
        )

    def decode_step_seconds(self, decode_seqs: int, context_tokens: int) -> float:
        """Time of a pure decode step: the time per output token every sequence in the batch sees."""
        return self.step_seconds(0, decode_seqs, context_tokens)

    def scaled(self, factor: float) -> StepTimeModel:
        return StepTimeModel(
            fixed_seconds=self.fixed_seconds * factor,
            prefill_seconds_per_token=self.prefill_seconds_per_token * factor,
            decode_seconds_per_seq=self.decode_seconds_per_seq * factor,
            context_seconds_per_token=self.context_seconds_per_token * factor,
        )


@dataclass(frozen=True, slots=True)
class FitQuality:
    """How well the step-time model fits what was measured (absent for estimated profiles)."""

    r_squared: float
    rmse_seconds: float
    max_relative_error: float
    samples: int


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    gpu: str
    model: str
    tp: int
    engine: str
    kv_capacity_tokens: int
    step: StepTimeModel
    source: str = "estimated"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    fit: FitQuality | None = None
    engine_version: str | None = None
    engine_flags: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    # The API server's own time per request before the engine sees it (parsing, validation, tokenizing, the
    # hand-off to the engine process), and per prompt token (tokenizing): on a GPU host a few ms next to the
    # prefill, on a CPU host that shares cores with the engine tens of ms. The simulator's HTTP front waits this
    # long before queueing a request (sim/http/instance.py). 0: not measured.
    frontend_seconds: float = 0.0
    frontend_seconds_per_prompt_token: float = 0.0

    @property
    def num_gpu_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def max_decode_tokens_per_second(self, mean_context_tokens: float) -> float:
        """Best decode throughput this instance can reach: the batch as large as seats and KV allow."""
        seqs = self.max_batch_seqs(mean_context_tokens)
        if seqs <= 0:
            return 0.0
        step = self.step.decode_step_seconds(seqs, int(seqs * mean_context_tokens))
        return seqs / step

    def max_batch_seqs(self, mean_context_tokens: float) -> int:
        by_kv = int(self.kv_capacity_tokens // max(1.0, mean_context_tokens))
        return max(0, min(self.max_num_seqs, by_kv))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.fit is None:
            out.pop("fit")
        for name in ("frontend_seconds", "frontend_seconds_per_prompt_token"):
            if not out[name]:
                out.pop(name)  # unmeasured: profiles saved before the field existed stay byte-identical
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<profile>") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: a profile is a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            step_data = data["step"]
        except KeyError:
            raise ProfileError(f"{where}.step: missing") from None
        step = _dataclass_from(StepTimeModel, step_data, f"{where}.step")
        fit = data.get("fit")
        kwargs = dict(data)
        kwargs["step"] = step
        kwargs["fit"] = _dataclass_from(FitQuality, fit, f"{where}.fit") if fit is not None else None
        kwargs["engine_flags"] = {str(k): str(v) for k, v in (data.get("engine_flags") or {}).items()}
        for required in ("name", "gpu", "model", "tp", "engine", "kv_capacity_tokens"):
            if required not in kwargs:
                raise ProfileError(f"{where}.{required}: missing")
        profile = cls(**kwargs)
        profile.validate(where)
        return profile

    def validate(self, where: str = "<profile>") -> None:
        if self.engine not in ENGINE_KINDS:
            raise ProfileError(f"{where}.engine: {self.engine!r} is not one of {', '.join(ENGINE_KINDS)}")
        if self.source not in PROFILE_SOURCES:
            raise ProfileError(f"{where}.source: {self.source!r} is not one of {', '.join(PROFILE_SOURCES)}")
        for name in ("tp", "kv_capacity_tokens", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ProfileError(f"{where}.{name}: must be a positive integer, got {value!r}")
        for name in ("frontend_seconds", "frontend_seconds_per_prompt_token"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"{where}.{name}: must be a finite number >= 0, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ProfileError(f"{where}.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        for f in dataclasses.fields(StepTimeModel):
            value = getattr(self.step, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"{where}.step.{f.name}: must be a finite number >= 0, got {value!r}")
        if self.step.decode_step_seconds(1, 0) <= 0:
            raise ProfileError(f"{where}.step: a decode step would take no time")


def _dataclass_from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: must be a mapping")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ProfileError(f"{where}.{missing[0]}: missing")
    values = {}
    for name in names:
        value = data[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProfileError(f"{where}.{name}: must be a number, got {value!r}")
        values[name] = value
    return cls(**values)


def load_profile(path: str | Path) -> Profile:
    return Profile.from_dict(read_yaml(path, ProfileError), where=str(path))


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))

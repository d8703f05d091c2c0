"""Warn when a plan puts several engines on one GPU without MPS (issue 14 §5).

Engines sharing a card without NVIDIA MPS time-slice it, and interfere more than their summed step times say: on
an H200 a small-KV vLLM beside a large one cost the large one about 3x its TPOT. The proxy learns the
interference online and leaves a net-negative instance idle (sched/interference.py), but the capacity it wastes is
better not deployed at all. `plan` and `deploy` call `colocation_warnings` and print what it returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from capbalancer.planning.plan import PlannedInstance

MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's default pipe directory


def mps_running(env: Mapping[str, str] | None = None) -> bool:
    """Whether an MPS control daemon looks reachable from this host (its pipe directory exists)."""
    env = os.environ if env is None else env
    pipe = env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT
    return Path(pipe).is_dir()


def shared_gpus(instances: Iterable[PlannedInstance]) -> dict[tuple[str, int], list[str]]:
    """(machine, GPU index) -> the instances placed on it, for every GPU that holds more than one."""
    placed: dict[tuple[str, int], list[str]] = {}
    for inst in instances:
        for gpu in inst.gpu_ids:
            placed.setdefault((inst.machine, gpu), []).append(inst.name)
    return {key: names for key, names in placed.items() if len(names) > 1}


def colocation_warnings(instances: Iterable[PlannedInstance], mps: bool | None = None) -> list[str]:
    shared = shared_gpus(instances)
    if not shared:
        return []
    if mps is None:
        mps = mps_running()
    if mps:
        return []
    out = []
    for (machine, gpu), names in sorted(shared.items()):
        out.append(f"warning: {', '.join(names)} share GPU {gpu} of {machine} and no MPS daemon was found: engines "
                   "time-slicing one GPU interfere beyond their summed step times (measured ~3x TPOT on an H200). "
                   "Start nvidia-cuda-mps-control, give each its own GPU, or name the card as their gpu_group so the "
                   "proxy learns the interference and idles a net-negative instance")
    return out

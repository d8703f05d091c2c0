"""A small heterogeneous simulated cluster inside the current event loop, for `capbalancer serve` with no
config: one fast and two slow vLLM-flavoured instances (the Hels-style A100 + P100 pairing) on free ports
of 127.0.0.1.

The time scale (2: twice slower than the modelled GPUs) keeps the step loops, the token streams and the
proxy in front of them well within what a 2-core machine carries while the fast/slow ratio stays intact.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from capbalancer.fleet.description import FleetDescription, InstanceSpec
from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.schema import Profile, ProfileError, StepTimeModel
from capbalancer.sim.cluster import SimCluster, instance_for

EMBEDDED_MODEL = "llama-2-13b"
EMBEDDED_TIME_SCALE = 2.0
FAST_PROFILE = "a100-80g/llama-2-13b-tp1"
SLOW_PROFILE = "p100-16g/llama-2-13b-tp2"

# Used only if the shipped profiles/ directory is missing (e.g. an installed wheel without it): the same
# roofline figures as the shipped estimates, rounded.
_FALLBACK = {
    FAST_PROFILE: Profile(name=FAST_PROFILE, gpu="a100-80g", model="llama-2-13b", tp=1, engine="vllm",
                          kv_capacity_tokens=61648, max_num_batched_tokens=2048,
                          step=StepTimeModel(0.0168, 0.000128, 8.1e-05, 5.0e-07), notes="embedded fallback"),
    SLOW_PROFILE: Profile(name=SLOW_PROFILE, gpu="p100-16g", model="llama-2-13b", tp=2, engine="vllm",
                          kv_capacity_tokens=4224, max_num_batched_tokens=2048,
                          step=StepTimeModel(0.0253, 0.00158, 0.00153, 7.0e-07), notes="embedded fallback"),
}


def _profile(name: str) -> Profile:
    try:
        return resolve_profile(name)
    except ProfileError:
        return _FALLBACK[name]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def start_embedded_cluster(host: str = "127.0.0.1", time_scale: float = EMBEDDED_TIME_SCALE
                                 ) -> tuple[FleetDescription, Callable[[], Awaitable[None]]]:
    """Start the cluster in the running loop; returns its fleet description and an async stop function."""
    layout = (("sim-a100-0", FAST_PROFILE), ("sim-p100-0", SLOW_PROFILE), ("sim-p100-1", SLOW_PROFILE))
    cluster = SimCluster()
    specs = []
    try:
        for k, (name, profile_name) in enumerate(layout):
            profile = _profile(profile_name)
            for _attempt in range(5):  # a free port can be taken between probing and binding
                spec = InstanceSpec(name=name, engine="vllm", model=EMBEDDED_MODEL, host=host,
                                    port=_free_port(host), profile=profile_name, time_scale=time_scale)
                try:
                    await cluster.add(name, instance_for(spec, profile, seed=k), host, spec.port)
                    break
                except OSError:
                    continue
            else:
                raise OSError(f"no free port for {name} on {host}")
            specs.append(spec)
    except BaseException:
        await cluster.stop()
        raise
    return FleetDescription(instances=tuple(specs), source="<embedded simulated cluster>"), cluster.stop

"""Serve simulated instances over HTTP: one, or every instance of a fleet description, in one event loop.

`capbalancer sim --cluster FILE` serves exactly the fleet description format that the proxy's config and
`capbalancer deploy` use (capbalancer/fleet/description.py), so one file describes a fleet everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from capbalancer.fleet.description import FleetDescription, InstanceSpec
from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.schema import Profile
from capbalancer.sim.gpu_share import SharedGpu
from capbalancer.sim.http.instance import SimInstance
from capbalancer.sim.http.sglang import build_sglang_app
from capbalancer.sim.http.tgi import build_tgi_app
from capbalancer.sim.http.vllm import build_vllm_app

SIM_ENGINES = ("vllm", "tgi", "sglang")


def build_app(inst: SimInstance) -> web.Application:
    if inst.engine_kind == "tgi":
        if inst.max_concurrent_requests is not None:
            return build_tgi_app(inst, inst.max_concurrent_requests)
        return build_tgi_app(inst)
    if inst.engine_kind == "sglang":
        return build_sglang_app(inst)
    # "openai": a plain OpenAI-compatible server, which exposes no metrics at all
    return build_vllm_app(inst, with_metrics=inst.engine_kind != "openai")


@dataclass(slots=True)
class ServedInstance:
    name: str
    host: str
    port: int
    instance: SimInstance
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class SimCluster:
    """Started instances; `stop()` ends every step loop and closes every socket."""

    def __init__(self) -> None:
        self.served: list[ServedInstance] = []

    async def add(self, name: str, inst: SimInstance, host: str, port: int) -> ServedInstance:
        await inst.start()
        # handler_cancellation: a client that goes away mid-request aborts it in the engine, as vLLM does.
        runner = web.AppRunner(build_app(inst), access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await inst.stop()
            raise
        served = ServedInstance(name, host, port, inst, runner)
        self.served.append(served)
        return served

    async def stop(self) -> None:
        for s in reversed(self.served):
            await s.runner.cleanup()
            await s.instance.stop()
        self.served.clear()


# (seconds a request, seconds a prompt token) of API-server time; None: each profile's own figure.
FrontEnd = tuple[float | None, float | None]


def instance_for(spec: InstanceSpec, profile: Profile, seed: int = 0, gpu: SharedGpu | None = None,
                 enable_prefix_caching: bool = True, frontend: FrontEnd = (None, None)) -> SimInstance:
    return SimInstance(profile, engine_kind=spec.engine, model=spec.model, time_scale=spec.time_scale, seed=seed,
                       gpu=gpu, enable_prefix_caching=enable_prefix_caching, interference=spec.interference,
                       lora_modules=dict(spec.lora_modules), frontend_seconds=frontend[0],
                       frontend_seconds_per_prompt_token=frontend[1])


def fleet_base_dir(fleet: FleetDescription) -> Path | None:
    if fleet.source and not fleet.source.startswith("<"):
        return Path(fleet.source).resolve().parent
    return None


async def serve_fleet(fleet: FleetDescription, names: Iterable[str] | None = None, seed: int = 0,
                      enable_prefix_caching: bool = True, frontend: FrontEnd = (None, None)) -> SimCluster:
    """Start every instance of `fleet` (or those named) on its own host:port; instances of one gpu_group
    share one simulated GPU (capbalancer/sim/gpu_share.py)."""
    wanted = set(names) if names is not None else None
    base = fleet_base_dir(fleet)
    served_groups = [s.gpu_group for s in fleet.instances
                     if s.gpu_group is not None and (wanted is None or s.name in wanted)]
    gpus = {g: SharedGpu(g) for g in dict.fromkeys(served_groups) if served_groups.count(g) > 1}
    cluster = SimCluster()
    try:
        for k, spec in enumerate(fleet.instances):
            if wanted is not None and spec.name not in wanted:
                continue
            if spec.profile is None:
                raise ValueError(f"{fleet.source}: instance {spec.name!r} has no profile; the simulator needs one")
            if spec.engine not in SIM_ENGINES + ("openai",):
                raise ValueError(f"{fleet.source}: instance {spec.name!r}: engine {spec.engine!r} cannot be simulated")
            profile = resolve_profile(spec.profile, base)
            gpu = gpus.get(spec.gpu_group) if spec.gpu_group is not None else None
            await cluster.add(spec.name, instance_for(spec, profile, seed + k, gpu, enable_prefix_caching, frontend), spec.host,
                              spec.port)
    except BaseException:
        await cluster.stop()
        raise
    return cluster

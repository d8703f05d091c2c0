"""FleetMonitor against real aiohttp servers on 127.0.0.1 that serve fixture metrics, then fail, hang,
return garbage, go away and come back. Timings use generous tolerances (two shared cores)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from support import free_port

from capbalancer.fleet.monitor import FleetMonitor, PollTarget
from capbalancer.fleet.snapshot import EngineSnapshot

DATA = Path(__file__).parent / "data"
VLLM_PAGE = (DATA / "real" / "vllm-cpu-metrics-loaded.txt").read_text()
TGI_OLD_PAGE = (DATA / "metrics" / "tgi-1-no-capacity.txt").read_text()
SGLANG_PAGE = (DATA / "metrics" / "sglang.txt").read_text()
GARBAGE = (DATA / "metrics" / "garbage-html.txt").read_text()

INTERVAL_S = 0.2
TIMEOUT_S = 0.4


class FakeBackend:
    """A real HTTP server whose routes can be switched between ok / error / hang / garbage / absent."""

    def __init__(self, metrics: str | None = VLLM_PAGE, port: int | None = None) -> None:
        self.port = port or free_port()
        self.metrics_text = metrics
        self.metrics_mode = "ok"  # ok | 500 | hang | garbage
        self.health_mode = "ok"  # ok | 503 | hang | absent
        self.json_routes: dict[str, dict] = {}
        self.hits: dict[str, list[float]] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits.setdefault(path, []).append(time.monotonic())
        if path == "/health":
            if self.health_mode == "hang":
                await asyncio.sleep(30)
            if self.health_mode == "absent":
                raise web.HTTPNotFound()
            return web.Response(status=503 if self.health_mode == "503" else 200)
        if path == "/metrics" and self.metrics_text is not None:
            if self.metrics_mode == "hang":
                await asyncio.sleep(30)
            if self.metrics_mode == "500":
                return web.Response(status=500, text="Internal Server Error")
            text = GARBAGE if self.metrics_mode == "garbage" else self.metrics_text
            return web.Response(text=text, content_type="text/plain")
        if path in self.json_routes:
            return web.json_response(self.json_routes[path])
        raise web.HTTPNotFound()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class RecordingSink:
    snapshots: list[tuple[float, str, EngineSnapshot]] = field(default_factory=list)
    health: list[tuple[float, str, bool, str]] = field(default_factory=list)
    raise_errors: bool = False

    def on_snapshot(self, backend_id: str, snapshot: EngineSnapshot) -> None:
        self.snapshots.append((time.monotonic(), backend_id, snapshot))
        if self.raise_errors:
            raise RuntimeError("sink broke")

    def on_health(self, backend_id: str, ok: bool, reason: str) -> None:
        self.health.append((time.monotonic(), backend_id, ok, reason))
        if self.raise_errors:
            raise RuntimeError("sink broke")

    def snaps(self, backend_id: str = "b", since: float = 0.0) -> list[EngineSnapshot]:
        return [s for t, b, s in self.snapshots if b == backend_id and t >= since]

    def healths(self, backend_id: str = "b", since: float = 0.0) -> list[tuple[bool, str]]:
        return [(ok, r) for t, b, ok, r in self.health if b == backend_id and t >= since]


async def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until cond() held; fails the test past timeout_s."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def while_one_request_runs(sink: RecordingSink, name: str, url: str, body: dict) -> None:
    """Send one long request, return once a snapshot of `name` shows it running, then cancel it."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        req = asyncio.ensure_future(session.post(url, json=body))
        t0 = time.monotonic()
        await wait_until(lambda: any(s.running == 1 for s in sink.snaps(name, since=t0)), timeout_s=10)
        req.cancel()
        with contextlib.suppress(BaseException):
            await req


def monitor_for(targets: list[PollTarget], sink: RecordingSink, **kw) -> FleetMonitor:
    return FleetMonitor(targets, sink, interval_s=INTERVAL_S, timeout_s=TIMEOUT_S, **kw)


async def test_vllm_snapshot_values_and_send_time() -> None:
    backend, sink = FakeBackend(), RecordingSink()
    await backend.start()
    mon = monitor_for([PollTarget("b", backend.url, "vllm")], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 3)
    finally:
        await mon.stop()
        await backend.stop()
    snap = sink.snaps()[0]
    assert snap == EngineSnapshot(taken_at_s=snap.taken_at_s, engine="vllm", running=6, waiting=6,
                                  kv_usage_fraction=1.0, kv_capacity_tokens=2048, preemptions_total=2,
                                  prompt_tokens_total=1886, generation_tokens_total=2434,
                                  prefix_cache_queries_tokens_total=1886, prefix_cache_hits_tokens_total=1408)
    # The clock is read as the scrape is sent: each taken_at_s precedes the server's receipt of that scrape.
    arrivals = backend.hits["/metrics"]
    for s in sink.snaps()[:3]:
        assert any(0 <= a - s.taken_at_s < 1.0 for a in arrivals)
    taken = [s.taken_at_s for s in sink.snaps()]
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert all(ok for ok, _ in sink.healths()) and sink.healths()
    assert mon.detected_engine("b") == "vllm"


async def test_health_failure_hang_and_metrics_failure_are_independent() -> None:
    backend, sink = FakeBackend(), RecordingSink()
    await backend.start()
    mon = monitor_for([PollTarget("b", backend.url, "vllm")], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 1)

        backend.health_mode = "503"
        t0 = time.monotonic()
        await wait_until(lambda: any(not ok for ok, _ in sink.healths(since=t0)))
        assert any("503" in r for ok, r in sink.healths(since=t0) if not ok)
        n = len(sink.snaps())
        await wait_until(lambda: len(sink.snaps()) >= n + 2)  # metrics still answer: snapshots go on

        backend.health_mode = "ok"
        backend.metrics_mode = "500"
        await asyncio.sleep(2 * INTERVAL_S)  # let a poll in flight finish
        t1 = time.monotonic()
        await asyncio.sleep(5 * INTERVAL_S)
        assert sink.snaps(since=t1) == []  # never an empty or made-up snapshot
        assert sink.healths(since=t1) and all(ok for ok, _ in sink.healths(since=t1))  # still healthy

        backend.metrics_mode = "hang"
        await asyncio.sleep(TIMEOUT_S + INTERVAL_S)
        t2 = time.monotonic()
        await asyncio.sleep(6 * INTERVAL_S)
        assert sink.snaps(since=t2) == []
        # a hanging /metrics does not hold back health reports (at least one per timeout)
        assert len(sink.healths(since=t2)) >= 2

        backend.metrics_mode = "garbage"
        await asyncio.sleep(TIMEOUT_S + INTERVAL_S)
        t3 = time.monotonic()
        await asyncio.sleep(4 * INTERVAL_S)
        assert sink.snaps(since=t3) == []

        backend.metrics_mode = "ok"
        t4 = time.monotonic()
        waited = await wait_until(lambda: len(sink.snaps(since=t4)) >= 1)
        assert waited < 2 * INTERVAL_S * 1.1 + TIMEOUT_S + 1.0  # generous: two intervals plus slack

        backend.health_mode = "hang"
        t5 = time.monotonic()
        await wait_until(lambda: any(not ok for ok, _ in sink.healths(since=t5)))
        assert any("timed out" in r for ok, r in sink.healths(since=t5) if not ok)
    finally:
        await mon.stop()
        await backend.stop()


async def test_backend_going_away_and_coming_back_is_seen_within_two_intervals() -> None:
    backend, sink = FakeBackend(), RecordingSink()
    await backend.start()
    mon = monitor_for([PollTarget("b", backend.url, "vllm")], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 1)
        await backend.stop()
        t0 = time.monotonic()
        down_after = await wait_until(lambda: any(not ok for ok, _ in sink.healths(since=t0)))
        assert down_after < 2 * INTERVAL_S + TIMEOUT_S + 1.0
        await asyncio.sleep(3 * INTERVAL_S)
        t1 = time.monotonic()
        await asyncio.sleep(2 * INTERVAL_S)
        assert sink.snaps(since=t1) == []
        assert all(not ok for ok, _ in sink.healths(since=t1))

        await backend.start()  # same port
        t2 = time.monotonic()
        up_after = await wait_until(lambda: any(ok for ok, _ in sink.healths(since=t2)))
        await wait_until(lambda: len(sink.snaps(since=t2)) >= 1)
        assert up_after < 2 * INTERVAL_S * 1.1 + 1.0  # no backoff: recovery within two intervals (+ slack)
    finally:
        await mon.stop()
        await backend.stop()


async def test_auto_detects_each_engine_and_plain_openai() -> None:
    vllm = FakeBackend(VLLM_PAGE)
    sglang = FakeBackend(SGLANG_PAGE)
    sglang.json_routes["/get_model_info"] = {"model_path": "m", "is_generation": True}
    tgi = FakeBackend(None)  # an old TGI: no metrics route here, but /info
    tgi.json_routes["/info"] = {"model_id": "m", "router": "text-generation-router", "max_total_tokens": 4096,
                                "max_batch_total_tokens": 30000}
    plain = FakeBackend(None)  # no /metrics, no /health: only the OpenAI routes
    plain.health_mode = "absent"
    plain.json_routes["/v1/models"] = {"object": "list", "data": [{"id": "m", "object": "model"}]}
    backends = {"vllm": vllm, "sglang": sglang, "tgi": tgi, "plain": plain}
    sink = RecordingSink()
    for b in backends.values():
        await b.start()
    mon = monitor_for([PollTarget(name, b.url, "auto") for name, b in backends.items()], sink)
    try:
        assert mon.detected_engine("vllm") == "auto"
        await mon.start()
        await wait_until(lambda: all(mon.detected_engine(n) != "auto" for n in backends))
        await wait_until(lambda: all(sink.snaps(n) for n in ("vllm", "sglang", "plain")))
        await wait_until(lambda: any(ok for ok, _ in sink.healths("plain")))
    finally:
        await mon.stop()
        for b in backends.values():
            await b.stop()
    assert {n: mon.detected_engine(n) for n in backends} == {"vllm": "vllm", "sglang": "sglang", "tgi": "tgi",
                                                              "plain": "openai"}
    assert sink.snaps("vllm")[0].running == 6 and sink.snaps("sglang")[0].kv_capacity_tokens == 120000
    plain_snap = sink.snaps("plain")[-1]
    assert plain_snap == EngineSnapshot(taken_at_s=plain_snap.taken_at_s, engine="openai")
    assert all(ok for ok, _ in sink.healths("plain")[-2:])  # /v1/models stands in for the missing /health
    assert sink.snaps("tgi") == []  # this TGI serves no metrics: nothing made up


async def test_auto_detection_waits_for_a_down_backend() -> None:
    backend, sink = FakeBackend(SGLANG_PAGE), RecordingSink()
    mon = monitor_for([PollTarget("b", backend.url, "auto")], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.healths()) >= 3)
        assert mon.detected_engine("b") == "auto"  # refused says nothing about what it is
        backend.metrics_mode = "500"
        await backend.start()
        await wait_until(lambda: any(ok for ok, _ in sink.healths()))
        await asyncio.sleep(3 * INTERVAL_S)
        assert mon.detected_engine("b") == "auto"  # a failing /metrics is not "no metrics"
        backend.metrics_mode = "ok"
        await wait_until(lambda: mon.detected_engine("b") == "sglang")
        await wait_until(lambda: len(sink.snaps()) >= 1)
    finally:
        await mon.stop()
        await backend.stop()


async def test_old_tgi_capacity_from_info_and_configured_capacity() -> None:
    old = FakeBackend(TGI_OLD_PAGE)
    old.json_routes["/info"] = {"model_id": "m", "max_batch_total_tokens": 24000}
    configured = FakeBackend(TGI_OLD_PAGE)
    both = FakeBackend(TGI_OLD_PAGE)
    both.json_routes["/info"] = {"model_id": "m", "max_batch_total_tokens": 24000}
    sink = RecordingSink()
    for b in (old, configured, both):
        await b.start()
    mon = monitor_for([PollTarget("old", old.url, "tgi"),
                       PollTarget("cfg", configured.url, "tgi", kv_capacity_tokens=48000),
                       PollTarget("both", both.url, "tgi", kv_capacity_tokens=48000)], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps("old")) >= 3 and len(sink.snaps("cfg")) >= 1
                         and len(sink.snaps("both")) >= 1)
    finally:
        await mon.stop()
        for b in (old, configured, both):
            await b.stop()
    snap = sink.snaps("old")[0]
    assert (snap.kv_capacity_tokens, snap.kv_usage_fraction, snap.batch_tokens) == (24000, 0.5, 12000)
    assert len(old.hits["/info"]) == 1  # asked once, remembered
    assert sink.snaps("cfg")[0].kv_capacity_tokens == 48000 and sink.snaps("cfg")[0].kv_usage_fraction == 0.25
    # A configured (profile) capacity does not stop the monitor asking the engine, whose figure wins.
    assert sink.snaps("both")[0].kv_capacity_tokens == 24000 and len(both.hits["/info"]) == 1


async def test_headers_are_sent() -> None:
    seen: list[str | None] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(text=SGLANG_PAGE)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sink = RecordingSink()
    mon = monitor_for([PollTarget("b", f"http://127.0.0.1:{port}", "sglang", headers={"Authorization": "Bearer k"})],
                      sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 1)
    finally:
        await mon.stop()
        await runner.cleanup()
    assert seen and all(h == "Bearer k" for h in seen)


async def test_add_and_remove_targets_at_run_time() -> None:
    a, b = FakeBackend(), FakeBackend(SGLANG_PAGE)
    sink = RecordingSink()
    await a.start()
    await b.start()
    mon = monitor_for([PollTarget("a", a.url, "vllm")], sink)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps("a")) >= 1)
        mon.add_target(PollTarget("b", b.url, "sglang"))
        await wait_until(lambda: len(sink.snaps("b")) >= 1)
        mon.remove_target("a")
        t0 = time.monotonic()
        await asyncio.sleep(4 * INTERVAL_S)
        assert sink.snaps("a", since=t0) == [] and sink.healths("a", since=t0) == []
        assert len(sink.snaps("b", since=t0)) >= 2
        with pytest.raises(KeyError):
            mon.detected_engine("a")
    finally:
        await mon.stop()
        await a.stop()
        await b.stop()


async def test_stop_is_prompt_with_requests_hanging_and_sink_errors_do_not_kill_the_loop() -> None:
    backend, sink = FakeBackend(), RecordingSink(raise_errors=True)
    await backend.start()
    mon = FleetMonitor([PollTarget("b", backend.url, "vllm")], sink, interval_s=INTERVAL_S, timeout_s=5.0)
    try:
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 3)  # the sink raised every time; polling went on
        backend.metrics_mode = backend.health_mode = "hang"
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await mon.stop()
        assert time.monotonic() - t0 < 1.0
        n = len(sink.snaps()) + len(sink.healths())
        await asyncio.sleep(3 * INTERVAL_S)
        assert len(sink.snaps()) + len(sink.healths()) == n  # nothing after stop
    finally:
        await mon.stop()  # idempotent
        await backend.stop()


async def test_jittered_interval_keeps_the_mean_period() -> None:
    backend, sink = FakeBackend(), RecordingSink()
    await backend.start()
    mon = FleetMonitor([PollTarget("b", backend.url, "vllm")], sink, interval_s=0.1, timeout_s=1.0,
                       jitter_fraction=0.3)
    try:
        await mon.start()
        await asyncio.sleep(2.0)
    finally:
        await mon.stop()
        await backend.stop()
    hits = backend.hits["/metrics"]
    gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert 0.07 <= mean <= 0.2, mean  # ~0.1 s; loaded machine: wide band
    assert max(gaps) - min(gaps) > 0.01  # jittered, not lockstep


def test_bad_arguments_are_refused() -> None:
    sink = RecordingSink()
    with pytest.raises(ValueError):
        FleetMonitor([PollTarget("b", "http://127.0.0.1:1", "triton")], sink)
    with pytest.raises(ValueError):
        FleetMonitor([], sink, interval_s=0)
    with pytest.raises(ValueError):
        FleetMonitor([], sink, jitter_fraction=1.0)


async def test_shared_session_is_not_closed() -> None:
    import aiohttp

    backend, sink = FakeBackend(), RecordingSink()
    await backend.start()
    async with aiohttp.ClientSession() as session:
        mon = monitor_for([PollTarget("b", backend.url, "vllm")], sink, session=session)
        await mon.start()
        await wait_until(lambda: len(sink.snaps()) >= 1)
        await mon.stop()
        assert not session.closed
    await backend.stop()


async def test_monitor_reads_simulated_engines_in_subprocesses(tmp_path: Path) -> None:
    """`capbalancer sim` serves each engine's API and metric names from a real subprocess; the monitor
    detects every engine and reads the same KV capacity from each engine's own metric names."""
    import yaml
    from support import capbalancer, running

    profile = str(DATA / "profiles" / "fast-13b.yaml")
    ports = [free_port() for _ in range(4)]
    names = ["v", "t", "s", "o"]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "m", "instances": [
        {"name": "v", "engine": "vllm", "port": ports[0], "profile": profile, "time_scale": 20.0},
        {"name": "t", "engine": "tgi", "port": ports[1], "profile": profile},
        {"name": "s", "engine": "sglang", "port": ports[2], "profile": profile},
        {"name": "o", "engine": "openai", "port": ports[3], "profile": profile}]}))
    sink = RecordingSink()
    with running(capbalancer("sim", "--cluster", str(fleet)), ready_url=f"http://127.0.0.1:{ports[3]}/health"):
        mon = monitor_for([PollTarget(n, f"http://127.0.0.1:{p}", "auto") for n, p in zip(names, ports, strict=True)],
                          sink)
        try:
            await mon.start()
            await wait_until(lambda: all(sink.snaps(n) for n in names), timeout_s=15)
            assert {n: mon.detected_engine(n) for n in names} == {"v": "vllm", "t": "tgi", "s": "sglang",
                                                                  "o": "openai"}
            idle = {n: sink.snaps(n)[-1] for n in names}
            # a long request on the slowed-down vLLM instance shows up as running in a later snapshot
            await while_one_request_runs(sink, "v", f"http://127.0.0.1:{ports[0]}/v1/completions",
                                         {"model": "m", "prompt": "hello " * 50, "max_tokens": 200, "ignore_eos": True})
        finally:
            await mon.stop()
    capacities = {n: idle[n].kv_capacity_tokens for n in "vts"}
    assert len(set(capacities.values())) == 1 and capacities["v"] and capacities["v"] > 0, capacities
    assert (idle["v"].running, idle["v"].waiting, idle["v"].kv_usage_fraction) == (0, 0, 0.0)
    assert (idle["t"].running in (0, None)) and idle["t"].batch_tokens in (0, None)
    assert (idle["s"].running, idle["s"].waiting, idle["s"].kv_usage_fraction) == (0, 0, 0.0)
    assert idle["o"] == EngineSnapshot(taken_at_s=idle["o"].taken_at_s, engine="openai")


async def test_tgi_kv_usage_is_the_batch_budget_over_capacity_on_a_simulated_tgi() -> None:
    """TGI has no KV gauge: the adapter reads KV use as the running batch's token budget (inputs +
    max_new_tokens, what TGI reserves) over `tgi_batch_max_total_tokens`, from a real TGI-shaped process."""
    from support import capbalancer, running

    profile = DATA / "profiles" / "fast-13b.yaml"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sink = RecordingSink()
    with running(capbalancer("sim", "--engine", "tgi", "--profile", str(profile), "--port", str(port), "--model", "m",
                             "--time-scale", "20"), ready_url=f"{base}/health"):
        mon = monitor_for([PollTarget("t", base, "tgi")], sink)
        try:
            await mon.start()
            await while_one_request_runs(sink, "t", f"{base}/generate_stream",
                                         {"inputs": "hello " * 50, "parameters": {"max_new_tokens": 500}})
        finally:
            await mon.stop()
    busy = next(s for s in sink.snaps("t") if s.running == 1)
    assert busy.kv_capacity_tokens == 56000 and busy.batch_tokens is not None and busy.batch_tokens > 500
    assert busy.kv_usage_fraction == busy.batch_tokens / busy.kv_capacity_tokens

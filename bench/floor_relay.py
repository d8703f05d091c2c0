"""The floor of a Python relay: what one process on uvloop and httptools spends per request doing nothing but relay.

    .venv/bin/python bench/floor_relay.py --port PORT --upstream http://127.0.0.1:BPORT

A reference for bench/dataplane.py (`--floor`), not a product: it parses the client's request head and the
upstream's answer with httptools (llhttp, as capbalancer's fast server does), sends the request's bytes unchanged
over one kept-alive upstream connection per client connection, and the answer's bytes unchanged back. No
routing, no body parsing, no header filtering, no limits, no timeouts, no logs, no metrics: whatever capbalancer
spends per request above this is the cost of being a load balancer in Python rather than a pipe. It handles
only what the bench sends (Content-Length bodies, one request at a time per connection).
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

import httptools


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the backend; hands each complete answer's bytes to its client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answer += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        answer, self.answer = bytes(self.answer), bytearray()
        self.client.answer(answer)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.client.close()


class Client(asyncio.Protocol):
    """A client connection: each complete request's bytes go to this connection's upstream as they came."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request = bytearray()
        self.waiting: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.upstream = Upstream(self)
        loop.create_task(loop.create_connection(lambda: self.upstream, self.host, self.port)).add_done_callback(
            self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        if task.exception() is not None:
            self.close()
            return
        for request in self.waiting:
            self._send(request)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        self.request += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        request, self.request = bytes(self.request), bytearray()
        self._send(request)

    def _send(self, request: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.waiting.append(request)
            return
        upstream.transport.write(request)

    def answer(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream: str) -> None:
    url = urlsplit(upstream)
    host, uport = url.hostname or "127.0.0.1", url.port or 80
    server = await asyncio.get_running_loop().create_server(lambda: Client(host, uport), "127.0.0.1", port,
                                                            backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()

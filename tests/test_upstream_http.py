"""upstream_http against real sockets on 127.0.0.1: small asyncio servers that write exact bytes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from capbalancer.server import upstream_http
from capbalancer.server.upstream_http import (
    ConnectError,
    ConnectTimeout,
    PayloadError,
    ServerDisconnected,
    UpstreamPool,
)


class RawServer:
    """Accepts connections; `handler(reader, writer)` answers each. Counts connections and closes."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_peer = asyncio.Event()
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def keepalive_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def echo_keepalive(srv: RawServer, reader, writer) -> None:
    while True:
        req = await srv.read_request(reader)
        if req is None:
            return
        writer.write(keepalive_answer(b'{"n":%d}' % len(srv.requests)))
        await writer.drain()


async def test_content_length_body_headers_and_request_bytes():
    async with RawServer(echo_keepalive) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/v1/chat?x=1", [("Authorization", "Bearer k"), ("X-Multi", "a"),
                                                           ("X-Multi", "b")], b'{"a":1}')
        assert resp.status == 200
        assert resp.headers["content-type"] == "application/json"
        assert await resp.read() == b'{"n":1}'
        resp.release()
        req = srv.requests[0]
        port = srv.url.rsplit(":", 1)[1]
        assert req == (b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode()
                       + b"\r\nAuthorization: Bearer k\r\nX-Multi: a\r\nX-Multi: b\r\nContent-Length: 7\r\n\r\n"
                       + b'{"a":1}')
        await pool.close()


async def test_keepalive_reuse_only_after_full_read():
    async with RawServer(echo_keepalive) as srv:
        pool = UpstreamPool(srv.url)
        for i in range(5):
            resp = await pool.request("POST", "/", [], b"x")
            assert await resp.read() == b'{"n":%d}' % (i + 1)
            resp.release()
        assert srv.connections == 1 and pool.connections_made == 1 and pool.idle_count == 1
        # Released before reading the body: the connection cannot be reused.
        resp = await pool.request("POST", "/", [], b"x")
        pool_before = pool.idle_count
        assert pool_before == 0
        resp.close()
        resp = await pool.request("POST", "/", [], b"x")
        await resp.read()
        resp.release()
        assert srv.connections == 2
        await pool.close()
        assert pool.idle_count == 0


async def test_half_read_stream_is_not_reused():
    async def handler(srv, reader, writer):
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read_chunk() == b"hello"
        resp.release()  # the body has not ended
        assert pool.idle_count == 0
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read() == b"hello"
        resp.release()
        assert srv.connections == 2 and pool.idle_count == 1
        await pool.close()


async def test_chunked_decoded_across_split_writes_with_extensions_and_trailers():
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Engine: e\r\n\r\n"
           b"4;ext=1\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def handler(srv, reader, writer):
        while await srv.read_request(reader) is not None:
            for i in range(0, len(raw), 3):  # byte-split everywhere: sizes, CRLFs, data
                writer.write(raw[i:i + 3])
                await writer.drain()
                await asyncio.sleep(0)

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        assert resp.headers["X-Engine"] == "e" and "x-trailer" not in resp.headers
        assert await resp.read() == b"Wikipedia in \r\n\r\nchunks."
        resp.release()
        assert pool.idle_count == 1  # a complete chunked body: reusable
        await pool.close()


async def test_streaming_chunks_arrive_as_sent():
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        got = []
        async for chunk in resp:
            got.append(chunk)
        assert got == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]  # one by one, not all at the end
        resp.release()
        await pool.close()


async def test_body_until_close_and_connection_close_not_pooled():
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read() == b"until the end"
        resp.release()
        assert pool.idle_count == 0
        await pool.close()


async def test_server_closes_mid_body():
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some")
        await writer.drain()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        with pytest.raises(PayloadError):
            await resp.read()
        resp.release()
        assert pool.idle_count == 0
        await pool.close()


async def test_server_closes_without_response():
    async def handler(srv, reader, writer):
        await srv.read_request(reader)  # and close

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(ServerDisconnected):
            await pool.request("POST", "/", [], b"x")
        await pool.close()


async def test_stale_keepalive_connection_is_retried_once_on_a_new_one():
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(keepalive_answer(b"first"))
        await writer.drain()
        await asyncio.sleep(0.05)  # then close the kept-alive connection, as uvicorn does when idle

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read() == b"first"
        resp.release()
        assert pool.idle_count == 1
        await asyncio.sleep(0.2)
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read() == b"first"
        resp.release()
        assert srv.connections == 2
        await pool.close()


async def test_refused_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        pool = UpstreamPool(f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectError) as info:
            await pool.request("POST", "/", [], b"x")
        assert isinstance(info.value.os_error, ConnectionRefusedError)


async def test_connect_timeout(monkeypatch):
    # A connect that never completes (a black-holed SYN), without relying on the network: the loop's
    # create_connection hangs.
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def hang(*args, **kwargs):
        started.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "create_connection", hang)
    pool = UpstreamPool("http://127.0.0.1:9", connect_timeout_s=0.2)
    t0 = loop.time()
    with pytest.raises(ConnectTimeout):
        await pool.request("POST", "/", [], b"x")
    assert started.is_set() and 0.15 < loop.time() - t0 < 2.0


async def test_cancelled_read_closes_the_connection_at_once():
    closed = asyncio.Event()

    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # EOF: the client closed
            closed.set()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        assert await resp.read_chunk() == b"abc"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await resp.read_chunk()
        await asyncio.wait_for(closed.wait(), 2.0)
        resp.release()
        assert pool.idle_count == 0
        await pool.close()


async def test_cancelled_before_head_closes_the_connection():
    closed = asyncio.Event()

    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        if await reader.read(1) == b"":
            closed.set()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pool.request("POST", "/", [], b"x")
        await asyncio.wait_for(closed.wait(), 2.0)
        assert pool.idle_count == 0
        await pool.close()


async def test_pool_bounds_idle_connections():
    gate = asyncio.Event()

    async def handler(srv, reader, writer):
        while await srv.read_request(reader) is not None:
            await gate.wait()
            writer.write(keepalive_answer(b"ok"))
            await writer.drain()

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url, max_idle=2)

        async def one():
            resp = await pool.request("POST", "/", [], b"x")
            body = await resp.read()
            resp.release()
            return body

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await asyncio.sleep(0.1)
        gate.set()
        assert await asyncio.gather(*tasks) == [b"ok"] * 5
        assert pool.connections_made == 5 and pool.idle_count == 2


async def test_idle_connections_expire():
    async with RawServer(echo_keepalive) as srv:
        pool = UpstreamPool(srv.url, keepalive_s=0.05)
        resp = await pool.request("POST", "/", [], b"x")
        await resp.read()
        resp.release()
        await asyncio.sleep(0.1)
        resp = await pool.request("POST", "/", [], b"x")
        await resp.read()
        resp.release()
        assert pool.connections_made == 2


async def test_flow_control_pauses_reading_when_consumer_lags(monkeypatch):
    monkeypatch.setattr(upstream_http, "HIGH_WATER", 64 * 1024)
    total = 16 * 1024 * 1024  # far more than loopback socket buffers hold
    sent = 0

    async def handler(srv, reader, writer):
        nonlocal sent
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    async with RawServer(handler) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request("POST", "/", [], b"x")
        await asyncio.sleep(0.5)  # the consumer lags: the server must be held back by TCP
        assert resp._conn.paused and resp._conn.buffered < 1024 * 1024
        assert sent < total
        got = len(await resp.read())
        assert got == total
        resp.release()
        await pool.close()


async def test_against_aiohttp_server_chunked_sse():
    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(20):
            await resp.write(b"data: %d\n\n" % i)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/s", sse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        pool = UpstreamPool(f"http://127.0.0.1:{port}")
        for _ in range(3):
            resp = await pool.request("POST", "/s", [("Content-Type", "application/json")], b"{}")
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert await resp.read() == b"".join(b"data: %d\n\n" % i for i in range(20))
            resp.release()
        assert pool.connections_made == 1
        await pool.close()
    finally:
        await runner.cleanup()


async def test_header_injection_refused():
    pool = UpstreamPool("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await pool.request("POST", "/", [("X-A", "v\r\nX-Evil: 1")], b"")

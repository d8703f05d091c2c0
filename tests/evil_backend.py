"""A hostile backend: a real process speaking just enough raw HTTP/1.1 to look like an OpenAI engine, whose
answers try to make the proxy hold unbounded memory (issue 14). Raw asyncio, not aiohttp: it must be able to
send what no well-behaved server library would.

The request header `x-evil` picks the answer to an API request (the proxy forwards client headers):
    ok               a small, normal chat completion
    endless-body     200, chunked, JSON-looking bytes for ever (non-streamed request)
    endless-length   200 with Content-Length: 1 TiB, bytes for ever
    endless-stream   200 text/event-stream, SSE events for ever
    endless-header   a status line, then one header whose value never ends
    many-headers     a status line, then header lines for ever
    huge-error       500 with an endless body
GET /health answers 200; other GETs (/v1/models, /info) a model list, and are recorded with their
Authorization header: GET /_seen lists them. `python tests/evil_backend.py --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

CHUNK = b'{"filler": "' + b"x" * 65000 + b'"}\n'
OK_BODY = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "created": 0,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()


SEEN: list[dict[str, str | None]] = []  # GETs other than /health: path and Authorization (GET /_seen)


def _head(status: str, headers: list[str]) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


async def _forever(writer: asyncio.StreamWriter, data: bytes, chunked: bool = False) -> None:
    piece = (f"{len(data):x}\r\n".encode() + data + b"\r\n") if chunked else data
    while True:
        writer.write(piece)
        await writer.drain()  # as fast as the proxy reads: the proxy, not this process, must stop it


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            if method == "GET":
                if path.startswith("/_seen"):
                    body = json.dumps(SEEN).encode()
                elif path.startswith("/health"):
                    body = b'{"status":"ok"}'
                else:
                    SEEN.append({"path": path, "authorization": headers.get("authorization")})
                    body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                writer.write(_head("200 OK", ["Content-Type: application/json", f"Content-Length: {len(body)}"]) + body)
                await writer.drain()
                continue
            evil = headers.get("x-evil", "ok")
            if evil == "ok":
                writer.write(_head("200 OK", ["Content-Type: application/json", f"Content-Length: {len(OK_BODY)}"])
                             + OK_BODY)
                await writer.drain()
                continue
            if evil == "endless-body":
                writer.write(_head("200 OK", ["Content-Type: application/json", "Transfer-Encoding: chunked"]))
                await _forever(writer, CHUNK, chunked=True)
            elif evil == "endless-length":
                writer.write(_head("200 OK", ["Content-Type: application/json", f"Content-Length: {1 << 40}"]))
                await _forever(writer, CHUNK)
            elif evil == "endless-stream":
                writer.write(_head("200 OK", ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]))
                event = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"y" * 16000 + b'"}}]}\n\n'
                await _forever(writer, event, chunked=True)
            elif evil == "endless-header":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Endless: ")
                await _forever(writer, b"z" * 65536)
            elif evil == "many-headers":
                writer.write(b"HTTP/1.1 200 OK\r\n")
                await _forever(writer, b"".join(b"X-H%d: v\r\n" % i for i in range(2000)))
            elif evil == "huge-error":
                writer.write(_head("500 Internal Server Error", ["Content-Type: application/json",
                                                                 "Transfer-Encoding: chunked"]))
                await _forever(writer, CHUNK, chunked=True)
            return
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _main(host: str, port: int) -> None:
    server = await asyncio.start_server(_serve, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port))

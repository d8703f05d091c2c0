"""The front door's socket calls (server/heldio.py): the GIL-holding ones and the socket-module fallback do the
same thing on real sockets on 127.0.0.1; and a refusal's request is read whole before the door closes."""

from __future__ import annotations

import socket
import sys

import pytest

from capbalancer.server.frontdoor import whole_request_bytes
from capbalancer.server.heldio import AVAILABLE, HeldIO, SocketModuleIO, door_io

KINDS = [SocketModuleIO] + ([HeldIO] if AVAILABLE else [])


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_accept_peek_recv_send_shutdown_close(kind, listener):
    io = kind()
    with pytest.raises(BlockingIOError):
        io.accept(listener)  # nobody waiting: never blocks
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.sendall(b"GET /health HTTP/1.1\r\n\r\n")
    fd = None
    for _ in range(1000):  # the connection is there within moments
        try:
            fd = io.accept(listener)
            break
        except BlockingIOError:
            pass
    assert fd is not None
    io.set_nodelay(fd)
    peeked = b""
    for _ in range(1000):
        try:
            peeked = io.recv(fd, 1024, peek=True)
            break
        except BlockingIOError:
            pass
    assert peeked == b"GET /health HTTP/1.1\r\n\r\n"
    assert io.recv(fd, 4) == b"GET "  # a peek left it there; a read takes it
    assert io.recv(fd, 1024) == b"/health HTTP/1.1\r\n\r\n"
    with pytest.raises(BlockingIOError):
        io.recv(fd, 1024)  # nothing more: never blocks
    assert io.send(fd, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == 38
    io.shutdown_write(fd)
    got = b""
    while chunk := client.recv(1024):
        got += chunk
    assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # then EOF: the half-close arrived
    client.close()
    for _ in range(1000):
        try:
            if io.recv(fd, 1024) == b"":
                break
        except BlockingIOError:
            pass
    else:
        pytest.fail("the client's close never read as EOF")
    io.close(fd)
    with pytest.raises(OSError):
        socket.socket(fileno=fd)  # closed: the descriptor is gone


def test_linux_gets_the_gil_holding_calls():
    if sys.platform.startswith("linux"):
        assert AVAILABLE and isinstance(door_io(), HeldIO)
    else:
        assert isinstance(door_io(), SocketModuleIO)


@pytest.mark.parametrize(("head", "expected"), [
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 57),
    (b"POST /v1/completions HTTP/1.1\r\ncontent-length:  12 \r\n\r\n", 67),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 36),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Len", None),  # head not all there
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n", None),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n", None),
])
def test_a_requests_whole_length_is_read_from_its_head(head, expected):
    assert whole_request_bytes(head) == expected

"""Security (issue 7 §5): a guarded admin API, no open proxy / SSRF, hop-by-hop and internal headers stripped
both ways, limits on by default, secrets never logged. Real proxy and backend processes on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import inspect
import json
import re
import socket

import pytest
from faults import FaultBackend, Proxy, fault_backends, proxy_config

from capbalancer.config import parse_config

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MSG}


def raw_http(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send bytes as they are (absolute URIs, odd Host headers) and read the answer until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            pass
        return b"".join(chunks)


# --- admin API ------------------------------------------------------------------------------------------

def test_admin_api_off_without_token_and_guarded_with_one():
    with FaultBackend("b0") as b:
        with Proxy([b]) as proxy:  # no token variable set: the admin API does not exist
            for method, path in (("GET", "backends"), ("POST", "reload"), ("POST", "backends/b0/drain")):
                status, body = proxy.admin(method, path, token="anything")
                assert status == 404, (method, path, body)
                assert set(body["error"]) >= {"message", "type", "param", "code"}
            assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200  # drain did not happen
        token = "adm-9f2c41d0e6b7"
        with Proxy([b], admin_token=token) as proxy:
            cases = {"missing": None, "wrong": "adm-9f2c41d0e6b8", "prefix": token[:-1], "longer": token + "x",
                     "empty": ""}
            for what, tok in cases.items():
                for method, path in (("GET", "backends"), ("POST", "backends/b0/drain"), ("POST", "reload"),
                                     ("DELETE", "backends/b0")):
                    status, body = proxy.admin(method, path, token=tok)
                    assert status in (401, 403), (what, method, path, status)
                    assert body["error"]["type"] in ("authentication_error", "permission_error")
            # The token only counts as a Bearer credential, not in the query string or another scheme.
            status, _, _ = proxy.request("GET", f"/admin/backends?token={token}")
            assert status in (401, 403)
            status, _, _ = proxy.request("GET", "/admin/backends", headers={"Authorization": f"Basic {token}"})
            assert status in (401, 403)
            status, _, _ = proxy.request("GET", "/admin/backends", headers={"X-Admin-Token": token})
            assert status in (401, 403)
            # Nothing the refused calls asked for happened.
            status, state = proxy.admin("GET", "backends")
            assert status == 200 and state["backends"]["b0"]["draining"] is False
            assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200


def test_admin_token_compared_in_constant_time():
    from capbalancer.server import admin

    source = inspect.getsource(admin._authorize)
    assert "hmac.compare_digest(" in source
    # No plain equality on the token anywhere in the admin module.
    assert not re.search(r"admin_token\s*[!=]=|[!=]=\s*state\.admin_token", inspect.getsource(admin))


# --- no open proxy, no SSRF -------------------------------------------------------------------------------

def test_forwards_only_to_configured_backends_whatever_the_request_says():
    with fault_backends(2, prefix="x") as (backend, canary):
        canary_host = f"127.0.0.1:{canary.port}"
        with Proxy([backend], admin_token="adm") as proxy:
            attempts: list[tuple[str, int]] = []

            def post(path: str, body: object, headers: dict[str, str] | None = None) -> None:
                status, _, _ = proxy.request("POST", path, body, headers)
                attempts.append((path, status))

            # Host and forwarding headers naming the canary.
            for h in ({"Host": canary_host}, {"X-Forwarded-Host": canary_host},
                      {"Forwarded": f"host={canary_host}"}, {"X-Forwarded-For": "127.0.0.1"},
                      {"X-Original-URL": f"http://{canary_host}/v1/chat/completions"}):
                post("/v1/chat/completions", CHAT, h)
            # Body fields naming the canary: model as a URL, base_url/api_base/url fields, TGI inputs.
            for body in ({"model": f"http://{canary_host}", "messages": MSG},
                         {"model": f"http://{canary_host}/v1", "messages": MSG},
                         {**CHAT, "base_url": f"http://{canary_host}/v1", "api_base": f"http://{canary_host}",
                          "url": f"http://{canary_host}/v1/chat/completions", "endpoint": canary.url},
                         {"model": "m", "messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": f"http://{canary_host}/x.png"}}]}]}):
                post("/v1/chat/completions", body)
            post("/generate", {"inputs": f"http://{canary_host}/", "parameters": {"max_new_tokens": 2}})
            # Paths that try to smuggle a host or escape the API.
            for path in (f"//{canary_host}/v1/chat/completions", f"/{canary.url}/v1/chat/completions",
                         "/v1/chat/completions/../../admin/backends", f"/v1/chat/completions?host={canary_host}",
                         f"/v1/chat/completions#@{canary_host}"):
                try:
                    post(path, CHAT)
                except Exception as exc:  # urllib may refuse to build some of these itself
                    attempts.append((path, -1))
                    assert "URL" in type(exc).__name__ or isinstance(exc, ValueError), exc
            # Absolute-URI request lines and a CONNECT, written on a raw socket.
            body = json.dumps(CHAT).encode()
            for line in (f"POST http://{canary_host}/v1/chat/completions HTTP/1.1",
                         f"GET http://{canary_host}/health HTTP/1.1",
                         f"CONNECT {canary_host} HTTP/1.1"):
                answer = raw_http(proxy.port, (f"{line}\r\nHost: {canary_host}\r\nContent-Type: application/json\r\n"
                                               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                                  + body)
                assert answer.startswith(b"HTTP/1.1 "), answer[:100]
                status = int(answer.split()[1])
                assert status != 500, answer[:300]
                attempts.append((line, status))
            # Adding the canary as a backend needs the admin token.
            status, _ = proxy.admin("POST", "backends", {"url": canary.url, "name": "evil"}, token=None)
            assert status == 401
            post("/v1/chat/completions", {"model": "evil", "messages": MSG})

            canary_seen = canary.stats()
            assert canary_seen["counts"] == {}, canary_seen["recent"]  # not one request reached it
            assert all(s != 500 for _, s in attempts), attempts
            seen = backend.stats()
            # Whatever reached the configured backend went to an API path on it.
            assert {r["path"] for r in seen["recent"]} <= {"/v1/chat/completions", "/generate"}, seen["recent"]
            assert seen["counts"].get("other", 0) == 0


# --- hop-by-hop and internal headers, both ways ------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_hop_by_hop_and_internal_headers_stripped_both_ways(stream):
    leaky = {"Keep-Alive": "timeout=99", "Proxy-Authenticate": "Basic realm=engine", "Upgrade": "h2c",
             "Trailer": "X-Checksum", "X-Capbalancer-Backend": "spoofed", "X-Capbalancer-Held-Ms": "-1",
             "X-Capbalancer-Internal": "engine-secret", "X-Engine-Ok": "kept"}
    with FaultBackend("b0", response_headers=leaky) as b:
        with Proxy([b]) as proxy:
            sent = {"Connection": "keep-alive, X-Hop-Custom", "X-Hop-Custom": "hop-value", "Keep-Alive": "300",
                    "Proxy-Authorization": "Basic cHJveHk6cGFzcw==", "Proxy-Connection": "keep-alive",
                    "TE": "trailers", "Upgrade": "websocket", "X-Capbalancer-Priority": "3",
                    "X-Capbalancer-Internal": "client-says", "X-Client-Ok": "kept"}
            # http.client sends headers as given (urllib would overwrite Connection with "close").
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": stream}),
                         {"Content-Type": "application/json", **sent})
            resp = conn.getresponse()
            status, headers, body = resp.status, dict(resp.getheaders()), resp.read()
            conn.close()
            assert status == 200, body
            got = {k.lower() for k in b.stats()["recent"][-1]["headers"]}
            for h in ("x-hop-custom", "keep-alive", "proxy-authorization", "proxy-connection", "te", "upgrade",
                      "x-capbalancer-priority", "x-capbalancer-internal"):
                assert h not in got, (h, got)
            assert "x-client-ok" in got and "x-request-id" in got
            lower = {k.lower(): v for k, v in headers.items()}
            for h in ("keep-alive", "proxy-authenticate", "upgrade", "trailer", "x-capbalancer-internal"):
                assert h not in lower, (h, lower)
            assert lower["x-capbalancer-backend"] == "b0"  # the proxy's own, not the engine's spoof
            assert lower["x-capbalancer-held-ms"] != "-1"
            assert lower["x-engine-ok"] == "kept"


# --- limits on by default ------------------------------------------------------------------------------------

def test_limits_on_by_default():
    cfg = parse_config({"models": {"m": {"backends": [{"url": "http://127.0.0.1:1"}]}}})
    t = cfg.timeouts
    assert 0 < t.connect_s <= 30 and 0 < t.first_byte_s <= 600 and 0 < t.stream_idle_s <= 600
    assert 0 < t.total_s <= 3600
    assert 0 < cfg.server.max_body_bytes <= 64 * 1024 * 1024
    assert 0 < cfg.server.max_header_bytes <= 64 * 1024
    with FaultBackend("b0") as b:
        with Proxy([b]) as proxy:  # no limits in this config file: the defaults apply
            big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (11 * 1024 * 1024) + b'"}]}'
            status, _, body = proxy.request("POST", "/v1/chat/completions", big, timeout_s=30)
            assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
            status, _, _ = proxy.request("POST", "/v1/chat/completions", CHAT, {"X-Big": "y" * (20 * 1024)})
            assert status in (400, 431)
            status, _, _ = proxy.request("POST", "/v1/chat/completions", CHAT,
                                         {f"X-Many-{i}": "z" * 100 for i in range(200)})
            assert status in (200, 400, 431)  # many headers: answered either way, never a crash
            assert b.stats()["counts"].get("api", 0) <= 1  # neither oversized request reached the engine
            assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200
            assert proxy.alive()


# --- secrets never logged ---------------------------------------------------------------------------------------

def test_secrets_never_appear_in_logs():
    secrets = {"backend_env": "sk-backend-env-5e1d7a", "backend_inline": "sk-backend-inline-77c2b9",
               "admin": "adm-token-c0ffee42", "client": "sk-client-key-a1b2c3"}
    with fault_backends(2) as (b0, b1):
        cfg = proxy_config([b0, b1], admin_token=True, overrides={"health": {"interval_s": 0.3}})
        cfg["models"]["m"]["backends"][0]["api_key_env"] = "TEST_BACKEND_KEY"
        cfg["models"]["m"]["backends"][1]["api_key"] = secrets["backend_inline"]
        cfg["models"]["m"]["backends"][1]["api_key_mode"] = "replace"
        with Proxy(config=cfg, admin_token=secrets["admin"], env={"TEST_BACKEND_KEY": secrets["backend_env"]},
                   extra_args=("--log-level", "debug")) as proxy:
            auth = {"Authorization": f"Bearer {secrets['client']}"}
            for _ in range(4):
                proxy.request("POST", "/v1/chat/completions", {**CHAT, "stream": True}, auth)
            seen = {r["headers"].get("Authorization") for b in (b0, b1) for r in b.stats()["recent"]}
            assert f"Bearer {secrets['backend_env']}" in seen and f"Bearer {secrets['backend_inline']}" in seen
            # Failures and refusals log the most: errors, a dead backend, bad admin calls, reloads.
            b0.set(api="status", status=401)
            proxy.request("POST", "/v1/chat/completions", CHAT, auth)
            b1.set(api="die", after_chunks=1)
            proxy.request("POST", "/v1/chat/completions", {**CHAT, "stream": True}, auth)
            proxy.admin("GET", "backends", token=secrets["admin"][:-1] + "x")
            proxy.admin("POST", "reload")
            proxy.write_config(f"models: {{m: {{backends: [{{url: 'nope', api_key: '{secrets['backend_inline']}'}}]}}}}")
            proxy.admin("POST", "reload")
            proxy.request("POST", "/v1/chat/completions", b"{not json " + secrets["client"].encode(), auth)
            proxy.request("GET", "/admin/backends", headers={"Authorization": f"Bearer {secrets['admin']}x"})
            log = proxy.log()
    assert "reload refused" in log and "connection lost" in log  # the log did record these events
    for what, secret in secrets.items():
        assert secret not in log, f"{what} secret found in the proxy log"

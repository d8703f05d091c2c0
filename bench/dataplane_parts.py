"""Where one proxy process's CPU per request goes: the proxy cut down stage by stage, side by side (issue 17).

    .venv/bin/python bench/dataplane_parts.py [--seconds 16] [--rounds 4] [--no-vllm-router]

Copies this tree's capbalancer package (compiled scheduling core included, if built) three times into a
scratch folder and cuts each copy short at one stage of a request's path, then runs them with the whole proxy,
bench/floor_relay.py (a Python relay that only relays) and vllm-router through bench/dataplane.py, interleaved:

- `answer from the parser`: the fast server parses the request (httptools) and writes a fixed answer from its
  parser callback: no task, no handler. What accepting and parsing cost.
- `+ task and web.Response`: one task per request and an aiohttp web.Response written by the fast server's
  `_send_plain`, as every non-streamed answer is; no proxy code.
- `proxy, no upstream`: the whole proxy path (observe, body parsing, prefix keys, the scheduler's submit and
  finish, metrics, the access line) with the upstream exchange replaced by the same fixed answer.
- `capbalancer`: the whole proxy.

The copies are patched by exact text replacement; a patch whose text is gone from the source fails the run
(so the cuts cannot silently drift from the code). Results: bench/results/dataplane.md ("Sixth pass").
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# What the instant backend answers (bench/proxy_overhead.py), to the byte that matters: a small chat completion.
ANSWER = (b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
          b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,'
          b'"completion_tokens":16,"total_tokens":26}}')

FAST = "capbalancer/server/fastserver.py"
PROXY = "capbalancer/server/proxy.py"

# name -> [(file, text, replacement)]
CUTS: dict[str, list[tuple[str, str, str]]] = {
    "answer from the parser": [
        (FAST, """        self.state = _BODY
        self.task = self.loop.create_task(self._respond(request))""", """        self.state = _BODY"""),
        (FAST, """        self.body.feed_eof()
        self.state = _DONE
""", f"""        self.body.feed_eof()
        self.state = _DONE
        answer = {ANSWER!r}
        self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                             + str(len(answer)).encode() + b"\\r\\n\\r\\n" + answer)
        self.loop.call_soon(self._answered, True)
"""),
    ],
    "+ task and web.Response": [
        (FAST, """            observer = self.server.observer
            try:
""", f"""            observer = self.server.observer
            try:
                if True:
                    response = web.Response(status=200, body={ANSWER!r}, content_type="application/json")
                    observer = None
                    raise _Canned
"""),
        (FAST, """            except web.HTTPException as exc:
                response = exc
""", """            except _Canned:
                pass
            except web.HTTPException as exc:
                response = exc
"""),
        (FAST, """class _Stop(Exception):""", """class _Canned(Exception):
    pass


class _Stop(Exception):"""),
    ],
    "proxy, no upstream": [
        (PROXY, """                    raw_path = request.raw_path
                    try:
                        upstream_resp = await up.pool.request(""", f"""                    if True:
                        body = {ANSWER!r}
                        metrics.observe_ttfb(up.name, time.monotonic() - self.started)
                        usage = Usage()
                        usage_from_body(body, usage)
                        ok, fault = True, False
                        metrics.count(self.pool.name, up.name, 200)
                        headers = {{"Content-Type": "application/json", **self._headers(up.name)}}
                        return self._close_if_congested(web.Response(status=200, body=body, headers=headers))
                    raw_path = request.raw_path
                    try:
                        upstream_resp = await up.pool.request("""),
    ],
}


def cut_copy(name: str, dest: Path) -> Path:
    """This tree's package, copied to `dest` and cut as CUTS[name] says."""
    shutil.copytree(REPO / "capbalancer", dest / "capbalancer", ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text, replacement in CUTS[name]:
        path = dest / rel
        source = path.read_text()
        if source.count(text) != 1:
            raise SystemExit(f"{name}: the text to cut is not in {rel} exactly once; update CUTS to the code")
        path.write_text(source.replace(text, replacement))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=16.0, help="per target, over all rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-vllm-router", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capb-parts-"))
    try:
        cmd = [sys.executable, str(BENCH / "dataplane.py"), "--seconds", str(args.seconds), "--rounds",
               str(args.rounds), "--floor", "--no-direct", "--proxy", "capbalancer=."]
        for i, name in enumerate(CUTS):
            cmd += ["--proxy", f"{name}={cut_copy(name, tmp / f'cut{i}')}"]
        if args.no_vllm_router:
            cmd.append("--no-vllm-router")
        return subprocess.run(cmd, cwd=str(REPO)).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

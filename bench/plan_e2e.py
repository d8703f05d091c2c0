"""End to end on simulated instances: plan -> deploy --target local --engine sim -> proxy -> loadtest.

    .venv/bin/python bench/plan_e2e.py [--cluster deploy/clusters/e2e-sim.yaml] [--strategies best,max-tp,tp1]
                                       [--time-scale 2] [--duration 120] [--mode proxy|direct] [--json OUT]

For each strategy (the searched plan and the naive ones) it plans the cluster, starts the plan's instances as
`capbalancer sim` processes (`deploy --target local --engine sim`, every instance running --time-scale times
slower than the GPU it models, so this host keeps up), puts `capbalancer serve` in front (the deploy's own
proxy config) and drives it with `capbalancer loadtest`: a closed loop of --concurrency-factor x the plan's
total predicted batch, the plan's workload (prompt/output tokens, ignore_eos).

Measured throughput is the steady state: the engines' own `vllm:generation_tokens_total`, summed over the
instances, between the end of the warm-up (--warmup seconds) and the end of sending, times the time scale
(tokens per second of the modelled GPUs). The loadtest's own figure, which includes ramp-up and drain, is
reported beside it. `--mode direct` skips the proxy and drives each instance with its own loadtest at its
predicted batch (the ideal static split), to separate planner error from balancing loss.

Exit status 1 if the searched plan's measured throughput is off its prediction by more than 15% or does not
beat every naive plan.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from capbalancer.loadtest.procs import stop_process_group

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def cb(*args: str) -> list[str]:
    return [PY, "-m", "capbalancer.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health not ready after {timeout_s}s")


def generation_tokens(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int | None:
    return stop_process_group(proc, timeout_s)


def popen(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def loadtest_throughput(path: Path) -> float | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    found = _find_key(data, ("output_throughput", "output_tokens_per_second", "output_throughput_tok_s"))
    return float(found) if found is not None else None


def _find_key(obj, keys):
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), (int, float)):
                return obj[k]
        for v in obj.values():
            got = _find_key(v, keys)
            if got is not None:
                return got
    return None


def run_strategy(args: argparse.Namespace, strategy: str, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.yaml"
    subprocess.run(cb("plan", "--cluster", args.cluster, "--strategy", strategy, "--out", str(plan_path)),
                   check=True, cwd=REPO, capture_output=True)
    plan = yaml.safe_load(plan_path.read_text())
    wl = plan["workload"]
    instances = [i for m in plan["machines"] for i in m["instances"]]
    total_batch = sum(i["predicted"]["batch"] for i in instances)
    shapes = ", ".join(f"{m['name']}: {m['shape']}" for m in plan["machines"])
    deploy_dir = work / "deploy"
    shutil.rmtree(deploy_dir, ignore_errors=True)  # a previous run's local-instances.yaml would look ready
    deploy = popen(cb("deploy", "--plan", str(plan_path), "--target", "local", "--engine", "sim", "--out",
                      str(deploy_dir), "--time-scale", f"{args.time_scale:g}", "--ready-timeout", "120"),
                   work / "deploy.log")
    listing = deploy_dir / "local-instances.yaml"
    procs: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 150
        while not listing.exists():
            if deploy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"deploy failed: {(work / 'deploy.log').read_text()[-2000:]}")
            time.sleep(0.2)
        urls = {r["name"]: r["url"] for r in yaml.safe_load(listing.read_text())["instances"]}
        common = ["--prompt-len", str(wl["prompt_tokens"]), "--output-len", str(wl["output_tokens"]),
                  "--ignore-eos", "--duration", f"{args.duration:g}", "--request-timeout", "120", "--quiet"]
        if args.mode == "proxy":
            port = free_port()
            proxy = popen(cb("serve", "--config", str(deploy_dir / "capbalancer.yaml"), "--port", str(port)),
                          work / "proxy.log")
            procs.append(proxy)
            wait_health(f"http://127.0.0.1:{port}", 60, proxy)
            concurrency = max(1, math.ceil(total_batch * args.concurrency_factor))
            procs.append(popen(cb("loadtest", f"http://127.0.0.1:{port}", "--max-concurrency", str(concurrency),
                                  "--json", str(work / "loadtest.json"), *common), work / "loadtest.log"))
        else:
            concurrency = 0
            for inst in instances:
                c = max(1, math.ceil(inst["predicted"]["batch"] * args.concurrency_factor))
                concurrency += c
                procs.append(popen(cb("loadtest", urls[inst["name"]], "--max-concurrency", str(c), "--json",
                                      str(work / f"loadtest-{inst['name']}.json"), *common),
                                   work / f"loadtest-{inst['name']}.log"))
        started = time.monotonic()
        time.sleep(args.warmup)
        t0, tokens0 = time.monotonic(), sum(generation_tokens(u) for u in urls.values())
        time.sleep(max(1.0, args.duration - (time.monotonic() - started)))
        t1, tokens1 = time.monotonic(), sum(generation_tokens(u) for u in urls.values())
        measured = (tokens1 - tokens0) / (t1 - t0) * args.time_scale
        for p in procs[1:] if args.mode == "proxy" else procs:
            try:
                p.wait(timeout=args.duration + 150)
            except subprocess.TimeoutExpired:
                stop(p)
        lt = None
        if args.mode == "proxy":
            lt = loadtest_throughput(work / "loadtest.json")
        else:
            parts = [loadtest_throughput(work / f"loadtest-{i['name']}.json") for i in instances]
            lt = sum(p for p in parts if p is not None) if all(p is not None for p in parts) else None
    finally:
        for p in procs:
            stop(p)
        deploy_rc = stop(deploy)
    predicted = float(plan["predicted_output_tokens_per_second"])
    return {"strategy": strategy, "shapes": shapes, "instances": len(instances), "total_batch": total_batch,
            "concurrency": concurrency, "predicted": predicted, "measured": measured,
            "error": (measured - predicted) / predicted if predicted else None,
            "loadtest_output_tok_s_scaled": lt * args.time_scale if lt is not None else None,
            "deploy_exit": deploy_rc}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default=str(REPO / "deploy/clusters/e2e-sim.yaml"))
    parser.add_argument("--strategies", default="best,max-tp,tp1")
    parser.add_argument("--time-scale", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=45.0)
    parser.add_argument("--concurrency-factor", type=float, default=1.25)
    parser.add_argument("--mode", choices=["proxy", "direct"], default="proxy")
    parser.add_argument("--work", default=str(REPO / "out" / "plan_e2e"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")
    rows = []
    for strategy in args.strategies.split(","):
        row = run_strategy(args, strategy, Path(args.work) / f"{args.mode}-{strategy}")
        rows.append(row)
        print(f"{strategy:7s} {row['shapes']}: predicted {row['predicted']:8.1f} tok/s, measured {row['measured']:8.1f} "
              f"({row['error']:+.1%}), loadtest {row['loadtest_output_tok_s_scaled'] or float('nan'):8.1f}, "
              f"concurrency {row['concurrency']}, deploy exit {row['deploy_exit']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n| strategy | deployment | predicted tok/s | measured tok/s (steady) | error | loadtest tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        lt = r["loadtest_output_tok_s_scaled"]
        print(f"| {r['strategy']} | {r['shapes']} | {r['predicted']:,.0f} | {r['measured']:,.0f} | {r['error']:+.1%} | "
              f"{'-' if lt is None else f'{lt:,.0f}'} |")
    best = next((r for r in rows if r["strategy"] == "best"), None)
    ok = True
    if best is not None:
        if abs(best["error"]) > 0.15:
            print(f"FAIL: measured {best['measured']:.0f} is {best['error']:+.1%} off the prediction (limit 15%)")
            ok = False
        for r in rows:
            if r is not best and r["measured"] >= best["measured"]:
                print(f"FAIL: naive {r['strategy']} measured {r['measured']:.0f} >= planned {best['measured']:.0f}")
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

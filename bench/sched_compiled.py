"""The scheduling core as plain Python against the mypyc-compiled build (tools/compile_sched.py), side by side.

    .venv/bin/python tools/compile_sched.py                     # the compiled build in this tree
    .venv/bin/python bench/sched_compiled.py [--before main] [--rounds 5] [--n 20000] [--parts decision,des]
        [--des-args "--instances 100 --requests 100000 --policy capacity"]

Targets, each in its own process, taking turns per round so background load hits them alike:
  before    git REF (`--before`, default main) unpacked from git into a temporary folder: plain Python;
  pure      this tree's HEAD, unpacked the same way: plain Python (what the branch's code changes do alone);
  compiled  this working tree, as built (a check: its capbalancer.sched.scheduler must be an extension).
Parts:
  decision  Scheduler.submit + on_first_token + finish per request (16 in flight, one arrival per ms), as
            bench/replicas.py's decision_overhead_ms: on its six-instance fleet (H100, A100, L4 x2 for
            Llama-3.1-8B, with profiles) and on one backend without a profile (the live proxy's bench set-up).
            Each process repeats it 3 times and reports its fastest; the table gives the median over rounds.
            Every target's decisions are hashed: they must be the same (the compiled build decides alike).
  des       bench/des_scale.py (of the target's own tree) with --des-args: wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def child_decision(n: int) -> None:
    """Runs in the target's tree (PYTHONPATH): prints one JSON line."""
    import capbalancer.sched.scheduler as sched_mod
    from capbalancer.profiling.library import resolve_profile
    from capbalancer.sched.scheduler import Scheduler
    from capbalancer.sched.types import BackendSpec, Demand, PoolSettings

    six = [(f"{p}-{i}", ref) for p, ref in (("h100", "h100-80g/llama-3.1-8b-tp1"), ("a100", "a100-80g/llama-3.1-8b-tp1"),
                                             ("l4", "l4/llama-3.1-8b-tp1")) for i in range(2)]

    def make(fleet: list[tuple[str, str | None]]) -> Scheduler:
        s = Scheduler([PoolSettings(name="m")])
        for name, ref in fleet:
            s.add_backend(BackendSpec(name, "m", engine="vllm", profile=resolve_profile(ref) if ref else None), 0.0)
        return s

    def run(fleet: list[tuple[str, str | None]]) -> tuple[float, str]:
        sched = make(fleet)
        digest = hashlib.sha1()
        t0 = time.perf_counter()
        for i in range(n):
            now = i * 0.001
            d = sched.submit(Demand(f"q{i}", "m", 600, 512, now), now)
            digest.update(repr(d).encode())
            sched.on_first_token(f"q{i}", now + 0.0005)
            if i >= 16:
                sched.finish(f"q{i - 16}", now, output_tokens=200)
        return (time.perf_counter() - t0) / n * 1e6, digest.hexdigest()[:12]

    out: dict[str, object] = {"compiled": sched_mod.__file__.endswith((".so", ".pyd"))}
    for label, fleet in (("six", six), ("one", [("b0", None)])):
        runs = [run(fleet) for _ in range(3)]
        out[f"{label}_us"] = min(r[0] for r in runs)
        out[f"{label}_hash"] = runs[0][1]
    print(json.dumps(out))


def unpack(ref: str, tmp: str) -> Path:
    dest = Path(tmp) / f"src-{ref.replace('/', '_')}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(tree: Path, argv: list[str]) -> tuple[str, float]:
    """Runs `argv` with `tree` first on the path; returns stdout and the child's CPU seconds."""
    before = os.times()
    p = subprocess.run([sys.executable, *argv], cwd=str(tree), env={**os.environ, "PYTHONPATH": str(tree)},
                       capture_output=True, text=True)
    after = os.times()
    if p.returncode != 0:
        raise RuntimeError(f"{argv} in {tree} failed:\n{p.stderr[-3000:]}")
    return p.stdout, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="main")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--parts", default="decision,des")
    ap.add_argument("--des-args", default="--instances 100 --requests 100000 --policy capacity")
    ap.add_argument("--des-rounds", type=int, default=2)
    ap.add_argument("--no-pure", action="store_true", help="leave out this tree's HEAD as plain Python")
    ap.add_argument("--child-decision", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_decision:
        child_decision(args.child_decision)
        return 0
    tmp = tempfile.mkdtemp(prefix="capb-compiled-")
    try:
        trees = {"before": unpack(args.before, tmp)}
        if not args.no_pure:
            trees["pure"] = unpack("HEAD", tmp)
        trees["compiled"] = REPO
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        before_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before],
                                    capture_output=True, text=True).stdout.strip()
        print(f"before = {args.before} ({before_rev}), pure = HEAD ({head}) unpacked, compiled = this tree; "
              f"python {sys.version.split()[0]}, cpus={os.cpu_count()}")
        parts = args.parts.split(",")
        if "decision" in parts:
            rows: dict[str, list[dict[str, object]]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    out, _ = run_child(tree, [str(BENCH / "sched_compiled.py"), "--child-decision", str(args.n)])
                    rows[name].append(json.loads(out))
            if not rows["compiled"][0]["compiled"]:
                print("WARNING: the 'compiled' target loaded plain Python (run tools/compile_sched.py first)")
            print(f"\ndecision: submit + on_first_token + finish, us per request (median over {args.rounds} rounds "
                  f"of the fastest of 3 x {args.n} requests)")
            print("| target | compiled | six instances (us) | / before | one backend (us) | / before | decisions |")
            print("|--------|----------|-------------------:|---------:|-----------------:|---------:|-----------|")
            base = {k: statistics.median(float(r[k]) for r in rows["before"]) for k in ("six_us", "one_us")}  # type: ignore[arg-type]
            for name, rs in rows.items():
                six = statistics.median(float(r["six_us"]) for r in rs)  # type: ignore[arg-type]
                one = statistics.median(float(r["one_us"]) for r in rs)  # type: ignore[arg-type]
                same = all(r["six_hash"] == rows["before"][0]["six_hash"] and r["one_hash"] == rows["before"][0]["one_hash"]
                           for r in rs)
                print(f"| {name} | {rs[0]['compiled']} | {six:.1f} | {base['six_us'] / six:.2f}x | {one:.1f} | "
                      f"{base['one_us'] / one:.2f}x | {'same as before' if same else 'DIFFERENT'} |")
        if "des" in parts:
            print(f"\ndes: bench/des_scale.py {args.des_args} ({args.des_rounds} interleaved rounds)")
            results: dict[str, list[str]] = {name: [] for name in trees}
            cpu: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.des_rounds):
                for name, tree in trees.items():
                    out, c = run_child(tree, [str(tree / "bench" / "des_scale.py"), *shlex.split(args.des_args)])
                    results[name].append(out)
                    cpu[name].append(c)
            for name in trees:
                print(f"--- {name} (process CPU s per round: {', '.join(f'{c:.1f}' for c in cpu[name])})")
                for i, out in enumerate(results[name]):
                    lines = out.strip().splitlines()
                    print("\n".join(lines if i == 0 else lines[1:]))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Planner speed: 64 machines x 8 GPUs (a random mix of every GPU type and link) planned in under 1 s.

    .venv/bin/python bench/planner_speed.py [--machines 64] [--gpus 8] [--repeat 5] [--distinct]

--distinct gives every machine its own (GPU, count, link) where possible, defeating the cache that machines
of one kind share; the default draws from the real mix, as a real inventory looks. Exits 1 if the
slowest run takes 1 s or more.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capbalancer.planning.catalog import ProfileCatalog  # noqa: E402
from capbalancer.planning.cluster import Cluster, Machine, Workload  # noqa: E402
from capbalancer.planning.search import plan_cluster  # noqa: E402
from capbalancer.profiling.specs import load_specs  # noqa: E402

LINKS = ("nvlink4", "nvlink3", "nvlink2", "pcie4", "pcie3")


def make_cluster(machines: int, gpus: int, seed: int, distinct: bool) -> Cluster:
    rng = random.Random(seed)
    specs = load_specs()
    gpu_names = sorted(specs.gpus)
    rows = []
    for i in range(machines):
        if distinct:
            gpu = gpu_names[i % len(gpu_names)]
            link = LINKS[(i // len(gpu_names)) % len(LINKS)]
            count = gpus - (i // (len(gpu_names) * len(LINKS))) % 2
        else:
            gpu, link, count = rng.choice(gpu_names), rng.choice(LINKS), gpus
        rows.append(Machine(name=f"m{i:03d}", gpu=gpu, count=count, interconnect=link, address=f"10.1.{i // 250}.{i % 250}"))
    return Cluster(machines=tuple(rows), workload=Workload(512, 128))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--distinct", action="store_true")
    args = parser.parse_args()
    specs = load_specs()
    cluster = make_cluster(args.machines, args.gpus, 0, args.distinct)
    times = []
    for _ in range(args.repeat):
        catalog = ProfileCatalog(specs=specs, model=args.model)  # cold: no cached profiles between runs
        start = time.perf_counter()
        plan = plan_cluster(cluster, catalog)
        times.append(time.perf_counter() - start)
    options = sum(m.options_considered for m in plan.machines)
    print(f"{args.machines} machines x {args.gpus} GPUs ({len({(m.gpu, m.count, m.interconnect) for m in cluster.machines})} "
          f"distinct kinds), model {args.model}: {options} machine options scored, "
          f"predicted {plan.value:,.0f} tok/s")
    print(f"plan time: min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {args.repeat} cold runs "
          f"(target < 1000 ms)")
    return 0 if max(times) < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

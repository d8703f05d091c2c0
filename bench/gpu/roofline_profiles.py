"""Roofline estimates for the instances of a bench/gpu layout: the proxy's profiles until measured ones exist,
and the reference the measured profiles are compared with (bench/gpu/compare_profiles.py).

    python3 bench/gpu/roofline_profiles.py --layout x2 --gpu h200 --out DIR      -> DIR/A.yaml, B.yaml, C.yaml

Each instance gets its own gpu_memory_utilization (so its KV capacity); instances that share a GPU get its
step times multiplied by the number sharing it (each has about that share of the GPU's compute when all are busy).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver import LAYOUTS  # noqa: E402

from capbalancer.profiling.roofline import default_limits, estimate_profile  # noqa: E402
from capbalancer.profiling.schema import save_profile  # noqa: E402
from capbalancer.profiling.specs import load_specs  # noqa: E402

MODEL_SPEC = "llama-3.1-8b-vocab4096"


def roofline_for_layout(layout: str, gpu_name: str, share_compute: bool = True) -> dict:
    specs = load_specs()
    gpu, model = specs.gpu(gpu_name), specs.model(MODEL_SPEC)
    rows = LAYOUTS[layout]
    sharing = {g: sum(1 for r in rows if r[1] == g) for (_, g, _, _) in rows}
    out = {}
    for name, g, _port, util in rows:
        p = estimate_profile(gpu, model, 1, None, default_limits(gpu, model, util), name=f"roofline-{gpu_name}-{name}")
        k = sharing[g] if share_compute else 1
        if k > 1:
            p = dataclasses.replace(p, step=p.step.scaled(float(k)),
                                    notes=p.notes + f"; step times x{k}: shares GPU {g} with {k - 1} other instance(s)")
        out[name] = p
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="x2", choices=sorted(LAYOUTS))
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-share", action="store_true", help="do not scale step times of GPU-sharing instances")
    a = ap.parse_args()
    for name, p in roofline_for_layout(a.layout, a.gpu, not a.no_share).items():
        path = Path(a.out) / f"{name}.yaml"
        save_profile(p, path)
        print(path, p.kv_capacity_tokens, p.step)


if __name__ == "__main__":
    main()

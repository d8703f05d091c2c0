"""Measured profiles (capbalancer profile on the GPU) against the roofline estimates for the same instances.

    .venv/bin/python bench/gpu/compare_profiles.py --layout x2 --gpu h200 profiles/measured/h200-x2/{A,B,C}.yaml

For each instance: KV capacity, the four step-time coefficients, and what they predict (decode step time at
batch 1, 32 and 128 with 900-token contexts, a 2048-token prefill chunk), with the estimate's error relative
to the measurement. The roofline of an instance sharing a GPU is shown both for a whole GPU and with step
times multiplied by the number sharing it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline_profiles import roofline_for_layout  # noqa: E402

from capbalancer.profiling.schema import Profile, load_profile  # noqa: E402

CTX = 900


def predictions(p: Profile) -> dict[str, float]:
    s = p.step
    return {
        "KV tokens": float(p.kv_capacity_tokens),
        "decode step b=1 ms": 1e3 * s.decode_step_seconds(1, CTX),
        "decode step b=32 ms": 1e3 * s.decode_step_seconds(32, 32 * CTX),
        "decode step b=128 ms": 1e3 * s.decode_step_seconds(128, 128 * CTX),
        "prefill 2048 tok ms": 1e3 * s.step_seconds(2048, 0, 0),
    }


def err(est: float, meas: float) -> str:
    return "–" if not meas else f"{(est - meas) / meas * 100:+.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="x2")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("profiles", nargs="+", help="measured profile files named <instance>.yaml or m8b-<instance>.yaml")
    a = ap.parse_args()
    shared = roofline_for_layout(a.layout, a.gpu, True)
    whole = roofline_for_layout(a.layout, a.gpu, False)
    print("| instance | quantity | measured | roofline (its share) | error | roofline (whole GPU) | error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in a.profiles:
        name = Path(path).stem.removeprefix("m8b-")  # A.yaml or profiles/measured/.../m8b-A.yaml
        m = load_profile(path)
        pm, ps, pw = predictions(m), predictions(shared[name]), predictions(whole[name])
        for k in pm:
            d = 0 if k == "KV tokens" else 2
            print(f"| {name} | {k} | {pm[k]:,.{d}f} | {ps[k]:,.{d}f} | {err(ps[k], pm[k])} | {pw[k]:,.{d}f} | "
                  f"{err(pw[k], pm[k])} |")
        for f in ("fixed_seconds", "prefill_seconds_per_token", "decode_seconds_per_seq", "context_seconds_per_token"):
            mv, sv, wv = getattr(m.step, f), getattr(shared[name].step, f), getattr(whole[name].step, f)
            print(f"| {name} | step.{f} | {mv:.3g} | {sv:.3g} | {err(sv, mv)} | {wv:.3g} | {err(wv, mv)} |")
        if m.fit is not None:
            print(f"| {name} | fit R² / max rel err / samples | {m.fit.r_squared:.3f} / {m.fit.max_relative_error:.2f} "
                  f"/ {m.fit.samples} | | | | |")


if __name__ == "__main__":
    main()

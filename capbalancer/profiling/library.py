"""Find a profile by name (`a100-80g/llama-2-13b-tp1`) or by path.

Search order for a name: the directory of the file that referenced it, $CAPBALANCER_PROFILES
(colon-separated), then the `profiles/` directory shipped beside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from capbalancer.profiling.schema import Profile, ProfileError, load_profile
from capbalancer.shipped import shipped_dir

SHIPPED_PROFILES_DIR = shipped_dir("profiles")


def profile_search_path(base_dir: Path | None = None) -> list[Path]:
    dirs: list[Path] = []
    if base_dir is not None:
        dirs.append(base_dir)
    env = os.environ.get("CAPBALANCER_PROFILES")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(SHIPPED_PROFILES_DIR)
    return dirs


def resolve_profile_path(ref: str, base_dir: Path | None = None) -> Path:
    candidates: list[Path] = []
    direct = Path(ref)
    if direct.is_absolute():
        candidates.append(direct)
    else:
        for d in profile_search_path(base_dir):
            candidates.append(d / ref)
            if direct.suffix not in (".yaml", ".yml", ".json"):
                candidates.append(d / f"{ref}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in profile_search_path(base_dir))
    raise ProfileError(f"profile {ref!r} not found (searched {searched})")


def resolve_profile(ref: str, base_dir: Path | None = None) -> Profile:
    return load_profile(resolve_profile_path(ref, base_dir))

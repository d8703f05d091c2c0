"""Where the planner gets an instance's profile: a measured one under profiles/ when it exists, else roofline.

A profile at profiles/<gpu>/<model>-tp<N>.yaml marked `measured` always wins. Otherwise the roofline
estimate is computed for the machine's actual interconnect; when that is the GPU's default link the
estimate equals the shipped file and is referred to by its shipped name, otherwise it gets a
`-<interconnect>` suffix and deploy writes it out beside the fleet description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from capbalancer.profiling.library import SHIPPED_PROFILES_DIR, profile_search_path
from capbalancer.profiling.roofline import DoesNotFit, default_limits, estimate_profile, profile_name
from capbalancer.profiling.schema import Profile, ProfileError, load_profile
from capbalancer.profiling.specs import SpecBook


@dataclass(frozen=True, slots=True)
class ProfileChoice:
    profile: Profile
    ref: str  # the name the fleet description and config use
    shipped: bool  # resolvable by name from profiles/ (otherwise deploy writes it out)


@dataclass
class ProfileCatalog:
    specs: SpecBook
    model: str
    gpu_memory_utilization: float = 0.9
    profile_dirs: list[Path] | None = None
    _cache: dict[tuple[str, int, str], ProfileChoice | str] = field(default_factory=dict)

    def get(self, gpu: str, tp: int, interconnect: str) -> ProfileChoice | str:
        """The profile, or the reason it cannot run (as a string)."""
        key = (gpu, tp, interconnect if tp > 1 else "-")
        if key not in self._cache:
            self._cache[key] = self._lookup(gpu, tp, interconnect)
        return self._cache[key]

    def _lookup(self, gpu: str, tp: int, interconnect: str) -> ProfileChoice | str:
        name = profile_name(gpu, self.model, tp)
        for directory in self.profile_dirs if self.profile_dirs is not None else profile_search_path():
            path = directory / f"{name}.yaml"
            if not path.is_file():
                continue
            try:
                measured = load_profile(path)
            except ProfileError:
                continue
            if measured.source == "measured":
                return ProfileChoice(measured, str(path) if directory != SHIPPED_PROFILES_DIR else name,
                                     shipped=directory == SHIPPED_PROFILES_DIR)
        g = self.specs.gpu(gpu)
        m = self.specs.model(self.model)
        default_link = tp == 1 or interconnect == g.interconnect
        ref = name if default_link else f"{name}-{interconnect}"
        link = self.specs.interconnect(interconnect) if tp > 1 else None
        try:
            profile = estimate_profile(g, m, tp, link, default_limits(g, m, self.gpu_memory_utilization), name=ref)
        except DoesNotFit as exc:
            return str(exc)
        shipped = default_link and self.gpu_memory_utilization == 0.9 \
            and (SHIPPED_PROFILES_DIR / f"{name}.yaml").is_file()
        return ProfileChoice(profile, ref, shipped)

"""What each backend serves, from its `/v1/models`: the base model's name and its LoRA adapters.

vLLM (and SGLang) list an adapter as a model card whose `parent` is the base model; the base model's card
has `parent: null`. The index answers two questions the proxy asks per request: which name does backend X
serve the pool's model under (aliases are rewritten to it: vLLM answers 404 to any other), and which backends
hold adapter Y (a request for it may go only there). Pure data, no I/O: fed by the discovery poll and by the
load/unload routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class BackendModels:
    base: str | None  # the base model's served name (None: the backend did not say)
    adapters: frozenset[str] = frozenset()


def parse_model_list(body: Any) -> BackendModels | None:
    """A `/v1/models` answer as BackendModels; None when it is not an OpenAI model list."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    base: str | None = None
    adapters: set[str] = set()
    for card in data:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        parent = card.get("parent")
        if isinstance(parent, str) and parent and parent != card["id"]:
            adapters.add(card["id"])
        elif base is None:
            base = card["id"]
    return BackendModels(base=base, adapters=frozenset(adapters))


@dataclass(slots=True)
class AdapterIndex:
    """backend name -> what it serves, as last seen."""

    backends: dict[str, BackendModels] = field(default_factory=dict)

    def update(self, backend: str, models: BackendModels) -> None:
        self.backends[backend] = models

    def forget(self, backend: str) -> None:
        self.backends.pop(backend, None)

    def served_name(self, backend: str) -> str | None:
        seen = self.backends.get(backend)
        return seen.base if seen is not None else None

    def backends_with(self, adapter: str) -> list[str]:
        return [b for b, seen in self.backends.items() if adapter in seen.adapters]

    def adapters(self) -> dict[str, list[str]]:
        """adapter name -> the backends that hold it."""
        out: dict[str, list[str]] = {}
        for b, seen in self.backends.items():
            for name in seen.adapters:
                out.setdefault(name, []).append(b)
        return out

    def loaded(self, backend: str, adapter: str) -> None:
        seen = self.backends.get(backend, BackendModels(base=None))
        self.backends[backend] = BackendModels(seen.base, seen.adapters | {adapter})

    def unloaded(self, backend: str, adapter: str) -> None:
        seen = self.backends.get(backend)
        if seen is not None:
            self.backends[backend] = BackendModels(seen.base, seen.adapters - {adapter})

"""The model's chat template, so a chat request's prompt is tokenized as the engine tokenizes it.

An engine never sees a chat request's messages as such: vLLM renders them through the model's chat template
(transformers' `apply_chat_template`: Jinja, the tokenizer's special tokens) and tokenizes the result without
adding special tokens again. The proxy's exact prompt counts and its prefix keys over token ids (precise mode
matches them against the engine's own KV events) are right only if it does the same: the message contents
joined, as the proxy counted them before, differ from the engine's prompt in the first block already (the
template's BOS and role markers), so no KV event of a chat prompt could ever be matched.

The template is found beside the pool's `tokenizer.json`, where Hugging Face model folders keep it:
`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates:
"default"). It is rendered as transformers renders it: a sandboxed Jinja environment with `trim_blocks` and
`lstrip_blocks`, loop controls, `raise_exception` and `strftime_now`, the special tokens by name, and
`add_generation_prompt` (vLLM's default: true). A template that fails to load or render gives None, and the
caller falls back to the joined contents: never an error for the client, whose engine renders it anyway.

Needs jinja2 (extra `tokenizer`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("capbalancer.chat_template")

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _raise(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_source(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    source = config.get("chat_template")
    if isinstance(source, str):
        return source
    if isinstance(source, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    template: Any  # jinja2.Template
    special_tokens: dict[str, str]

    @classmethod
    def beside(cls, tokenizer_file: str | Path) -> ChatTemplate | None:
        """The template in the tokenizer's folder, or None (none there, or it does not compile)."""
        folder = Path(tokenizer_file).parent
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        try:
            if config_file.is_file():
                loaded = json.loads(config_file.read_text())
                config = loaded if isinstance(loaded, dict) else {}
            source = _template_source(folder, config)
            if source is None:
                return None
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            template = env.from_string(source)
        except Exception as exc:  # noqa: BLE001  (a bad template: count and key by the joined text instead)
            log.warning("chat template beside %s not usable (%s): chat prompts are counted by their text",
                        tokenizer_file, exc)
            return None
        tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(template, tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str | None:
        """The prompt text the engine builds from these messages, or None if the template refuses them."""
        try:
            text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special_tokens)
        except Exception:  # noqa: BLE001  (raise_exception, a missing field: the engine will say so)
            return None
        if continue_final_message and messages:
            # As transformers does: the prompt ends where the final message's content ends (no end-of-turn).
            last = messages[-1].get("content")
            if isinstance(last, str) and last and last in text:
                text = text[:text.rindex(last) + len(last)]
        return text


def plain_messages(messages: Any) -> list[dict[str, Any]] | None:
    """The messages as a text model's template sees them (vLLM's "string" content format): a list of content
    parts becomes its text parts joined by newlines. None if the shape is not a list of objects."""
    if not isinstance(messages, list):
        return None
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": "\n".join(p["text"] for p in content
                                          if isinstance(p, dict) and isinstance(p.get("text"), str))}
        out.append(m)
    return out

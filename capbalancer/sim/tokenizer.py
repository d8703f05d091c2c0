"""The simulator's tokenizer: deterministic, reversible, 4 bytes of UTF-8 per token.

A real engine caches prefixes by token ids, so the simulator needs ids for text prompts: the same text always
gives the same ids, and a text that extends another byte for byte shares every full token of it (a 4-byte chunk
depends on nothing before it), which is what makes multi-turn prompts hit the cache as they do on a real engine
with a BPE tokenizer. Four bytes per token is the ratio the proxy's estimate and `capbalancer loadtest`'s
synthetic prompts assume ("abc " is one token).

An id packs the chunk's bytes and its length (the last chunk may be shorter), so `decode(encode(t)) == t`.
The chat template renders each message as `<|role|>\\n{content}\\n` and ends with the generation prompt
`<|assistant|>\\n`, so a conversation's next turn extends its previous prompt byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

BYTES_PER_TOKEN = 4
_LOW32 = (1 << 32) - 1
# What the simulated engines generate: one four-byte word per token, so an answer re-sent in a later prompt at a
# four-byte boundary tokenizes to the very ids the engine cached for it.
WORDS = (" the", " and", " for", " are", " but", " not", " you", " all", " any", " can", " had", " her",
         " was", " one", " our", " out", " day", " get", " has", " him", " his", " how", " man", " new")


def encode(text: str) -> list[int]:
    data = text.encode("utf-8", "surrogatepass")
    step = BYTES_PER_TOKEN
    return [int.from_bytes(data[i:i + step], "little") | (min(step, len(data) - i) << 32)
            for i in range(0, len(data), step)]


def decode(ids: Iterable[int]) -> str:
    out = bytearray()
    for t in ids:
        n = (t >> 32) & 0xFF
        if not 0 < n <= BYTES_PER_TOKEN:
            raise ValueError(f"token id {t} is not one of the simulator's")
        out += (t & _LOW32).to_bytes(n, "little")
    return out.decode("utf-8", "replace")


def count_tokens(text: str) -> int:
    """len(encode(text)), without building the list; at least 1 (an empty prompt still costs a token)."""
    return max(1, -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN))


def message_text(content: Any) -> str:
    if isinstance(content, list):  # content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text

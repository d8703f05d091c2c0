"""Block hashes of a prompt's prefix: the key the prefix index, the DES and the proxy share.

A prompt is cut into blocks; each block's hash is chained over every block before it (as vLLM's automatic prefix
caching does), so two prompts share the first k hashes exactly when they share their first k blocks. The proxy
hashes what it has: token ids when a tokenizer is configured (or the DES, which knows them), otherwise the
prompt text in fixed-size character chunks, and counts a matched block as `block_tokens` tokens.

Hashes are 64-bit integers from blake2b: stable across processes and replicas (Python's own `hash` is salted per
process), cheap (about 1 µs a block), and the salt keeps pools, LoRA adapters and engines' key extras apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Characters per text block: ~4 characters per token, so a 64-character block is about a 16-token vLLM block.
DEFAULT_BLOCK_CHARS = 64
DEFAULT_BLOCK_TOKENS = 16
# Never hash more than this many blocks of one prompt: memory and time per request stay bounded.
MAX_BLOCKS = 8192


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """A prompt's chained block hashes and how many tokens one block stands for."""

    hashes: tuple[int, ...] = ()
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __len__(self) -> int:
        return len(self.hashes)


def _salt_bytes(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=8).digest()


def _chain(chunks: Sequence[bytes], salt: str) -> tuple[int, ...]:
    parent = _salt_bytes(salt)
    out: list[int] = []
    for chunk in chunks[:MAX_BLOCKS]:
        digest = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
        parent = digest
    return tuple(out)


def token_block_hashes(token_ids: Sequence[int], block_tokens: int = DEFAULT_BLOCK_TOKENS,
                       salt: str = "") -> PrefixKey:
    """Full blocks of `block_tokens` token ids (a partial last block is not cacheable, as in vLLM)."""
    n_full = min(len(token_ids) // block_tokens, MAX_BLOCKS)
    if n_full == 0:
        return PrefixKey((), block_tokens)
    ids = np.asarray(token_ids[: n_full * block_tokens], dtype=np.int64).reshape(n_full, block_tokens)
    return PrefixKey(_chain([row.tobytes() for row in ids], salt), block_tokens)


def text_block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS, chars_per_token: float = 4.0,
                      salt: str = "") -> PrefixKey:
    """Full blocks of `block_chars` characters; a block counts as block_chars / chars_per_token tokens."""
    data = text.encode("utf-8", "surrogatepass")
    n_full = min(len(data) // block_chars, MAX_BLOCKS)
    chunks = [data[i * block_chars:(i + 1) * block_chars] for i in range(n_full)]
    block_tokens = max(1, round(block_chars / max(chars_per_token, 0.5)))
    return PrefixKey(_chain(chunks, salt), block_tokens)

"""Cheap token estimates: prompt tokens from characters, output length from what completed before.

Both learn per model pool from what the engines report (`usage`), so they correct themselves without a
tokenizer. A user who needs exact prompt counts configures a local tokenizer (see server config).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PromptTokenEstimator:
    """Characters per token, calibrated from (characters sent, prompt_tokens reported) pairs."""

    chars_per_token: float = 4.0  # English text under BPE tokenizers; corrected by the first few usages
    alpha: float = 0.1
    min_chars_per_token: float = 0.5
    max_chars_per_token: float = 12.0
    samples: int = 0

    def estimate(self, chars: int) -> int:
        return max(1, int(chars / self.chars_per_token + 0.5))

    def observe(self, chars: int, prompt_tokens: int) -> None:
        if chars <= 0 or prompt_tokens <= 0:
            return
        ratio = min(self.max_chars_per_token, max(self.min_chars_per_token, chars / prompt_tokens))
        # Learn fast at first, then smoothly.
        weight = max(self.alpha, 1.0 / (self.samples + 1))
        self.chars_per_token += weight * (ratio - self.chars_per_token)
        self.samples += 1


@dataclass(slots=True)
class OutputLengthEstimator:
    """Expected output tokens of a request, learned from completions and bounded by its max_tokens."""

    mean_output_tokens: float | None = None
    alpha: float = 0.05
    samples: int = 0
    prior_fraction_of_max: float = 0.5  # before anything completes, expect half of max_tokens

    def expected(self, max_tokens: int) -> int:
        if self.mean_output_tokens is None:
            return max(1, int(max_tokens * self.prior_fraction_of_max))
        return max(1, min(max_tokens, int(self.mean_output_tokens + 0.5)))

    def observe(self, output_tokens: int) -> None:
        if output_tokens <= 0:
            return
        weight = max(self.alpha, 1.0 / (self.samples + 1))
        if self.mean_output_tokens is None:
            self.mean_output_tokens = float(output_tokens)
        else:
            self.mean_output_tokens += weight * (output_tokens - self.mean_output_tokens)
        self.samples += 1

"""Token sampling for the CPU engine: temperature, top-k / top-p filtering, log-probs, stop strings.

Log-probs follow SGLang's sampler: log_softmax(logits / temperature) of the chosen token over the
full vocabulary, before top-k / top-p filtering (greedy: log_softmax(logits)); the filters only
change which tokens can be drawn.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_rence.rollout.types import SamplingParams


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of [B, V] logits: dropped entries become -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (the token
    that crosses the threshold is kept), so at least one token always survives.
    """
    out = scaled
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] (long) and their log-probs [B] (fp32) from last-position logits [B, V]."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("rollout: the policy's logits hold NaN / inf: its weights have diverged (the "
                                 "engine serves the trainer's latest weights); lower optim.lr and --resume from "
                                 "the last checkpoint")
    if params.temperature == 0.0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = torch.argmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        if params.top_k == 1:
            tokens = torch.argmax(scaled, dim=-1)
        else:
            probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class StopStrings:
    """Finds stop strings in a growing completion by decoding only its tail.

    A token decodes to at least one byte and a character is at most 4 bytes, so a stop string of c
    characters spans at most 4c tokens: decoding the last 4 * max_len + 1 tokens is enough.
    """

    def __init__(self, stop: list[str], tokenizer):
        self.stop = list(stop)
        self.tokenizer = tokenizer
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.stop)

    def matched(self, token_ids: list[int]) -> bool:
        """Whether the completion's text now contains a stop string."""
        tail = self.tokenizer.decode(token_ids[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.stop)

    def trim(self, text: str) -> str:
        """`text` cut before the earliest stop string (unchanged when none occurs)."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]

"""Rollout/trainer log-prob mismatch on the same sampled tokens: mean and max |delta logp| and a KL estimate.

With q the engine's sampling policy (`rollout_logprobs`) and p the trainer's policy (`logprobs`) on
tokens drawn from q, per token d = log p - log q and

    mismatch/abs_mean = mean |d|          mismatch/abs_max = max |d|
    mismatch/kl       = mean (exp(d) - 1 - d)     (Schulman's k3: unbiased, >= 0, estimates KL(q || p))
    mismatch/kl_k1    = mean (-d)                 (the plain estimate; unbiased but can be negative)

Means are over all valid tokens of the batch (token-weighted).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Logprobs = Union[list[torch.Tensor], torch.Tensor]


def _flatten(values: Logprobs, mask: Optional[torch.Tensor], what: str) -> torch.Tensor:
    """Valid tokens as one float64 1-D tensor (lists: concatenated; padded [N, T]: where mask)."""
    if isinstance(values, torch.Tensor):
        if mask is None:
            return values.detach().to("cpu", torch.float64).reshape(-1)
        if mask.shape != values.shape:
            raise ValueError(f"mismatch: {what} has shape {tuple(values.shape)} but mask {tuple(mask.shape)}")
        return values.detach().to("cpu", torch.float64)[mask.to("cpu").bool()]
    if mask is not None:
        raise ValueError("mismatch: a mask goes with padded [N, T] tensors, not with lists of 1-D tensors")
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(-1) for v in values])


def mismatch_metrics(rollout_logprobs: Logprobs, logprobs: Logprobs,
                     mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """`rollout_logprobs` (engine) vs `logprobs` (trainer) on the same tokens.

    Either two lists of 1-D tensors (one per sequence, equal lengths pairwise) or two padded [N, T]
    tensors with a [N, T] `mask` (True = a response token). Returns the `mismatch/*` metrics above
    (all 0.0 when there is no token).
    """
    if isinstance(rollout_logprobs, list) != isinstance(logprobs, list):
        raise ValueError("mismatch: pass two lists of 1-D tensors or two padded tensors, not one of each")
    if isinstance(rollout_logprobs, list):
        if len(rollout_logprobs) != len(logprobs):
            raise ValueError(f"mismatch: {len(rollout_logprobs)} rollout sequences vs {len(logprobs)} trainer sequences")
        for i, (a, b) in enumerate(zip(rollout_logprobs, logprobs)):
            if a.numel() != b.numel():
                raise ValueError(f"mismatch: sequence {i} has {a.numel()} rollout log-probs but {b.numel()} trainer ones")
    rollout = _flatten(rollout_logprobs, mask, "rollout_logprobs")
    trainer = _flatten(logprobs, mask, "logprobs")
    if rollout.shape != trainer.shape:
        raise ValueError(f"mismatch: rollout_logprobs {tuple(rollout.shape)} vs logprobs {tuple(trainer.shape)}")
    if rollout.numel() == 0:
        return {"mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0, "mismatch/kl_k1": 0.0}
    delta = trainer - rollout
    return {
        "mismatch/abs_mean": delta.abs().mean().item(),
        "mismatch/abs_max": delta.abs().max().item(),
        "mismatch/kl": (torch.expm1(delta) - delta).mean().item(),
        "mismatch/kl_k1": (-delta).mean().item(),
    }

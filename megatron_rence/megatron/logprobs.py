"""Per-token and per-sequence log-probabilities from vocab-parallel logits, without gathering the vocabulary.

The log-softmax is computed in fp32 across the tensor-parallel group (max all-reduce, then one all-reduce
of [sum-exp, target logit]) over chunks of tokens, so at most one fp32 [chunk, vocab/TP] buffer exists at a
time. ``VocabParallelLogprobs`` is an autograd Function whose backward recomputes the local softmax from the
saved per-token log-sum-exp: d logprob / d logits = (onehot(target) - softmax) / temperature on each shard.
Temperature divides the logits first, matching the rollout engine's sampling distribution. Vocabulary rows
past the tokenizer's ``vocab_size`` (megatron's padding) are excluded from the softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024  # fp32 working buffer per chunk when chunk_size is None


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _chunk_rows(chunk_size: Optional[int], num_local_vocab: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * num_local_vocab))


def _shard_bounds(num_local_vocab: int, tp_group, vocab_size: Optional[int]) -> tuple[int, int]:
    """(first global vocab id on this shard, number of real (unpadded) columns on this shard)."""
    tp_rank = 0 if _group_size(tp_group) == 1 else dist.get_rank(tp_group)
    start = tp_rank * num_local_vocab
    total = num_local_vocab * _group_size(tp_group) if vocab_size is None else vocab_size
    return start, max(0, min(num_local_vocab, total - start))


def _scaled_chunk(logits: torch.Tensor, temperature: float, num_valid: int) -> torch.Tensor:
    """fp32 copy of a [n, V/TP] chunk divided by temperature, padded vocabulary columns at -inf."""
    x = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    if num_valid < x.shape[1]:
        x[:, num_valid:] = float("-inf")
    return x


class VocabParallelLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[target] for logits [N, V/TP] sharded over `tp_group`; returns [N] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, temperature, chunk_size, vocab_size):
        num_tokens, num_local = logits.shape
        vocab_start, num_valid = _shard_bounds(num_local, tp_group, vocab_size)
        rows = _chunk_rows(chunk_size, num_local)
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logprobs)
        for s in range(0, num_tokens, rows):
            e = min(s + rows, num_tokens)
            x = _scaled_chunk(logits[s:e], temperature, num_valid)
            local = targets[s:e] - vocab_start
            owned = (local >= 0) & (local < num_valid)
            max_logit = x.max(dim=1).values
            _all_reduce(max_logit, dist.ReduceOp.MAX, tp_group)
            reduced = torch.empty(2, e - s, dtype=torch.float32, device=logits.device)
            picked = x.gather(1, local.clamp(0, num_local - 1).unsqueeze(1)).squeeze(1)
            reduced[1] = torch.where(owned, picked, 0.0)  # only the owning shard contributes
            x.sub_(max_logit.unsqueeze(1)).exp_()
            reduced[0] = x.sum(dim=1)
            del x
            _all_reduce(reduced, dist.ReduceOp.SUM, tp_group)  # [sum exp, target logit]
            lse[s:e] = max_logit + reduced[0].log()
            logprobs[s:e] = reduced[1] - lse[s:e]
        ignored = targets < 0
        logprobs.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, targets, lse)
        ctx.tp_group, ctx.temperature, ctx.rows = tp_group, temperature, rows
        ctx.vocab_start, ctx.num_valid = vocab_start, num_valid
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        logits, targets, lse = ctx.saved_tensors
        num_tokens, num_local = logits.shape
        grad_logits = torch.empty_like(logits)
        grad = grad_logprobs.to(torch.float32).masked_fill(targets < 0, 0.0)
        for s in range(0, num_tokens, ctx.rows):
            e = min(s + ctx.rows, num_tokens)
            x = _scaled_chunk(logits[s:e], ctx.temperature, ctx.num_valid)
            g = grad[s:e]
            # -softmax * g, in place on the fp32 chunk buffer
            x.sub_(lse[s:e].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
            local = targets[s:e] - ctx.vocab_start
            owned = (local >= 0) & (local < ctx.num_valid)
            rows = torch.nonzero(owned).squeeze(1)
            x[rows, local[rows]] += g[rows]
            if ctx.temperature != 1.0:
                x.div_(ctx.temperature)
            grad_logits[s:e] = x
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, tp_group=None,
                            temperature: float = 1.0, chunk_size: Optional[int] = None,
                            vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token log-probs of `targets` under softmax(logits / temperature), differentiable w.r.t. logits.

    logits: [..., V/TP] (e.g. [B, S, V/TP] from GPTModel, [S, B, V/TP] or [T, V/TP]), this rank's vocabulary
    shard (shard r holds ids r*V/TP .. (r+1)*V/TP-1); any dtype, computed in fp32.
    targets: [...] global token ids; a negative id is ignored (log-prob 0, no gradient).
    vocab_size: the tokenizer's vocabulary; ids >= vocab_size (megatron's padding) leave the softmax.
    chunk_size: tokens per fp32 working buffer (None: as many as fit DEFAULT_CHUNK_BYTES).
    Returns fp32 log-probs with the shape of `targets`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    flat = logits.reshape(-1, logits.shape[-1])
    out = VocabParallelLogprobs.apply(flat, targets.reshape(-1), tp_group, float(temperature),
                                      chunk_size, vocab_size)
    return out.view(targets.shape)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, tp_group=None, temperature: float = 1.0,
                           chunk_size: Optional[int] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per token, [..., V/TP] -> [...] fp32, no gradient (a metric)."""
    flat = logits.reshape(-1, logits.shape[-1])
    num_tokens, num_local = flat.shape
    _, num_valid = _shard_bounds(num_local, tp_group, vocab_size)
    rows = _chunk_rows(chunk_size, num_local)
    entropy = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    for s in range(0, num_tokens, rows):
        e = min(s + rows, num_tokens)
        x = _scaled_chunk(flat[s:e], temperature, num_valid)
        max_logit = x.max(dim=1).values
        _all_reduce(max_logit, dist.ReduceOp.MAX, tp_group)
        x.sub_(max_logit.unsqueeze(1))
        p = x.exp()  # second buffer only inside this no-grad metric
        reduced = torch.stack([p.sum(dim=1), (p * x.nan_to_num(neginf=0.0)).sum(dim=1)])
        del p, x
        _all_reduce(reduced, dist.ReduceOp.SUM, tp_group)
        # H = log Z - E[x - max] with Z = sum exp(x - max)
        entropy[s:e] = reduced[0].log() - reduced[1] / reduced[0]
    return entropy.view(logits.shape[:-1])


class _AllReduceSumLocalGrad(torch.autograd.Function):
    """Sum over a group in forward; backward passes the gradient straight to the local partial sum."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False,
                      cp_group=None, seq_index: Optional[torch.Tensor] = None,
                      num_sequences: Optional[int] = None) -> torch.Tensor:
    """Per-sequence log-likelihood: the masked sum over response tokens (or its mean if length_normalize).

    Padded layout: token_logprobs, mask [B, S] -> [B]. Packed (THD) layout: token_logprobs, mask [T] (or
    [1, T]) with seq_index [T] (sequence of each token, -1 for padding) and num_sequences -> [N].
    Under context parallelism each rank holds part of every sequence: the partial sums are added over
    `cp_group`, and each rank backpropagates only through its own partial sum. That is megatron's CP
    convention: the schedule multiplies a (loss, metrics) loss by the CP size and DDP averages gradients
    over data x context parallel ranks, which together give exactly the gradient of the loss.
    """
    masked = token_logprobs * mask.to(token_logprobs.dtype)
    if seq_index is None:
        sums, counts = masked.sum(dim=-1), mask.sum(dim=-1).to(torch.float32)
    else:
        if num_sequences is None:
            raise ValueError("sequence_logprobs: packed layout needs num_sequences")
        index = seq_index.reshape(-1)
        keep = index >= 0
        sums = masked.new_zeros(num_sequences).index_add(0, index[keep], masked.reshape(-1)[keep])
        counts = torch.zeros(num_sequences, dtype=torch.float32, device=mask.device).index_add(
            0, index[keep], mask.reshape(-1)[keep].to(torch.float32))
    if _group_size(cp_group) > 1:
        sums = _AllReduceSumLocalGrad.apply(sums, cp_group)
        dist.all_reduce(counts, group=cp_group)
    if length_normalize:
        return sums / counts.clamp(min=1.0)
    return sums


def logprobs_from_logits(logits: torch.Tensor, batch, tp_group=None, temperature: float = 1.0,
                         vocab_size: Optional[int] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """The loss side of a forward step on the last pipeline stage: per-token log-probs, zero off the response.

    logits: the model's output [B, S, V/TP] (vocab-parallel); batch: a `packing.PaddedBatch` or
    `packing.PackedBatch` (this CP rank's part) with `targets` and `loss_mask` of shape [B, S].
    Returns [B, S] fp32, differentiable; sum along S (or `sequence_logprobs`) for per-sequence values.
    """
    token_logprobs = vocab_parallel_logprobs(logits, batch.targets, tp_group, temperature, chunk_size, vocab_size)
    return token_logprobs * batch.loss_mask.to(token_logprobs.dtype)

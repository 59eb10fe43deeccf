"""The phases of one training step (rollout, train, sync), each a function of explicit components.

train.py calls them in the order of docs/design.md's step diagram; this module holds the glue between
packages (who generates, who grades, how the batch reaches every rank) so that train.py stays short.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rence.config import Config, samples_per_prompt
from megatron_rence.data.prompts import Prompt
from megatron_rence.experience import Experience, keep_hard_negatives, rollout_metrics
from megatron_rence.rollout.engine import EngineRestartedError
from megatron_rence.rollout.mismatch import mismatch_metrics
from megatron_rence.rollout.types import SamplingParams


_RESTARTED = "engine restarted"  # what an engine rank contributes instead of rollouts after a restart


def sampling_params(cfg: Config, step: int) -> SamplingParams:
    """The recipe's sampling parameters with a per-step seed, so a resumed run samples the same rollouts."""
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop=list(r.stop),
                          seed=cfg.train.seed * 1_000_003 + step)


def engine_layout(cfg: Config, rank: int, world_size: int) -> tuple[Optional[int], int]:
    """(this rank's engine index or None, number of engines).

    The CPU engine lives on rank 0 alone. SGLang runs one engine per `rollout.sglang.tp` consecutive
    ranks (one inference TP group), owned by the group's first rank.
    """
    if cfg.rollout.engine == "hf":
        return (0 if rank == 0 else None), 1
    tp = cfg.rollout.sglang.tp
    if world_size % tp:
        raise ValueError(f"rollout.sglang.tp={tp} does not divide the world size {world_size}")
    return (rank // tp if rank % tp == 0 else None), world_size // tp


def engine_groups(cfg: Config, world_size: int) -> list[list[int]]:
    """The ranks serving each engine (first = owner); every one of them receives the full weights each sync
    (an SGLang group's ranks each hand their own GPU copy to the engine's TP worker on that GPU)."""
    if cfg.rollout.engine == "hf":
        return [[0]]
    tp = cfg.rollout.sglang.tp
    engine_layout(cfg, 0, world_size)  # the divisibility check
    return [list(range(first, first + tp)) for first in range(0, world_size, tp)]


def engine_process_group(cfg: Config, rank: int, world_size: int):
    """(whether `rank` serves an engine, the torch.distributed group of its engine or None for one rank).

    Collective: every rank creates every multi-rank group, in the same order.
    """
    serves, mine = False, None
    for ranks in engine_groups(cfg, world_size):
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            serves, mine = True, group
    return serves, mine


class HandoffBarrier:
    """Orders the colocated memory hand-off across the ranks of one engine group (docs/design.md, "Memory
    lifecycle"). The engine owner's memory calls act on every GPU of the group, the trainer's on each rank's
    own GPU; train.py calls this at each switch between the two (after the trainer offload, after the engine
    resumes its weights, before it resumes its KV cache, after it releases its memory), so that a phase has
    ended on every rank of the group before the next begins on any. `group`: the engine's process group, or
    None (one rank feeds the engine, or none: nothing to wait for). `wait_s` adds up the seconds waited."""

    def __init__(self, group=None):
        self.group = group
        self.wait_s = 0.0

    def __call__(self) -> None:
        if self.group is None:
            return
        t0 = time.perf_counter()
        dist.barrier(group=self.group)
        self.wait_s += time.perf_counter() - t0

    def metrics(self) -> dict:
        """`perf/handoff_wait_s` since the last call: time this rank waited for the rest of its group."""
        out, self.wait_s = {"perf/handoff_wait_s": self.wait_s}, 0.0
        return out


def wait_for_every_engine() -> None:
    """Setup: every engine of the job has started and released its memory before any rank builds its trainer
    (SGLang measures the free memory of every GPU of its group when it starts; a trainer allocating next to it
    makes it refuse to start or size its pool wrongly). One barrier over all ranks, once per run."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def engine_feed_ranks(cfg: Config, world_size: int) -> list[int]:
    """The ranks that receive the full weights every sync: every rank of every engine group."""
    return [r for group in engine_groups(cfg, world_size) for r in group]


def check_engine_sync(model_chunks, model_cfg, vocab_size: int, engine, pstate, dst_ranks: list[int],
                      fp8: bool = False) -> dict:
    """max |engine weight - trainer weight| over every HF tensor (debug; the CPU engine's weights are readable,
    so the config allows it with rollout.engine=hf only).

    With `fp8` the trainer's side goes through the same FP8 rounding as the stream, so 0 still means exact.
    """
    from megatron_rence.weights.quantize import dequantize_bucket, quantize_bucket
    from megatron_rence.weights.sync import iter_hf_buckets

    worst = 0.0
    for bucket in iter_hf_buckets(model_chunks, model_cfg, vocab_size, 1 << 62, pstate, dst_ranks):
        if engine is None:  # every rank walks the stream; only the engine's rank compares
            continue
        if fp8:
            bucket = dequantize_bucket(quantize_bucket(bucket), torch.float32)
        for name, tensor in bucket:
            worst = max(worst, (engine.named_weight(name) - tensor).abs().max().item())
    return {"sync/max_abs_diff": worst} if engine is not None else {}


def _gather_objects(local: list) -> list:
    """Concatenate each rank's list on every rank (rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


gather_objects = _gather_objects  # public: evaluation gathers its per-engine shares the same way


def rollout_phase(prompts: list[Prompt], engine, reward_pool, params: SamplingParams, num_samples: int,
                  engine_index: int, num_engines: int, positive_threshold: float) -> tuple[Optional[Experience], dict]:
    """Generate K completions per prompt on the engine owners, grade them there, and share with all ranks.

    Engines split the prompts contiguously (engine i gets slice i of num_engines); other ranks
    (`engine_index` < 0) contribute nothing and receive the whole graded batch. When an engine was
    restarted (it holds dummy weights) every rank gets (None, metrics): the caller re-syncs and retries.
    """
    t0 = time.perf_counter()
    local: list = []
    reward_s = 0.0
    if engine is not None and engine_index >= 0:
        share = [i for i in range(len(prompts)) if i * num_engines // len(prompts) == engine_index]
        try:
            completions = engine.generate([prompts[i].token_ids for i in share], params, num_samples)
        except EngineRestartedError as exc:
            print(f"engine {engine_index}: {exc}; re-syncing weights", flush=True)
            completions, local = [], [_RESTARTED]
        t1 = time.perf_counter()
        flat = [c for row in completions for c in row]
        answers = [prompts[i].answer for i, row in zip(share, completions) for _ in row]
        grades = reward_pool.grade([c.text for c in flat], answers) if flat else []
        reward_s = time.perf_counter() - t1
        for j, row in enumerate(completions):
            local.append((share[j], row, grades[j * num_samples:(j + 1) * num_samples]))
    gathered = _gather_objects(local)
    if _RESTARTED in gathered:
        return None, {"engine/restarts": float(gathered.count(_RESTARTED))}
    rows = sorted(gathered, key=lambda item: item[0])
    assert [i for i, _, _ in rows] == list(range(len(prompts))), "every prompt must be generated exactly once"
    exp = Experience(prompts, [c for _, c, _ in rows], [g for _, _, g in rows])
    metrics = rollout_metrics(exp, positive_threshold)
    metrics["perf/reward_s"] = reward_s
    metrics["perf/rollout_s"] = time.perf_counter() - t0 - reward_s
    return exp, metrics


@dataclass
class TrainInputs:
    """What the optimizer steps of one rollout consume; groups are whole and contiguous (K rows each)."""

    sequences: list[tuple[list[int], int]]
    rewards: torch.Tensor  # [N] shaped rewards of the kept groups
    old_logprobs: list[torch.Tensor]  # per response token: the trainer's before the update, or the engine's
    ref_logprobs: Optional[list[torch.Tensor]]
    group_size: int
    rollout_logprobs: Optional[list[torch.Tensor]] = None  # the engine's, for objective.tis_cap


def train_phase(exp: Experience, trainer, ref_trainer, objective, cfg: Config) -> dict:
    """prepare groups -> old (and ref) log-probs -> mismatch -> optimizer steps over global batches.

    With train.old_logprobs=engine the engine's log-probs of the sampled tokens are the old policy: no
    trainer forward pass for them, and no mismatch/* metrics (nothing to compare them with)."""
    t0 = time.perf_counter()
    metrics = {}
    if samples_per_prompt(cfg) > cfg.rollout.num_samples:  # K + extra samples per prompt -> K (hard negatives)
        exp, metrics = keep_hard_negatives(exp, cfg.rollout.num_samples, cfg.objective.positive_threshold)
    prepared = objective.prepare(exp.rewards, exp.lengths, cfg.rollout.max_new_tokens)
    metrics.update(prepared.metrics)
    kept = exp.select(prepared.keep)
    metrics["groups/kept_frac"] = len(kept.prompts) / max(len(exp.prompts), 1)
    if not kept.prompts:
        metrics["train/skipped"] = 1.0  # no group with both positives and negatives: nothing to learn from
        metrics["loss/total"] = 0.0
        metrics["perf/train_s"] = time.perf_counter() - t0
        return metrics
    sequences = kept.sequences()
    temperature = cfg.rollout.temperature
    engine_logprobs = kept.rollout_logprobs()
    if cfg.train.old_logprobs == "engine":
        old = engine_logprobs
    else:
        old = trainer.logprobs(sequences, temperature)
        metrics.update(mismatch_metrics(engine_logprobs, old))
    ref = ref_trainer.logprobs(sequences, temperature) if ref_trainer is not None else None
    rollout = engine_logprobs if objective.needs_rollout_logprobs else None
    inputs = TrainInputs(sequences, prepared.rewards[prepared.keep].reshape(-1), old, ref, kept.group_size, rollout)
    for key, value in _optimizer_steps(inputs, prepared, objective, trainer, cfg).items():
        metrics[key] = value
    metrics["train/skipped"] = 0.0
    metrics["perf/train_s"] = time.perf_counter() - t0
    return metrics


def _optimizer_steps(inputs: TrainInputs, prepared, objective, trainer, cfg: Config) -> dict:
    """One optimizer step per `train.global_batch_size` sequences of whole groups; metrics averaged."""
    k = inputs.group_size
    groups_per_batch = max(cfg.train.global_batch_size // k, 1)
    num_groups = len(inputs.sequences) // k
    sums: dict[str, float] = {}
    num_steps = 0
    for g0 in range(0, num_groups, groups_per_batch):
        rows = slice(g0 * k, min(num_groups, g0 + groups_per_batch) * k)
        normalizer = objective.normalizer_for(inputs.rewards[rows].reshape(-1, k),
                                              [len(t) for t in inputs.old_logprobs[rows]])
        step_metrics = trainer.train_step(
            inputs.sequences[rows], objective, rewards=inputs.rewards[rows],
            old_logprobs=inputs.old_logprobs[rows],
            ref_logprobs=inputs.ref_logprobs[rows] if inputs.ref_logprobs is not None else None,
            rollout_logprobs=inputs.rollout_logprobs[rows] if inputs.rollout_logprobs is not None else None,
            group_size=k, normalizer=normalizer)
        for key, value in step_metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        num_steps += 1
    out = {key: value / num_steps for key, value in sums.items()}
    out["train/optimizer_steps"] = float(num_steps)
    out["train/nonfinite_steps"] = sums.get("train/nonfinite_steps", 0.0)  # a count, not a mean
    return out

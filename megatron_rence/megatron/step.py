"""The trainer: microbatches of whole groups through megatron's pipeline schedule with an objective, then one optimizer step.

    trainer = Trainer(cfg, build_model(...), parallel_state, vocab_size)
    old = trainer.logprobs(sequences, temperature)                 # per response token, no grad, all ranks
    metrics = trainer.train_step(sequences, objective, rewards=..., old_logprobs=old, ref_logprobs=None,
                                 group_size=K, normalizer=objective.normalizer_for(...))

Every rank receives the whole batch of one optimizer step (whole groups, row-major: group g = rows g*K..g*K+K-1).
Data-parallel rank r trains on a contiguous share of the groups; each share is cut into microbatches of
``train.micro_batch_size`` sequences (a multiple of K). Gradient normalisation (docs/interfaces.md,
"objectives"): each microbatch's loss is (sum over its units) / global normalizer, so the trainer SUMS
gradients over microbatches and data-parallel ranks. ``optim.wrap_ddp`` sets ``calculate_per_token_loss``:
megatron's schedule then neither divides the loss by the number of microbatches nor DDP by the DP size, and
our ``finalize_model_grads_func`` drops the token-count division. The gradient equals the gradient of
``objective(whole batch, normalizer)`` however the batch is split.

``train.packing`` (default): each microbatch is one packed THD row [1, T] (``packing.pack_thd``, megatron's
PackedSeqParams; sequences padded to the TP/CP multiple, the row to the FP8 one) holding whole groups, either
``micro_batch_size / K`` groups or, with ``train.max_tokens_per_microbatch``, as many as fit the token budget
(``packing.plan_token_budget``: groups balanced over data-parallel ranks by tokens, first-fit-decreasing per
rank). Microbatches differ in length; with pp > 1 the stages exchange each one's shape
(``config.variable_seq_lengths``). The loss side gathers a packed row's log-probs into the padded [B, S] layout
(``packing.packed_to_rows``) that the objectives see, so both paths feed them identical tensors.

Padded path (``train.packing=false``): pipeline stages of one call exchange [S, B, H] activations, so every
microbatch of a call has the same padded length S (and, with pp > 1, the same number of rows: short
microbatches get filler rows without response tokens). Either way a data-parallel rank with fewer microbatches
than the others runs filler microbatches (zero loss) so that every rank takes part in the gradient all-reduce.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rence.config import Config, ConfigError
from megatron_rence.megatron import checkpoint, logprobs as lp, optim, packing
from megatron_rence.megatron.model import local_thd_offsets_on_host

Seq = tuple[list[int], int]  # (prompt + response token ids, prompt length)
FILLER: Seq = ([0], 1)  # a row without response tokens: pads microbatches, contributes nothing


def check_micro_batch_size(micro_batch_size: int, group_size: int) -> None:
    """ConfigError unless microbatches hold whole groups (every objective couples the K samples of a prompt)."""
    if micro_batch_size < group_size or micro_batch_size % group_size:
        raise ConfigError(f"train.micro_batch_size: {micro_batch_size} must be a multiple of the group size "
                          f"rollout.num_samples={group_size} (microbatches hold whole groups)")


def dp_share(num_items: int, dp_size: int, dp_rank: int) -> range:
    """Contiguous share of `num_items` for one data-parallel rank (sizes differ by at most one)."""
    return range(num_items * dp_rank // dp_size, num_items * (dp_rank + 1) // dp_size)


def plan_microbatches(num_items: int, items_per_mb: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """Item indices of each of this rank's microbatches; every DP rank gets the same number (empty = filler)."""
    shares = [dp_share(num_items, dp_size, r) for r in range(dp_size)]
    num_mb = max(1, max(math.ceil(len(s) / items_per_mb) for s in shares))
    mine = list(shares[dp_rank])
    return [mine[i * items_per_mb:(i + 1) * items_per_mb] for i in range(num_mb)]


def batch_width(cfg: Config, longest: int, row_counts: Sequence[int]) -> int:
    """The padded length S shared by the microbatches of one call (`row_counts`: their rows): `longest`
    rounded up so that the CP / SP splits are even and, with model.fp8, every rank's tokens of every
    microbatch are a multiple of the recipe's alignment (packing.pad_multiple)."""
    m, p = cfg.model, cfg.parallel
    if longest > m.max_position_embeddings:
        raise ValueError(f"a sequence of {longest} tokens exceeds model.max_position_embeddings="
                         f"{m.max_position_embeddings}")
    multiple = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel, packing.fp8_align_for(m.fp8),
                                    rows=math.gcd(*row_counts))
    return -(-longest // multiple) * multiple


@dataclass
class Microbatch:
    """Rows 0..num_real-1 are real sequences, the rest filler. batch: [B, S] padded, or a packed [1, T] THD batch
    with its `packed_seq_params`; rows: the padded [B, S] view the objective sees (the batch itself when padded;
    for a packed batch its real sequences padded to the longest); old/ref_logprobs: [B, S] aligned with the rows'
    targets (0 off the response); rewards: [num_real]; index: the rows' positions in the step's batch."""

    batch: "packing.PaddedBatch | packing.PackedBatch"
    num_real: int
    index: list[int]
    rows: Optional[packing.PaddedBatch] = None
    packed_seq_params: object = None
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None


def _pad_width(batch: packing.PaddedBatch, width: int, pad_id: int) -> packing.PaddedBatch:
    """Right-pad every [B, S] field to [B, width]."""
    extra = width - batch.tokens.shape[1]
    assert extra >= 0, "sequence longer than the step's padded length"
    if extra == 0:
        return batch
    pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    positions = torch.arange(width).unsqueeze(0).expand(batch.tokens.shape[0], -1).contiguous()
    return packing.PaddedBatch(pad(batch.tokens, pad_id), positions, pad(batch.targets, packing.IGNORE),
                               pad(batch.loss_mask, 0.0), batch.lengths, batch.prompt_lens)


def scatter_response(values: Sequence[torch.Tensor], prompt_lens: Sequence[int], width: int) -> torch.Tensor:
    """Per-sequence response-token values -> [B, width] at the positions whose target is that token (0 elsewhere)."""
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for b, (v, p) in enumerate(zip(values, prompt_lens)):
        out[b, p - 1:p - 1 + len(v)] = v.to(torch.float32)
    return out


class _GatherContextParallel(torch.autograd.Function):
    """[B, S/cp] (this CP rank's chunks) -> [B, S] on every CP rank; backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx, local, cp_group, cp_rank, cp_size):
        parts = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(parts, local.contiguous(), group=cp_group)
        width = local.shape[1] * cp_size
        full = local.new_zeros(local.shape[0], width)
        for r, part in enumerate(parts):
            full[:, packing.cp_chunk_indices(width, r, cp_size).to(local.device)] = part
        ctx.index = packing.cp_chunk_indices(width, cp_rank, cp_size).to(local.device)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[:, ctx.index], None, None, None


class _GatherPositions(torch.autograd.Function):
    """[1, t] values at this CP rank's positions of a packed row -> [1, cp*t] in row order on every CP rank
    (`positions[r]`: rank r's positions); backward keeps this rank's positions."""

    @staticmethod
    def forward(ctx, local, cp_group, positions, cp_rank):
        parts = [torch.empty_like(local) for _ in positions]
        dist.all_gather(parts, local.contiguous(), group=cp_group)
        full = local.new_zeros(local.shape[0], local.shape[1] * len(positions))
        for index, part in zip(positions, parts):
            full[:, index] = part
        ctx.index = positions[cp_rank]
        return full

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[:, ctx.index], None, None, None


class Trainer:
    """Model chunks + (unless `frozen`) DDP, megatron optimizer and LR schedule, driven by the pipeline schedule.

    cfg: the whole Config (reads model, parallel, optim, train, rollout); model_chunks: `build_model`'s bare
    GPTModel chunks (kept as `model_chunks`, shared with weight sync); state: `parallel.initialize`'s
    ParallelState; vocab_size: the tokenizer's (log-probs exclude megatron's padded rows).
    A frozen trainer (reference policy) only computes log-probs.
    """

    def __init__(self, cfg: Config, model_chunks: list, state, vocab_size: int, frozen: bool = False,
                 pad_id: int = 0):
        self.cfg, self.state, self.vocab_size, self.frozen, self.pad_id = cfg, state, vocab_size, frozen, pad_id
        self.model_chunks = model_chunks
        self.config = model_chunks[0].config
        self.thd_offsets_on_host = local_thd_offsets_on_host(not state.is_cpu, cfg.model)
        self.optimizer = self.scheduler = None
        if frozen:
            for chunk in model_chunks:
                chunk.requires_grad_(False)
            self.model = model_chunks
            return
        from megatron.core.distributed import finalize_model_grads

        self.model = optim.wrap_ddp(model_chunks, cfg.parallel, use_cuda=not state.is_cpu)

        def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
            # the loss is already normalised by the objective: no division by the schedule's token count
            finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

        self.config.finalize_model_grads_func = finalize
        self.optimizer = optim.build_optimizer(cfg.optim, cfg.model, cfg.parallel, self.model)
        optim.attach_loss_scale(self.config, self.optimizer)
        self.scheduler = optim.build_scheduler(cfg.optim, self.optimizer, self.decay_steps(cfg))

    @staticmethod
    def decay_steps(cfg: Config) -> int:
        """`optim.lr_decay_steps`, else the run's optimizer steps (train.num_steps x steps per rollout batch)."""
        if cfg.optim.lr_decay_steps is not None:
            return cfg.optim.lr_decay_steps
        per_rollout = max(1, cfg.rollout.prompts_per_step * cfg.rollout.num_samples // cfg.train.global_batch_size)
        return cfg.train.num_steps * per_rollout

    # ------------------------------------------------------------------ batches
    def _width(self, sequences: Sequence[Seq], plan: list[list[int]], rows: int) -> int:
        counts = [rows if self.state.pp_size > 1 else max(1, len(index)) for index in plan]
        return batch_width(self.cfg, max(len(t) for t, _ in sequences), counts)

    def _microbatch(self, sequences, index: list[int], rows: int, width: int) -> Microbatch:
        seqs = [sequences[i] for i in index]
        fill = (rows - len(seqs)) if self.state.pp_size > 1 else (0 if seqs else 1)
        batch = packing.pad_batch(seqs + [FILLER] * fill, self.pad_id)
        batch = _pad_width(batch, width, self.pad_id).to(self.state.device)
        return Microbatch(batch, len(seqs), index, rows=batch)

    @property
    def packing(self) -> bool:
        """train.packing: microbatches are packed THD rows (LocalCoreAttention on CPU, TE on GPU)."""
        return self.cfg.train.packing

    def _packed_microbatch(self, sequences, index: list[int]) -> Microbatch:
        """The sequences `index` packed into one [1, T] row (an empty index: one filler sequence)."""
        m, p = self.cfg.model, self.cfg.parallel
        seqs = [sequences[i] for i in index] or [FILLER]
        longest = max(len(t) for t, _ in seqs)
        if longest > m.max_position_embeddings:
            raise ValueError(f"a sequence of {longest} tokens exceeds model.max_position_embeddings="
                             f"{m.max_position_embeddings}")
        multiple = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel)
        total = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel, packing.fp8_align_for(m.fp8))
        host = packing.pack_thd(seqs, self.pad_id, multiple=multiple, total_multiple=total)
        batch = host.to(self.state.device)
        # TE reads cu_seqlens on the GPU; the local spec only on the host (model.local_thd_offsets_on_host)
        params = (host if self.thd_offsets_on_host else batch).packed_seq_params()
        params.cp_group = self.state.cp_group
        rows = packing.pad_batch(seqs, self.pad_id).to(self.state.device)
        return Microbatch(batch, len(index), index, rows=rows, packed_seq_params=params)

    def _packed_plan(self, costs: list[int], items_per_mb: int) -> list[list[int]]:
        """This rank's microbatches of item indices: by `train.max_tokens_per_microbatch` when set, else
        `items_per_mb` items each (the padded path's plan)."""
        budget = self.cfg.train.max_tokens_per_microbatch
        if budget:
            plan = packing.plan_token_budget(costs, budget, self.state.dp_size)[self.state.dp_rank]
        else:
            plan = plan_microbatches(len(costs), items_per_mb, self.state.dp_size, self.state.dp_rank)
        if self.state.vpp_size:  # the interleaved schedule runs microbatches in groups of pp: filler to a multiple,
            pp = self.state.pp_size  # and at least 2 x pp (with exactly pp, variable-length p2p hangs: issue 15)
            plan += [[] for _ in range(max(2 * pp, -(-len(plan) // pp) * pp) - len(plan))]
        return plan

    def _packed_cost(self, sequence: Seq) -> int:
        p = self.cfg.parallel
        multiple = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel)
        return -(-len(sequence[0]) // multiple) * multiple

    def _cp_local(self, batch):
        if isinstance(batch, packing.PackedBatch):
            return packing.split_packed_for_cp(batch, self.state.cp_rank, self.state.cp_size)
        return packing.split_padded_for_cp(batch, self.state.cp_rank, self.state.cp_size)

    def _token_logprobs(self, logits: torch.Tensor, mb: Microbatch, temperature: float) -> torch.Tensor:
        """[B, S] per-position log-probs of `mb.rows`' targets (0 off the response), whole sequences on every CP
        rank; a packed batch's [1, T] values are gathered into the rows' layout."""
        local = self._cp_local(mb.batch)
        token_lp = lp.logprobs_from_logits(logits, local, self.state.tp_group, temperature, self.vocab_size)
        cp, cp_rank = self.state.cp_size, self.state.cp_rank
        if mb.packed_seq_params is None:
            if cp > 1:
                token_lp = _GatherContextParallel.apply(token_lp, self.state.cp_group, cp_rank, cp)
            return token_lp
        if cp > 1:
            positions = [packing.packed_cp_positions(mb.batch, r, cp).to(token_lp.device) for r in range(cp)]
            token_lp = _GatherPositions.apply(token_lp, self.state.cp_group, positions, cp_rank)
        return packing.packed_to_rows(mb.batch, token_lp, mb.rows.tokens.shape[1])

    def _run_schedule(self, microbatches: list[Microbatch], loss_func, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            local = self._cp_local(mb.batch)
            output = model(local.tokens, local.position_ids, None, packed_seq_params=mb.packed_seq_params)
            return output, lambda logits: loss_func(logits, mb)

        rows = microbatches[0].batch.tokens.shape[0]
        width = max(mb.batch.tokens.shape[1] for mb in microbatches)
        # packed microbatches differ in length: stages exchange each one's shape first (p2p handshake)
        self.config.variable_seq_lengths = self.state.pp_size > 1 and microbatches[0].packed_seq_params is not None
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(microbatches) for _ in self.model],
            model=self.model, num_microbatches=len(microbatches), seq_length=width, micro_batch_size=rows,
            forward_only=forward_only)

    @property
    def _reports(self) -> bool:
        """This rank holds the loss side (last stage, first TP and CP rank): its metrics count once per DP rank."""
        return self.state.is_last_stage and self.state.tp_rank == 0 and self.state.cp_rank == 0

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def logprobs(self, sequences: Sequence[Seq], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-sequence fp32 log-probs of the response tokens under softmax(logits / temperature), on every rank."""
        mbs = self.cfg.train.logprobs_micro_batch_size or self.cfg.train.micro_batch_size
        if self.packing:
            plan = self._packed_plan([self._packed_cost(s) for s in sequences], mbs)
            microbatches = [self._packed_microbatch(sequences, index) for index in plan]
        else:
            plan = plan_microbatches(len(sequences), mbs, self.state.dp_size, self.state.dp_rank)
            rows = min(mbs, max(len(p) for p in plan) or 1)
            width = self._width(sequences, plan, rows)
            microbatches = [self._microbatch(sequences, index, rows, width) for index in plan]
        found: dict[int, torch.Tensor] = {}

        def loss_func(logits, mb: Microbatch):
            token_lp = self._token_logprobs(logits, mb, temperature)
            per_seq = mb.rows.response_logprobs(token_lp.float().cpu())
            for i, values in zip(mb.index, per_seq[:mb.num_real]):
                found[i] = values.clone()
            return token_lp.sum() * 0.0, torch.zeros((), dtype=torch.int, device=token_lp.device), {}

        for chunk in self.model:
            chunk.eval()
        self._run_schedule(microbatches, loss_func, forward_only=True)
        found = self._gather_dict(found if self._reports else {})
        assert sorted(found) == list(range(len(sequences))), "every sequence must get log-probs exactly once"
        return [found[i] for i in range(len(sequences))]

    def _gather_dict(self, local: dict) -> dict:
        if self.state.world_size == 1:
            return local
        parts: list = [None] * self.state.world_size
        dist.all_gather_object(parts, local)
        return {k: v for part in parts for k, v in part.items()}

    # ------------------------------------------------------------------ training
    def _check_inputs(self, sequences, objective, rewards, old_logprobs, ref_logprobs, rollout_logprobs,
                      group_size) -> None:
        n = len(sequences)
        if n == 0 or n % group_size:
            raise ValueError(f"train_step: {n} sequences are not whole groups of group_size={group_size}")
        if not (self.packing and self.cfg.train.max_tokens_per_microbatch):  # a token budget ignores it
            check_micro_batch_size(self.cfg.train.micro_batch_size, group_size)
        if rewards.shape != (n,):
            raise ValueError(f"train_step: rewards must have shape [{n}], got {tuple(rewards.shape)}")
        if objective.needs_ref and ref_logprobs is None:
            raise ValueError(f"train_step: objective {objective.name} needs ref_logprobs")
        if objective.needs_rollout_logprobs and rollout_logprobs is None:
            raise ValueError(f"train_step: objective {objective.name} with objective.tis_cap needs rollout_logprobs")
        for name, values in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                             ("rollout_logprobs", rollout_logprobs)):
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"train_step: {name} has {len(values)} entries for {n} sequences")
            for i, ((tokens, prompt_len), v) in enumerate(zip(sequences, values)):
                if len(v) != len(tokens) - prompt_len:
                    raise ValueError(f"train_step: {name}[{i}] has {len(v)} values for "
                                     f"{len(tokens) - prompt_len} response tokens")

    def train_step(self, sequences: Sequence[Seq], objective, rewards: torch.Tensor,
                   old_logprobs: Sequence[torch.Tensor], ref_logprobs: Optional[Sequence[torch.Tensor]] = None,
                   group_size: int = 1, normalizer: float = 1.0, temperature: Optional[float] = None,
                   rollout_logprobs: Optional[Sequence[torch.Tensor]] = None) -> dict:
        """One optimizer step on whole groups; returns metrics summed over microbatches and DP ranks (all ranks).

        rewards [N] shaped rewards; old_logprobs / ref_logprobs / rollout_logprobs (the engine's, for
        objective.tis_cap): N tensors of per-response-token log-probs;
        normalizer: the objective's count of loss units over this step's groups (all DP ranks);
        temperature: of the log-probs (default rollout.temperature, matching old_logprobs).
        """
        assert not self.frozen, "a frozen trainer does not train"
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        self._check_inputs(sequences, objective, rewards, old_logprobs, ref_logprobs, rollout_logprobs, group_size)
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        k, mbs = group_size, self.cfg.train.micro_batch_size
        microbatches = self._train_microbatches(sequences, k, mbs)
        for mb in microbatches:
            index, width = mb.index, mb.rows.tokens.shape[1]
            prompt_lens = [sequences[i][1] for i in index]
            dev = self.state.device
            mb.old_logprobs = scatter_response([old_logprobs[i] for i in index], prompt_lens, width).to(dev)
            if ref_logprobs is not None:
                mb.ref_logprobs = scatter_response([ref_logprobs[i] for i in index], prompt_lens, width).to(dev)
            if rollout_logprobs is not None:
                mb.rollout_logprobs = scatter_response([rollout_logprobs[i] for i in index], prompt_lens,
                                                       width).to(dev)
            mb.rewards = rewards[index].to(dev)
        sums: dict[str, float] = {}

        def loss_func(logits, mb: Microbatch):
            from megatron_rence.objectives import ObjectiveBatch

            token_lp = self._token_logprobs(logits, mb, temperature)
            num_tokens = torch.zeros((), dtype=torch.int, device=token_lp.device)
            if mb.num_real == 0:
                return token_lp.sum() * 0.0, num_tokens, {}
            n = mb.num_real
            ref = mb.ref_logprobs[:n] if mb.ref_logprobs is not None else None
            rollout = mb.rollout_logprobs[:n] if mb.rollout_logprobs is not None else None
            batch = ObjectiveBatch(token_lp[:n], mb.old_logprobs[:n], mb.rows.loss_mask[:n], mb.rewards, k, ref,
                                   rollout)
            loss, metrics = objective(batch, normalizer)
            if not loss.requires_grad:  # e.g. no usable group in this microbatch: a zero that backward accepts
                loss = loss + token_lp.sum() * 0.0
            metrics = dict(metrics, **{"loss/total": loss.item(), "train/num_sequences": float(n),
                                       "train/num_response_tokens": float(mb.rows.loss_mask[:n].sum().item()),
                                       "train/num_tokens_real": float(mb.rows.lengths[:n].sum().item()),
                                       "train/num_tokens_computed": float(mb.batch.tokens.numel())})
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            return loss, num_tokens, {}

        return self._step(microbatches, loss_func, sums)

    def _train_microbatches(self, sequences, k: int, mbs: int) -> list[Microbatch]:
        """This rank's microbatches of whole groups (group g = rows g*K..g*K+K-1): packed (train.packing) by
        token budget or `mbs // k` groups each, else padded to the step's width in `mbs`-row microbatches."""
        num_groups = len(sequences) // k
        if self.packing:
            costs = [sum(self._packed_cost(sequences[g * k + j]) for j in range(k)) for g in range(num_groups)]
            group_plan = self._packed_plan(costs, mbs // k)
            return [self._packed_microbatch(sequences, [g * k + j for g in groups for j in range(k)])
                    for groups in group_plan]
        group_plan = plan_microbatches(num_groups, mbs // k, self.state.dp_size, self.state.dp_rank)
        plan = [[g * k + j for g in groups for j in range(k)] for groups in group_plan]
        all_rows = [len(p) * k for r in range(self.state.dp_size)
                    for p in plan_microbatches(num_groups, mbs // k, self.state.dp_size, r)]
        rows = min(mbs, max(all_rows) or k)
        width = self._width(sequences, plan, rows)
        return [self._microbatch(sequences, index, rows, width) for index in plan]

    def _step(self, microbatches: list[Microbatch], loss_func, sums: dict) -> dict:
        t0 = time.perf_counter()
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run_schedule(microbatches, loss_func, forward_only=False)
        t1 = time.perf_counter()
        lr = optim.current_lr(self.optimizer)
        before = self._fingerprints()
        skip = self.any_rank(self._nonfinite(sums))  # every rank skips together (the flag is all-reduced)
        if skip:  # a NaN / inf loss or gradient: no update, the LR schedule does not advance (as megatron's skip)
            update_successful, grad_norm = False, float("nan")
        else:
            update_successful, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(1)
        optim.finish_param_gather(self.model)
        changed = int((self._fingerprints() != before).any(dim=1).sum().item())
        t2 = time.perf_counter()
        parts = self._gather_dict({self.state.rank: (sums if self._reports else {}, changed, before.shape[0])})
        metrics: dict[str, float] = {}
        for local, _, _ in parts.values():
            for key, value in local.items():
                metrics[key] = metrics.get(key, 0.0) + value
        metrics.update({
            "train/grad_norm": float(grad_norm if grad_norm is not None else float("nan")),
            "train/lr": lr, "train/update_skipped": 0.0 if update_successful else 1.0,
            "train/weights_changed": sum(c for _, c, _ in parts.values()) / max(1, sum(t for _, _, t in parts.values())),
            "train/num_microbatches": float(len(microbatches)),
            "train/nonfinite_steps": float(skip or not math.isfinite(float(grad_norm or 0.0))),
            "perf/fwd_bwd_s": t1 - t0, "perf/optimizer_s": t2 - t1,
        })
        return metrics

    @torch.no_grad()
    def _nonfinite(self, sums: dict) -> bool:
        """This rank's loss (on the loss side) or its gradient buffers hold NaN / inf."""
        if not math.isfinite(sums.get("loss/total", 0.0)):
            return True
        return any(not bool(torch.isfinite(buffer.grad_data).all())
                   for chunk in self.model for buffer in chunk.buffers + chunk.expert_parallel_buffers)

    @torch.no_grad()
    def _fingerprints(self) -> torch.Tensor:
        """[num local parameter tensors, 2] float64 (sum, L2 norm), reduced without a float64 copy of the
        weights: cheap evidence that weights changed."""
        rows = [torch.stack([p.detach().sum(dtype=torch.float64),
                             torch.linalg.vector_norm(p.detach(), dtype=torch.float64)])
                for chunk in self.model_chunks for p in chunk.parameters()]
        return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)

    # ------------------------------------------------------------------ state
    def save(self, ckpt_root, step: int, run_state: dict, keep_last: Optional[int] = None) -> Path:
        """Atomic checkpoint of weights, optimizer, LR schedule and `run_state` (see checkpoint.save); keep_last
        pruning never removes checkpoint.load (a run never deletes what it was asked to read)."""
        return checkpoint.save(ckpt_root, step, self.model_chunks, self.optimizer, self.scheduler, run_state,
                               keep_last=keep_last, model_config=dataclasses.asdict(self.cfg.model),
                               protect=self.cfg.checkpoint.load)

    def load(self, path, weights_only: bool = False) -> dict:
        """Load `path` (a checkpoint root -> its latest intact one, or one iter_* dir); returns the saved run
        state. checkpoint.allow_unverified admits a checkpoint without manifest.json. A full load (a resume of
        this run's checkpoint dir) renames the corrupt checkpoints it skips `*.corrupt`; weights_only does not."""
        state = checkpoint.load(path, self.model_chunks, None if weights_only else self.optimizer,
                                None if weights_only else self.scheduler,
                                allow_unverified=self.cfg.checkpoint.allow_unverified,
                                model_config=dataclasses.asdict(self.cfg.model), set_aside_corrupt=not weights_only)
        if weights_only:
            self.reload_main_params()
        else:
            self._resume_schedule(int(state.get("step", 0)))
        return state

    def _resume_schedule(self, step: int) -> None:
        """The recipe's optim.* settings apply from the step after the checkpoint (optim.resume_schedule); each
        one that changed is printed, and so is a learning rate of 0 for the steps left to run."""
        self.scheduler, changes = optim.resume_schedule(self.cfg.optim, self.optimizer, self.scheduler,
                                                        self.decay_steps(self.cfg))
        warning = optim.zero_lr_warning(self.cfg.optim, self.optimizer, self.scheduler,
                                        self.cfg.train.num_steps - step)
        if self.state.rank != 0:
            return
        for change in changes:
            print(f"resume: {change}: the recipe's value applies from step {step + 1}", flush=True)
        if warning:
            print(warning, flush=True)

    def reload_main_params(self) -> None:
        """Call after changing the parameters outside the optimizer (HF load, checkpoint weights, copies):
        megatron's mixed-precision optimizers copied fp32 main params when they were built and write them
        back after every step, which would silently undo the change."""
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    def precision(self) -> str:
        """"params=<dtype> main_params=<dtype>": the model's parameters and the tensors its optimizer updates
        (fp32 main params for a bf16 / fp16 model; "none" for a frozen trainer)."""
        dtype = str(next(self.model_chunks[0].parameters()).dtype).replace("torch.", "")
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
        main = optim.main_params_dtype(self.optimizer) if self.optimizer is not None else "none"
        return f"params={dtype} main_params={main}"

    @torch.no_grad()
    def copy_weights_from(self, other: "Trainer") -> None:
        """Copy another trainer's weights (same model and layout), e.g. the reference policy from the policy."""
        for mine, theirs in zip(self.model_chunks, other.model_chunks, strict=True):
            for (name, p), (other_name, q) in zip(mine.named_parameters(), theirs.named_parameters(), strict=True):
                assert name == other_name, (name, other_name)
                p.copy_(q)
        self.reload_main_params()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (e.g. a signal that reached one process)."""
        if self.state.world_size == 1:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], device=self.state.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

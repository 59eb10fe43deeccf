"""The CPU rollout engine: a transformers model of the trainer's architecture, fed by the same weight stream.

`HFEngine(hf_config, tokenizer)` builds `AutoModelForCausalLM.from_config(hf_config)` (fp32, random
weights until the trainer's first `update_weights`). `generate` runs our own batched sampling loop
over the model with a KV cache: every prompt x sample is one row of a single left-padded batch
(attention mask, position ids counted from each row's first real token). Per-token log-probs are
log_softmax(logits / temperature) of the sampled tokens in fp32, the quantity the trainer
recomputes (see `sampling.py`). A completion ends with "stop" on an eos token (kept in `token_ids`)
or a stop string (the completing token kept; the string cut from `text`), else "length".
Sampling is reproducible with `SamplingParams.seed` (one torch.Generator per call); finished rows
leave the batch.
Memory release / resume are no-ops on CPU; `health()` is True until `shutdown()`.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from megatron_rence.rollout.sampling import StopStrings, sample_next
from megatron_rence.rollout.types import Completion, GenerateRequest, SamplingParams, group_rows


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


class HFEngine:
    """Transformers engine on CPU (or any torch device) implementing `RolloutEngine`."""

    def __init__(self, hf_config, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # its random init (replaced by the first sync) must not move the
            # global CPU generator: the engine is built before the trainer, whose CPU init draws from it
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.eos_ids = _eos_ids(hf_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        # transformers renamed the forward's `past_key_values` to `cache` (5.2x); accept both releases.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.weight_version = 0
        self.loaded: set[str] = set()  # HF names received since construction
        self.w8a8_hooks: list = []  # set once FP8 weights arrive (update_weights)
        self._alive = True

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy each full HF-named tensor into the model's parameter of that name.

        With tied embeddings the model has one tensor for `model.embed_tokens.weight` and
        `lm_head.weight`; either name loads it. A bucket of block-FP8 weights (`weight_scale_inv`
        tensors, rollout.sglang.fp8_weights) is dequantised first: this engine has no FP8 kernels, so it
        then samples with the FP8-rounded weights, and from the first such bucket on it also rounds the
        inputs of those linear layers as SGLang's W8A8 block-FP8 GEMMs do (quantize.emulate_w8a8).
        """
        if any(name.endswith(".weight_scale_inv") for name, _ in bucket):
            from megatron_rence.weights.quantize import dequantize_bucket, emulate_w8a8

            bucket = dequantize_bucket(bucket, torch.float32)
            if not self.w8a8_hooks:
                self.w8a8_hooks = emulate_w8a8(self.model)
        with torch.no_grad():
            for name, tensor in bucket:
                target = self._param(name)
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                                     f"the engine's model expects {tuple(target.shape)}")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                self.loaded.add(name)
        self.weight_version = version

    def named_weight(self, name: str) -> torch.Tensor:
        """The engine's current tensor for HF parameter `name` (for sync checks)."""
        return self._param(name).detach()

    def _param(self, name: str) -> torch.Tensor:
        if name in self.params:
            return self.params[name]
        if self.tied and name == "lm_head.weight":
            return self.model.get_input_embeddings().weight
        raise ValueError(f"update_weights: {name} is not a parameter of the engine's "
                         f"{type(self.model).__name__} (known: {sorted(self.params)[:4]}...)")

    def missing_weights(self) -> list[str]:
        """Parameter names no `update_weights` call has loaded yet."""
        names = set(self.loaded)
        if self.tied and "lm_head.weight" in names:
            names.add("model.embed_tokens.weight")
        return sorted(set(self.params) - names)

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        """`n` completions of each prompt, all prompts x samples in one batch. Outer: prompts, inner: samples."""
        request = GenerateRequest(prompts, params, n)
        rows = [prompts[i] for i, _ in request.rows()]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        tokens, logprobs, reasons = self._sample(rows, params, generator)
        stop = StopStrings(params.stop, self.tokenizer)
        flat = []
        for ids, lps, reason in zip(tokens, logprobs, reasons):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            flat.append(Completion(ids, lps, reason, self.weight_version, stop.trim(text) if stop else text))
        return group_rows(flat, len(prompts), n)

    @torch.no_grad()
    def _sample(self, rows: list[list[int]], params: SamplingParams,
                generator: Optional[torch.Generator]) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """The decoding loop over B = len(rows) left-padded rows; returns per row (ids, logprobs, reason).

        Finished rows leave the batch (and the KV cache) at once, so the step cost follows the live rows.
        """
        from transformers import DynamicCache

        inputs, mask, positions = self._left_pad(rows)
        cache = DynamicCache(config=self.hf_config)
        stop = StopStrings(params.stop, self.tokenizer)
        out_ids: list[list[int]] = [[] for _ in rows]
        out_lps: list[list[float]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        live = list(range(len(rows)))  # batch position -> row
        for _ in range(params.max_new_tokens):
            logits = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache}).logits
            tokens, lps = sample_next(logits[:, -1, :], params, generator)
            keep = []
            for b, (row, token, lp) in enumerate(zip(live, tokens.tolist(), lps.tolist())):
                out_ids[row].append(token)
                out_lps[row].append(lp)
                if token in self.eos_ids or (stop and stop.matched(out_ids[row])):
                    reasons[row] = "stop"
                else:
                    keep.append(b)
            if not keep:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            inputs, positions = tokens.unsqueeze(-1), positions[:, -1:] + 1
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                inputs, mask, positions = inputs[index], mask[index], positions[index]
                live = [live[b] for b in keep]
        return out_ids, out_lps, reasons

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids, attention mask and position ids [B, L] with each row right-aligned."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    # ---- memory and lifecycle (nothing to release on CPU) ----------------------------------------
    def release_memory(self) -> None:
        """No-op: the CPU engine keeps its weights and allocates its KV cache per `generate` call."""

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        """No-op (see `release_memory`)."""

    def health(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        self._alive = False

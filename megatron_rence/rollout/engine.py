"""The rollout engine protocol every engine implements, and `build_engine` that picks one from the recipe.

A training step uses an engine in this order (docs/design.md, "One training step")::

    engine.generate(prompts, params, n)          rollouts with weight version v
    engine.release_memory()                      GPU: weights and KV cache leave the GPU for training
    engine.resume_memory(tags=["weights"])       GPU: weight memory comes back (contents stale)
    engine.update_weights(bucket, v + 1) ...     one call per bucket of HF-named full tensors
    engine.resume_memory(tags=["kv_cache"])      GPU: KV cache (and CUDA graphs) come back

The CPU engine treats the memory calls as no-ops.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from megatron_rence.rollout.types import Completion, SamplingParams


class EngineRestartedError(RuntimeError):
    """The engine was restarted and holds dummy weights: the trainer must push the current weights."""


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        """K = `n` completions per prompt (token ids). Outer list: prompts, inner: samples."""
        ...

    def update_weights(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full (unsharded) tensors named as in the HF checkpoint; later completions carry `version`."""
        ...

    def release_memory(self) -> None:
        ...

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        """`tags`: subset of ["weights", "kv_cache"]; None resumes everything released."""
        ...

    def health(self) -> bool:
        ...

    def shutdown(self) -> None:
        ...


def build_engine(cfg, hf_config, tokenizer, group=None) -> RolloutEngine:
    """The engine named by `cfg.rollout.engine` ("hf" or "sglang") for a model with `hf_config`.

    `cfg` is the whole recipe (`Config`): the SGLang engine also reads `train.seed`, `train.run_dir`
    and `model.dtype`. `group` (SGLang only): the torch.distributed process group of the ranks that
    serve one engine (its inference TP group); call `build_engine` on every rank of it. None means
    this process alone feeds the engine.
    """
    name = cfg.rollout.engine
    if name == "hf":
        from megatron_rence.rollout.hf_engine import HFEngine

        return HFEngine(hf_config, tokenizer, device="cpu")
    if name == "sglang":
        from megatron_rence.rollout.sglang_engine import SGLangEngine

        return SGLangEngine.from_config(cfg, hf_config, tokenizer, group=group)
    raise ValueError(f"rollout.engine: unknown engine {name!r} (expected 'hf' or 'sglang')")

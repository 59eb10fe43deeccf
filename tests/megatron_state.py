"""Megatron's process-global state for tests in one process: initialise parallel state (which applies the
CPU compatibility layer), and afterwards tear it down and leave the layer as this process had it."""
import contextlib
from typing import Iterator

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from megatron_rence.megatron import cpu_compat, parallel


@contextlib.contextmanager
def cpu_compat_restored() -> Iterator[None]:
    """Destroy megatron's parallel state on exit; undo cpu_compat only if it was not applied on entry."""
    was_applied = cpu_compat.is_applied()
    try:
        yield
    finally:
        parallel.destroy()
        if not was_applied:
            cpu_compat.restore()


@contextlib.contextmanager
def single_rank(seed: int, cfg: ParallelConfig | None = None) -> Iterator[object]:
    """Megatron parallel state for this one process (tp = pp = cp = 1 unless `cfg` says otherwise)."""
    with cpu_compat_restored():
        yield parallel.initialize(cfg or ParallelConfig(), seed=seed)


def tiny_grpo_config(k: int = 2) -> Config:
    """A 2-layer fp32 GRPO trainer (a vocab of 53 fits its padding of 8), AdamW with warmup, cosine decay and
    weight decay, groups of `k` in microbatches of two groups: the checkpoint and resume tests' model."""
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8,
                            tie_word_embeddings=True, dtype="fp32")
    cfg.objective = ObjectiveConfig(name="grpo")
    cfg.optim = OptimConfig(lr=1e-2, lr_warmup_steps=1, lr_decay_style="cosine", weight_decay=0.1)
    cfg.train.micro_batch_size, cfg.train.num_steps, cfg.rollout.num_samples = 2 * k, 8, k
    return cfg

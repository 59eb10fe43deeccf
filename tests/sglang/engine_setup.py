"""What the `sglang` tier's tests share: a tiny trainer (megatron-core on CPU) with peaked random weights,
our SGLangEngine over SGLang's real engine on CPU, the per-step weight protocol, and the trainer's own
log-probs of the engine's samples."""
import socket

import torch

from megatron_rence.config import Config, ModelConfig
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer
from megatron_rence.rollout.sglang_engine import SGLangEngine
from megatron_rence.weights.hf_config import to_hf_config
from megatron_rence.weights.sync import push_weights

# a RoPE base that is not SGLang's default (10000): an engine that read the wrong base would disagree
MODEL = ModelConfig(arch="llama", tokenizer="synthetic", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, max_position_embeddings=128, rotary_base=50000.0,
                    make_vocab_size_divisible_by=8, dtype="fp32")


def free_port() -> int:
    """A free TCP port with a free successor (SGLang's NCCL/gloo port is base_port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def make_cfg(run_dir, overlap: bool = False, model: ModelConfig = MODEL) -> Config:
    cfg = Config()
    cfg.model = model
    cfg.train.device = "cpu"
    cfg.train.run_dir = str(run_dir)
    cfg.train.seed = 3
    cfg.weights.bucket_bytes = 16 * 1024  # several buckets for this model
    s = cfg.rollout.sglang
    s.enable_memory_saver = False
    s.mem_fraction_static = 0.05
    s.health_poll_s = 0.5
    s.request_timeout_s = 300.0
    s.base_port = free_port()
    s.extra_args = {"max_total_tokens": "4096"}
    if not overlap:  # 2 cores: ~20% faster; the default (overlap) scheduler is tested on its own
        s.extra_args["disable_overlap_schedule"] = "true"
    return cfg


def make_trainer(cfg: Config, pstate, vocab_size: int, seed: int = 0) -> Trainer:
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab_size), pstate, vocab_size)
    peak(trainer, seed)
    return trainer


def peak(trainer: Trainer, seed: int) -> None:
    """Large random weights: peaked next-token distributions, so wrong weights or RoPE show in log-probs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model_chunks[0].parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def make_engine(cfg: Config, tokenizer, vocab_size: int) -> SGLangEngine:
    hf_config = to_hf_config(cfg.model, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return SGLangEngine.from_config(cfg, hf_config, tokenizer)


def sync(engine, trainer: Trainer, cfg: Config, pstate, vocab_size: int, version: int) -> dict:
    """train.sync_weights' engine calls: resume weights, push the stream in buckets, resume the KV cache."""
    engine.resume_memory(["weights"])
    metrics = push_weights(trainer.model_chunks, cfg.model, vocab_size, engine, version, cfg.weights.bucket_bytes,
                           pstate)
    engine.resume_memory(["kv_cache"])
    return metrics


def trainer_logprobs(trainer: Trainer, prompts, completions, temperature: float) -> list[torch.Tensor]:
    seqs = [(p + c.token_ids, len(p)) for p, row in zip(prompts, completions) for c in row]
    return trainer.logprobs(seqs, temperature)


def tokenizer_and_vocab():
    tokenizer = build_synthetic_tokenizer()
    return tokenizer, len(tokenizer)

"""Tiny random Hugging Face checkpoints of the three supported architectures, shared by the weights tests."""
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from megatron_rence.weights.portable import make_portable

VOCAB = 90  # padded to 128 inside Megatron: exports must strip the padding
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
ARCHS = {  # untied; tied + QKV bias; QK-norm + head_dim (16) != hidden / heads (8)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=16)),
}


def make_hf_model(arch: str, out: Path, with_tokenizer: bool = False) -> dict[str, torch.Tensor]:
    """A tiny fp32 checkpoint with every tensor random (norm weights and biases too, so a swapped name shows);
    returns what `save_pretrained` wrote."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(sorted(ARCHS).index(arch))
    model = model_cls(config_cls(**TINY, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    if with_tokenizer:
        from megatron_rence.data.tokenizer import build_synthetic_tokenizer

        build_synthetic_tokenizer().save_pretrained(out)
    make_portable(out)  # the same RoPE base and tokenizer under transformers 4.57.1 (SGLang's) and 5.x
    return load_file(Path(out) / "model.safetensors")


def save_chat_model(out: Path, arch: str = "llama", *, seed: int, hidden_size: int = 32, intermediate_size: int = 64,
                    max_position_embeddings: int = 64, tie_word_embeddings: bool = True, extra_vocab: int = 0,
                    jitter: float = 0.0, dtype: torch.dtype | None = None) -> Path:
    """A tiny random llama / qwen2 checkpoint (2 layers, 4 heads / 2 KV groups) saved with the synthetic
    tokenizer (which has a chat template), as the recipes' `model.hf_path` / `model.tokenizer` expect.
    `jitter` > 0 moves every tensor (norm weights off 1, biases off 0) so that a tensor left unloaded shows."""
    from megatron_rence.data.tokenizer import build_synthetic_tokenizer

    config_cls, model_cls, _ = ARCHS[arch]
    tokenizer = build_synthetic_tokenizer()
    config = config_cls(vocab_size=len(tokenizer) + extra_vocab, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                        tie_word_embeddings=tie_word_embeddings, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(jitter * torch.randn_like(p))
    (model.to(dtype) if dtype is not None else model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_portable(out)
    return Path(out)

"""Pure per-architecture name and layout mappings between Megatron and Hugging Face."""
from megatron_rence.weights.mapping import llama, qwen2, qwen3
from megatron_rence.weights.mapping.base import ArchMapping, Dims, merge_qkv, pad_vocab, split_qkv

MAPPINGS: dict[str, ArchMapping] = {m.MAPPING.arch: m.MAPPING for m in (llama, qwen2, qwen3)}


def get_mapping(arch: str, te_spec: bool = False) -> ArchMapping:
    """The mapping of `arch` ("llama", "qwen2", "qwen3"); `te_spec`: layer norms fused into the linears."""
    if arch not in MAPPINGS:
        raise ValueError(f"model.arch: no weight mapping for {arch!r} (known: {', '.join(sorted(MAPPINGS))})")
    return MAPPINGS[arch].with_te_spec(te_spec)


def dims_of(model_cfg, vocab_size: int) -> Dims:
    """The layout dimensions of a recipe's model section with the unpadded `vocab_size`."""
    return Dims(model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim, vocab_size,
                model_cfg.tie_word_embeddings)


__all__ = ["ArchMapping", "Dims", "MAPPINGS", "get_mapping", "dims_of", "merge_qkv", "pad_vocab", "split_qkv"]

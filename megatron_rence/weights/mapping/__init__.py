"""Pure per-architecture name and layout mappings between Megatron and Hugging Face."""
from megatron_rence.weights.mapping import llama, qwen2, qwen3
from megatron_rence.weights.mapping.base import ArchMapping, Dims

MAPPINGS: dict[str, ArchMapping] = {m.MAPPING.arch: m.MAPPING for m in (llama, qwen2, qwen3)}


def get_mapping(arch: str, te_spec: bool = False) -> ArchMapping:
    if arch not in MAPPINGS:
        raise ValueError(f"model.arch: no weight mapping for {arch!r} (known: {', '.join(sorted(MAPPINGS))})")
    return MAPPINGS[arch].with_te_spec(te_spec)


def dims_of(model_cfg, vocab_size: int) -> Dims:
    return Dims(model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim, vocab_size,
                model_cfg.tie_word_embeddings)


__all__ = ["ArchMapping", "Dims", "MAPPINGS", "get_mapping", "dims_of"]

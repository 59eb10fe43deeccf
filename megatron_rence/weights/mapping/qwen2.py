"""Qwen2 / Qwen2.5: bias on the Q, K and V projections; small models tie their embeddings."""
from megatron_rence.weights.mapping.base import ArchMapping

MAPPING = ArchMapping(arch="qwen2", qkv_bias=True, qk_norm=False)

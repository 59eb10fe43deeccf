"""Llama 3 / 3.1: no QKV bias, no QK-norm; untied embeddings in the large models."""
from megatron_rence.weights.mapping.base import ArchMapping

MAPPING = ArchMapping(arch="llama", qkv_bias=False, qk_norm=False)

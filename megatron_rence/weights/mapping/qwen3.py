"""Qwen3 (dense): RMSNorm on each query and key head (QK-norm), no QKV bias, head_dim set explicitly."""
from megatron_rence.weights.mapping.base import ArchMapping

MAPPING = ArchMapping(arch="qwen3", qkv_bias=False, qk_norm=True)

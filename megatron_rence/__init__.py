"""megatron-rence: ReNCE (contrastive RL for LLM reasoning) with megatron-core trainers and colocated rollout engines."""

__version__ = "0.1.0"

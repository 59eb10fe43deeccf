"""Weights: per-architecture HF<->Megatron mapping, sync planning, and the per-step transport."""

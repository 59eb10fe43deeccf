"""Rollout engines behind one small protocol: SGLang (GPU, colocated) and transformers (CPU)."""

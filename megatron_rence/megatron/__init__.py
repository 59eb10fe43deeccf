"""The only package that imports megatron.core: models, log-likelihoods, train step, checkpoints."""

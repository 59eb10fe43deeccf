"""Test tiers by folder: unit (default), distributed (gloo, several processes), gpu (needs CUDA), e2e, slurm (a real
Slurm cluster brought up by tools/slurm_cluster.sh; skipped where it cannot run)."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TIERS = ("unit", "distributed", "gpu", "e2e", "slurm")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        parts = item.path.parts
        for tier in _TIERS[1:]:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)

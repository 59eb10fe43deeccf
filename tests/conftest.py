"""Test tiers by folder: unit (default), distributed (gloo, several processes), gpu (needs CUDA), e2e, slurm (a real
Slurm cluster brought up by tools/slurm_cluster.sh; skipped where it cannot run)."""
import os
import signal

import pytest
import torch

from megatron_rence import lifecycle

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


_WATCHED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGQUIT", "SIGHUP")
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _process_state() -> dict:
    state = {name: signal.getsignal(getattr(signal, name)) for name in _WATCHED_SIGNALS}
    state["blocked"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    state["fork_hook_on"] = lifecycle._fork_hook_on
    state["rendezvous"] = {k: os.environ.get(k) for k in _RENDEZVOUS}
    return state


@pytest.fixture(autouse=True)
def process_state_is_left_as_found():
    """Whatever runs in this process (the trainer, a CLI's main) leaves the signal handling and the rendezvous
    environment as it found them. A signal ignored here is ignored in every process a later test starts (bash
    cannot trap a signal that was ignored when it started: the Slurm script tests hung on exactly that in CI), a
    blocked one stays blocked in them, an active fork hook makes forked children ignore the stop signals, and a
    MASTER_PORT left in the environment is exported by sbatch to every job (the Slurm tier's jobs collided on
    one in CI)."""
    before = _process_state()
    yield
    after = _process_state()
    if after != before:
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        for name in _WATCHED_SIGNALS:
            signal.signal(getattr(signal, name), before[name])
        signal.pthread_sigmask(signal.SIG_SETMASK, before["blocked"])
        lifecycle._fork_hook_on = before["fork_hook_on"]
        for key, value in before["rendezvous"].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        pytest.fail(f"the test left the process's signal handling or rendezvous environment changed "
                    f"(before, after): {changed}")

"""Megatron's process-global state for tests in one process: initialise parallel state (which applies the
CPU compatibility layer), and afterwards tear it down and leave the layer as this process had it."""
import contextlib
from typing import Iterator

from megatron_rence.config import ParallelConfig
from megatron_rence.megatron import cpu_compat, parallel


@contextlib.contextmanager
def cpu_compat_restored() -> Iterator[None]:
    """Destroy megatron's parallel state on exit; undo cpu_compat only if it was not applied on entry."""
    was_applied = cpu_compat.is_applied()
    try:
        yield
    finally:
        parallel.destroy()
        if not was_applied:
            cpu_compat.restore()


@contextlib.contextmanager
def single_rank(seed: int, cfg: ParallelConfig | None = None) -> Iterator[object]:
    """Megatron parallel state for this one process (tp = pp = cp = 1 unless `cfg` says otherwise)."""
    with cpu_compat_restored():
        yield parallel.initialize(cfg or ParallelConfig(), seed=seed)

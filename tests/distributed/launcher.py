"""Run a module-level function on N local processes (gloo-ready env vars) and collect each rank's pickled result.

Usage in a test: ``results = launcher.run(my_module_level_fn, 2, arg1, timeout=120)``; inside ``fn``,
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set, torch uses one thread, and
``torch.distributed`` can be initialised from ``env://`` (``parallel.initialize`` does it). A rank that
raises, dies or outlives ``timeout`` fails the whole run with every rank's traceback in the message.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        out = fn(*args)
        results.put((rank, True, out))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass


def run(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list:
    """Run ``fn(*args)`` on ranks 0..world_size-1; returns the list of return values indexed by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            if time.monotonic() > deadline:
                errors[-1] = f"timed out after {timeout:.0f} s; ranks without a result: " \
                             f"{sorted(set(range(world_size)) - set(outputs) - set(errors))}"
                break
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in outputs and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode} without a result"
                continue
            (outputs if ok else errors)[rank] = value
            if not ok:  # the other ranks are likely blocked in a collective: stop waiting for them
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors:
        details = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise RuntimeError(f"distributed run of {fn.__name__} on {world_size} ranks failed:\n{details}")
    return [outputs[r] for r in range(world_size)]

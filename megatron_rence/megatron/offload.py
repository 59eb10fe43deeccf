"""Trainer memory hand-off around rollout: what training does not need leaves the GPU while the engine runs.

One colocated step (train.py; DESIGN.md "One training step") uses it in this order::

    handoff.offload()          grad buffers freed, optimizer state + fp32 main params -> CPU (unless
                               train.offload_optimizer=false: they stay); gc, empty_cache, ipc_collect
                                                                             (before the engine resumes weights)
    engine.resume_memory(["weights"]); weight sync                           (reads the trainer's parameters)
    handoff.offload_params()   train.offload_params: parameters -> CPU; gc, empty_cache, ipc_collect (always)
    engine.resume_memory(["kv_cache"]); engine.generate(...); engine.release_memory()
    handoff.restore()          parameters, optimizer state, grad buffers back (grad buffers zeroed)

What moves, with megatron-core 0.16.1's own calls:
- gradients: ``DistributedDataParallel.offload_grad_buffers`` resizes each buffer's storage to 0 (views such as
  ``param.main_grad`` stay valid objects); ``restore_grad_buffers`` reallocates and zeroes them. Nothing is
  copied (the next step zeroes the gradients anyway). This frees memory on CPU too.
- optimizer: what ``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu`` move (the inner torch
  optimizer's parameters: the fp32 main params of Float16OptimizerWithFloat16Params / DistributedOptimizer,
  the model params themselves for FP32Optimizer; and its state, the Adam moments; CUDA tensors only; every
  optimizer a ``ChainedOptimizer`` chains), but into pinned host buffers allocated at the first offload and
  reused every step, with asynchronous copies: megatron's own calls use ``.cpu()`` / ``.cuda()`` on pageable
  memory, several times slower per byte (docs/performance.md). The pinned buffers stay allocated for the
  run (host RAM: the optimizer state of every GPU of the node). On CPU nothing moves.
- parameters (optional): the contiguous DDP param buffer when there is one (distributed optimizer: the
  parameters are views into it, ``offload_to_cpu(move_params=True)`` keeps them valid), else each parameter's
  ``.data`` is swapped for a CPU copy (pinned on CUDA) and back; the reference policy's too.

Every call returns ``perf/*`` seconds and ``memory/*`` GiB metrics (allocated / reserved GPU memory after the
call; 0 without CUDA) plus the bytes it moved or freed, measured from the tensors themselves.
"""
from __future__ import annotations

import gc
import time

import torch

GiB = 1024 ** 3


def gpu_memory(prefix: str) -> dict:
    """`memory/<prefix>_allocated_gib` and `_reserved_gib` of this process's current GPU (0 without CUDA)."""
    return {f"memory/{prefix}_allocated_gib": torch.cuda.memory_allocated() / GiB,
            f"memory/{prefix}_reserved_gib": torch.cuda.memory_reserved() / GiB}


def free_cached_memory() -> None:
    """Drop Python garbage and hand the caching allocator's free blocks (and finished IPC handles) back to CUDA,
    so that the engine, a separate allocator, can use them. Only with CUDA: on CPU there is no device memory to
    hand over, and a full gc pass costs ~0.3 s per call with torch, transformers and megatron loaded (it made
    the CPU demo's steps 10x slower)."""
    if torch.cuda.is_available():
        gc.collect()  # the last references to offloaded CUDA tensors, or empty_cache cannot return their blocks
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def _ddp_buffers(chunk) -> list:
    """A DistributedDataParallel chunk's param-and-grad buffers ([] for a bare module: a frozen reference)."""
    from megatron.core.distributed import DistributedDataParallel

    if not isinstance(chunk, DistributedDataParallel):
        return []
    return chunk.buffers + chunk.expert_parallel_buffers


def _grad_buffer_bytes(ddp_chunks: list) -> int:
    """Bytes currently allocated by the DDP chunks' contiguous gradient buffers."""
    total = 0
    for chunk in ddp_chunks:
        for buffer in _ddp_buffers(chunk):
            if buffer.grad_data is not None:
                total += buffer.grad_data.untyped_storage().nbytes()
    return total


def _optimizer_gpu_bytes(optimizer) -> int:
    """Bytes of the optimizer's parameters and state that live on a GPU (what offload_to_cpu moves)."""
    seen, total = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.is_cuda and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    total += value.numel() * value.element_size()
    return total


def _optimizer_slots(optimizer):
    """(container, key) of every tensor offload_to_cpu would move: parameters (their .data) and state entries."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if inner is None or getattr(part, "is_stub_optimizer", False):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if isinstance(p, torch.Tensor):
                    yield p, None
        for state in inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield state, key


class PinnedOffload:
    """The optimizer's CUDA tensors to reusable pinned host buffers and back (see the module docstring)."""

    def __init__(self):
        self._buffers: dict = {}  # slot id -> pinned host tensor, reused every step
        self._moved: list = []  # (container, key, device) offloaded now

    @staticmethod
    def _get(container, key):
        return container.data if key is None else container[key]

    @staticmethod
    def _set(container, key, value) -> None:
        if key is None:
            container.data = value
        else:
            container[key] = value

    def offload(self, optimizer) -> None:
        for container, key in _optimizer_slots(optimizer):
            t = self._get(container, key)
            if not t.is_cuda:
                continue
            slot = (id(container), key)
            buf = self._buffers.get(slot)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._buffers[slot] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            buf.copy_(t, non_blocking=True)
            self._moved.append((container, key, t.device))
            self._set(container, key, buf)
        if self._moved:
            torch.cuda.synchronize()  # the host copies are complete before the GPU memory is handed over

    def restore(self) -> None:
        for container, key, device in self._moved:
            self._set(container, key, self._get(container, key).to(device, non_blocking=True))
        if self._moved:
            torch.cuda.synchronize()  # before the pinned buffers are written again
        self._moved = []


class MemoryHandoff:
    """Offload / restore a Trainer's GPU state around rollout (see the module docstring for the order).

    trainer: the policy `Trainer` (DDP chunks in `.model`, megatron optimizer in `.optimizer`);
    ref_trainer: the frozen reference or None (its parameters move only with `offload_params`);
    offload_params: `train.offload_params`; offload_optimizer: `train.offload_optimizer` (False: the optimizer
    state stays on the GPU, only the gradient buffers are freed). Calls are idempotent: offloading twice moves
    nothing the second time.
    """

    def __init__(self, trainer, ref_trainer=None, offload_params: bool = False, offload_optimizer: bool = True):
        self.trainer, self.ref_trainer, self.move_params = trainer, ref_trainer, offload_params
        self.move_optimizer = offload_optimizer
        self._pinned = PinnedOffload()
        self.state_offloaded = False
        self.params_offloaded = False
        self._cpu_params: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []  # (param, cpu copy, device)

    # ------------------------------------------------------------------ calls
    def offload(self) -> dict:
        """Gradient buffers and optimizer state off the GPU (parameters stay: the weight sync reads them)."""
        t0 = time.perf_counter()
        # peak since the last restore: the train phase (0 without CUDA)
        metrics = {"memory/train_peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB}
        if self.params_offloaded:  # e.g. an engine restart re-syncs during rollout: the sync needs the weights
            metrics.update(self._restore_params())
        if not self.state_offloaded:
            grad_bytes = _grad_buffer_bytes(self.trainer.model)
            opt_bytes = _optimizer_gpu_bytes(self.trainer.optimizer) if self.move_optimizer else 0
            # drop the main params' .grad (views into the grad buffers) before their .data moves: the next step
            # zeroes the gradients anyway
            self.trainer.optimizer.zero_grad(set_to_none=True)
            for chunk in self.trainer.model:
                chunk.offload_grad_buffers(synchronize=True, empty_cache=False)
            if self.move_optimizer:
                self._pinned.offload(self.trainer.optimizer)
            self.state_offloaded = True
            metrics["memory/grad_buffers_freed_gib"] = (grad_bytes - _grad_buffer_bytes(self.trainer.model)) / GiB
            metrics["memory/optimizer_offloaded_gib"] = opt_bytes / GiB
        free_cached_memory()
        metrics["perf/offload_s"] = time.perf_counter() - t0
        metrics.update(gpu_memory("offloaded"))
        return metrics

    def offload_params(self) -> dict:
        """After the weight sync, before the KV cache resumes: with `train.offload_params` the policy's (and the
        reference's) parameters go to CPU; in any case the sync's freed buffers go back to CUDA for the engine."""
        t0 = time.perf_counter()
        metrics = {}
        if self.move_params and not self.params_offloaded:
            moved = sum(self._offload_chunk_params(chunks) for chunks in self._param_owners())
            self.params_offloaded = True
            metrics["memory/params_offloaded_gib"] = moved / GiB
        free_cached_memory()
        metrics["perf/offload_params_s"] = time.perf_counter() - t0
        metrics.update(gpu_memory("rollout_trainer"))  # what the trainer leaves on the GPU for the KV cache
        return metrics

    def restore(self) -> dict:
        """Everything back on the GPU for training; grad buffers come back zeroed."""
        t0 = time.perf_counter()
        metrics = self._restore_params() if self.params_offloaded else {}
        if self.state_offloaded:
            if self.move_optimizer:
                self._pinned.restore()
            for chunk in self.trainer.model:
                chunk.restore_grad_buffers(synchronize=True)
            self.state_offloaded = False
        metrics["perf/restore_s"] = time.perf_counter() - t0
        metrics.update(gpu_memory("restored"))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # memory/train_peak_allocated_gib at the next offload
        return metrics

    # ------------------------------------------------------------------ parameters
    def _param_owners(self) -> list:
        owners = [self.trainer.model]
        if self.ref_trainer is not None:
            owners.append(self.ref_trainer.model)
        return owners

    def _offload_chunk_params(self, chunks: list) -> int:
        moved = 0
        for chunk in chunks:
            in_buffers = set()
            for buffer in _ddp_buffers(chunk):
                if buffer.param_data is not None:  # parameters are views into it (distributed optimizer)
                    moved += buffer.param_data.untyped_storage().nbytes() if buffer.param_data.is_cuda else 0
                    buffer.offload_to_cpu(move_params=True, move_grads=False)
                    in_buffers.update(id(p) for p in buffer.params)
            for p in chunk.parameters():
                if id(p) in in_buffers or not p.is_cuda:
                    continue
                copy = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
                copy.copy_(p.data, non_blocking=True)
                self._cpu_params.append((p, copy, p.device))
                moved += p.numel() * p.element_size()
                p.data = copy
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return moved

    def _restore_params(self) -> dict:
        t0 = time.perf_counter()
        for chunks in self._param_owners():
            for chunk in chunks:
                for buffer in _ddp_buffers(chunk):
                    if buffer.param_data is not None:
                        buffer.reload_from_cpu(move_params=True, move_grads=False)
        for p, copy, device in self._cpu_params:
            p.data = copy.to(device, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._cpu_params = []
        self.params_offloaded = False
        return {"perf/restore_params_s": time.perf_counter() - t0}


"""Process-group setup: torch.distributed (gloo on CPU, nccl on GPU) plus megatron's model-parallel groups and RNG.

``initialize`` returns a ``ParallelState`` that other code passes explicitly (no component reads the
parallel degrees from a global config). The layout order is megatron's default ``tp-cp-ep-dp-pp``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rence.config import ParallelConfig
from megatron_rence.megatron import cpu_compat


@dataclass
class ParallelState:
    """This rank's place in the layout and its process groups (megatron's, passed explicitly)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vpp_size: Optional[int]
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # data parallel without context parallel
    dp_cp_group: dist.ProcessGroup  # data x context parallel: gradients are averaged over this group
    mp_group: dist.ProcessGroup  # tensor x pipeline (x context): the grad-norm group
    embedding_group: Optional[dist.ProcessGroup]  # first + last pipeline stage (tied embeddings)
    device: torch.device
    seed: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(use_cuda: bool, timeout_minutes: int) -> None:
    """From torchrun/srun-style env vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), else one local process."""
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not")
        rank, world_size, init_method = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://"
    else:
        # a world of one: its own rendezvous on a fresh port, not a MASTER_PORT left in the environment (it may
        # be taken) and not one written there: every process started later would inherit it (sbatch exports
        # it, and rence.sbatch uses a MASTER_PORT it is given: every job submitted from here would share it)
        rank, world_size, init_method = 0, 1, f"tcp://127.0.0.1:{free_port()}"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)


def initialize(parallel_cfg: ParallelConfig, seed: int, timeout_minutes: int = 30) -> ParallelState:
    """Initialise torch.distributed (if needed), megatron's model-parallel groups and the RNGs.

    Without CUDA the CPU compatibility layer is applied first. Calling it again re-creates the megatron
    groups (the torch.distributed world is kept), which lets one process try several layouts.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.apply()
    if not dist.is_initialized():
        _init_process_group(use_cuda, timeout_minutes)
    world_size = dist.get_world_size()
    p = parallel_cfg
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ValueError(f"parallel: tp*pp*cp={p.tp}*{p.pp}*{p.cp}={model_parallel} does not divide "
                         f"the world size {world_size}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, context_parallel_size=p.cp,
        distributed_timeout_minutes=timeout_minutes)

    pp_rank = ps.get_pipeline_model_parallel_rank()
    # Same default-generator seed across TP/DP ranks of a stage (CPU init draws full weights from it).
    torch.manual_seed(seed + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank, force_reset_rng=True)

    return ParallelState(
        rank=dist.get_rank(), world_size=world_size,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=p.tp,
        pp_rank=pp_rank, pp_size=p.pp, vpp_size=p.vpp,
        cp_rank=ps.get_context_parallel_rank(), cp_size=p.cp,
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False),
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        seed=seed,
    )


def destroy(process_group: bool = True) -> None:
    """Tear down megatron's groups and (by default) the torch.distributed world; for tests and shutdown."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()

"""Cluster-launch checks of `rence-plan`: CPUs per task for the processes a rank starts, and whether the
signal lead time leaves room to write the preemption checkpoint.

CPUs: Slurm binds each task to its `--cpus-per-task` CPUs, and every process a rank starts shares them.
An engine owner runs, besides its trainer process, the SGLang engine's `rollout.sglang.tp` scheduler
processes and its detokenizer while it generates, then `reward.num_workers` grading workers (grading
starts when generation has ended). Short of CPUs, grading workers miss `reward.timeout_s` and correct
answers score as timeouts, so a shortfall is an error, not a slowdown.

Checkpoint time: a checkpoint holds every parameter once (megatron's torch_dist format deduplicates data
parallel replicas) in the model dtype plus Adam's state (fp32 master copy when the weights are 16-bit,
exp_avg, exp_avg_sq: 12 bytes per parameter, 8 for fp32 weights), written at the file system's aggregate
bandwidth. The bandwidth is an input (`--fs-gbps`); the default, 5 GB/s, is an assumption (a job's share
of a shared parallel file system is commonly a few GB/s), not a measurement: measure yours, e.g. with
`dd if=/dev/zero of=$RUN_ROOT/ddtest bs=1G count=32 oflag=direct`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rence.config import Config

DEFAULT_FS_GBPS = 5.0  # assumed aggregate write bandwidth (GB/s = 1e9 bytes/s); see the module docstring


@dataclass
class ClusterReport:
    lines: list[str] = field(default_factory=list)  # informational
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def checkpoint_bytes(cfg: Config, num_params: int) -> int:
    """Bytes of one training checkpoint: weights in the model dtype + Adam state (the reference model is not saved)."""
    weight_bytes = 4 if cfg.model.dtype == "fp32" else 2
    optimizer_bytes = 8 if weight_bytes == 4 else 12
    return num_params * (weight_bytes + optimizer_bytes)


def cpus_needed(cfg: Config) -> int:
    """CPUs an engine owner's task needs: its trainer process + max(engine processes, grading workers)."""
    engine = cfg.rollout.sglang.tp + 1 if cfg.rollout.engine == "sglang" else 0  # schedulers + detokenizer
    return 1 + max(engine, cfg.reward.num_workers)


def check_cluster(cfg: Config, num_params: int, cpus_per_task: int | None, grace_s: float | None,
                  fs_gbps: float = DEFAULT_FS_GBPS) -> ClusterReport:
    report = ClusterReport()
    if cpus_per_task is not None:
        need = cpus_needed(cfg)
        if cpus_per_task < need:
            report.errors.append(
                f"--cpus-per-task {cpus_per_task} < {need} CPUs an engine owner needs (1 trainer process + "
                f"max(rollout.sglang.tp + 1 engine processes, reward.num_workers={cfg.reward.num_workers})): "
                f"grading workers would miss reward.timeout_s; lower reward.num_workers or give each task more CPUs")
    if fs_gbps <= 0:
        report.errors.append(f"--fs-gbps must be > 0, got {fs_gbps}")
        return report
    size = checkpoint_bytes(cfg, num_params)
    seconds = size / (fs_gbps * 1e9)
    report.lines.append(f"checkpoint {size / 1e9:,.1f} GB: ~{seconds:,.0f} s to write at {fs_gbps:g} GB/s "
                        f"(--fs-gbps; an assumption unless you measured it)")
    if grace_s is not None and seconds > grace_s:
        report.warnings.append(
            f"the preemption checkpoint needs ~{seconds:,.0f} s at {fs_gbps:g} GB/s but the trainer gets "
            f"{grace_s:g} s after the signal (GRACE_S; keep #SBATCH --signal=B:USR1@<lead> about 60 s longer), "
            f"and the step in flight must end first: raise both, or checkpoint more often (checkpoint.every)")
    return report

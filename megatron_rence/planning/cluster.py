"""Cluster-launch checks of `rence-plan`: CPUs per task for the processes a rank starts, and whether each
way a Slurm job is stopped leaves the trainers time to write the stop checkpoint.

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

Stop windows: a stop signal lands anywhere in a step. With train.on_stop=finish_step the worst case is a
whole step in flight (rollout + training phase) and then the checkpoint; with abandon_step it is the longer
of the two phases (a rollout is finished, then dropped; a training phase is finished) and then the
checkpoint. Two windows decide whether that fits (slurm/README.md):
- the time-limit warning (`#SBATCH --signal=B:USR1@<lead>`): rence.sbatch gives the trainers GRACE_S
  (< the lead) before srun ends the step;
- KillWait (plain scancel, the hard time limit, a preemption without grace time, `scontrol requeue`):
  SIGTERM to every process, SIGKILL KillWait seconds later (Slurm's default 30 s).
A path whose window is shorter loses work: the job resumes from the last periodic checkpoint
(up to checkpoint.every - 1 steps back). The phase times are inputs (--rollout-s, --train-s: perf/rollout_s
and perf/step_s - perf/rollout_s of a run); without them only the checkpoint is counted.
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


@dataclass
class StopTimes:
    """What the stop-window check needs besides the recipe: the windows and the phase times, in seconds."""

    grace_s: float | None = None  # the time-limit warning path (GRACE_S)
    kill_wait_s: float | None = None  # KillWait
    rollout_s: float | None = None  # one rollout phase
    train_s: float | None = None  # the rest of a step: log-probs, training, weight sync


def stop_worst_cases(ckpt_s: float, times: StopTimes) -> dict[str, float]:
    """Seconds from a stop signal to the checkpoint on disk, in the worst case, per train.on_stop."""
    rollout, train = times.rollout_s or 0.0, times.train_s or 0.0
    return {"finish_step": rollout + train + ckpt_s, "abandon_step": max(rollout, train) + ckpt_s}


def check_stop_windows(cfg: Config, ckpt_s: float, times: StopTimes, report: ClusterReport) -> None:
    """A line per train.on_stop with its worst case against each window; a warning per window the recipe's
    on_stop does not fit, naming the stop path that would lose work."""
    worst = stop_worst_cases(ckpt_s, times)
    known = times.rollout_s is not None or times.train_s is not None
    step = (f"rollout {times.rollout_s or 0:,.0f} s + rest of the step {times.train_s or 0:,.0f} s" if known else
            "step time unknown (--rollout-s / --train-s): only the checkpoint is counted")
    report.lines.append(f"stop: {step}; worst case signal -> checkpoint on disk: finish_step "
                        f"~{worst['finish_step']:,.0f} s, abandon_step ~{worst['abandon_step']:,.0f} s")
    paths = (("time-limit warning (GRACE_S, under #SBATCH --signal=B:USR1@<lead>)", times.grace_s),
             ("plain scancel / hard time limit / preemption without grace / scontrol requeue (KillWait)",
              times.kill_wait_s))
    for name, window in paths:
        if window is None:
            continue
        verdicts = ", ".join(f"{mode} {'fits' if s <= window else 'LOSES WORK'} (~{s:,.0f} s)"
                             for mode, s in worst.items())
        report.lines.append(f"stop: {name}: {window:g} s: {verdicts}")
        mine = worst[cfg.train.on_stop]
        if mine > window:
            other = "abandon_step" if cfg.train.on_stop == "finish_step" else "finish_step"
            hint = (f"train.on_stop={other} needs ~{worst[other]:,.0f} s; " if worst[other] < mine else "")
            report.warnings.append(
                f"the {name} path would lose work: train.on_stop={cfg.train.on_stop} needs ~{mine:,.0f} s from the "
                f"signal to the checkpoint on disk but gets {window:g} s; the job resumes from the last periodic "
                f"checkpoint (checkpoint.every={cfg.checkpoint.every}). {hint}raise the window, or checkpoint more "
                f"often")


def check_cluster(cfg: Config, num_params: int, cpus_per_task: int | None, grace_s: float | None,
                  fs_gbps: float = DEFAULT_FS_GBPS, times: StopTimes | None = None) -> ClusterReport:
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
    times = times or StopTimes()
    if times.grace_s is None:
        times.grace_s = grace_s
    check_stop_windows(cfg, seconds, times, report)
    return report

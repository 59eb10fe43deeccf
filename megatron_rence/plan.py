"""`rence-plan RECIPE [overrides] --nodes N --gpus-per-node G`: check a layout and its per-GPU memory before a launch.

Runs on CPU in a second. Exit status: 0 when the layout is valid and fits, 1 when it does not fit in GPU
memory, 2 when the recipe or the layout is invalid; the reason goes to stderr. The memory model is
documented in ``megatron_rence/planning/memory.py``; the layout rules in ``planning/layout.py``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_rence.cli import handle_info_flags, load_or_exit, recipe_parser
from megatron_rence.config import Config
from megatron_rence.planning.layout import Layout, check_layout
from megatron_rence.planning.memory import GiB, PHASES, Hardware, MemoryPlan, memory_plan
from megatron_rence.planning.sync_cost import Bandwidth, SyncCost, sync_cost
from megatron_rence.planning.sync_phase import PhaseRates


@dataclass
class PlanReport:
    cfg: Config  # with the architecture resolved from model.hf_path when readable
    hw: Hardware
    layout: Layout
    memory: Optional[MemoryPlan]
    vocab_size: int
    notes: list[str] = field(default_factory=list)
    sync: Optional[SyncCost] = None  # weight-sync bytes and seconds (planning/sync_cost.py)

    @property
    def problems(self) -> list[str]:
        """Why the run would not start or not fit (empty when it is good to go)."""
        if self.layout.errors:
            return list(self.layout.errors)
        return _memory_problems(self.memory, self.cfg) if self.memory is not None else []

    @property
    def exit_code(self) -> int:
        return 2 if self.layout.errors else (1 if self.problems else 0)


def resolve_model(cfg: Config) -> tuple[Config, list[str]]:
    """Fill the architecture from model.hf_path's config.json when it is readable here; notes say what was used."""
    m = cfg.model
    if m.hf_path is None:
        return cfg, []
    if not (Path(m.hf_path) / "config.json").is_file():
        return cfg, [f"model.hf_path={m.hf_path} is not readable here: planning with the recipe's architecture "
                     f"fields (keep them equal to its config.json)"]
    from megatron_rence.weights.hf_config import model_config_from_hf

    fields = model_config_from_hf(m.hf_path)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **fields)), [f"architecture from {m.hf_path}"]


def resolve_vocab_size(cfg: Config) -> int:
    """model.vocab_size, or the tokenizer's size when it is 0 and the tokenizer can be built or read here."""
    m = cfg.model
    if m.vocab_size > 0:
        return m.vocab_size
    if m.tokenizer != "synthetic" and not Path(m.tokenizer).is_dir():
        return 0
    from megatron_rence.data.tokenizer import load_tokenizer

    return len(load_tokenizer(m))


def plan(cfg: Config, hw: Hardware, bw: Bandwidth = Bandwidth(), rates: Optional[PhaseRates] = None) -> PlanReport:
    """Layout checks and (when the layout is valid) the memory plan for `cfg` on `hw`."""
    cfg, notes = resolve_model(cfg)
    on_cpu = cfg.train.device == "cpu"
    vocab = resolve_vocab_size(cfg)
    layout = check_layout(cfg, hw, vocab, on_cpu)
    memory = None
    if not layout.errors:
        memory = memory_plan(cfg, hw, vocab, layout.dp, layout.num_microbatches, on_cpu=on_cpu)
    if cfg.train.device == "auto":
        notes.append("train.device=auto: planned for GPUs")
    sync = sync_cost(cfg, vocab, hw.world_size, hw.gpus_per_node, bw, rates) if not layout.errors else None
    return PlanReport(cfg, hw, layout, memory, vocab, notes, sync)


def _memory_problems(mem: MemoryPlan, cfg: Config) -> list[str]:
    problems = []
    e = mem.engine
    if e.kind == "sglang" and e.kv_bytes <= 0:
        problems.append(f"rollout.sglang.mem_fraction_static: the engine's weights ({e.weights_bytes / GiB:.1f} GiB "
                        f"per GPU at rollout.sglang.tp={e.tp}) leave no room for a KV cache in its static pool; "
                        f"raise rollout.sglang.tp or mem_fraction_static")
    worst = mem.worst
    if worst.peak > mem.gpu_bytes:
        phase = worst.peak_phase
        top = sorted((i for i in worst.items if phase in i.phases), key=lambda i: -i.bytes)[:4]
        parts = ", ".join(f"{i.name} {i.bytes / GiB:.1f}" for i in top)
        problems.append(f"does not fit: pipeline stage {worst.stage} needs {worst.peak / GiB:.1f} GiB per GPU in the "
                        f"{phase} phase > {mem.gpu_bytes / GiB:.0f} GiB (largest: {parts} GiB); try "
                        + ", ".join(_hints(cfg, phase)))
    return problems


def _hints(cfg: Config, phase: str) -> list[str]:
    """Changes that lower the peak of `phase`, leaving out those the recipe already has."""
    p = cfg.parallel
    hints = ["larger parallel.tp or parallel.pp (or more nodes)"]
    if not p.distributed_optimizer and not cfg.train.offload_params:  # the two exclude each other (config.py)
        hints.append("parallel.distributed_optimizer=true")
    if phase == "train":
        if p.recompute != "full":
            hints.append("parallel.recompute=full")
        if p.tp > 1 and not p.sequence_parallel:
            hints.append("parallel.sequence_parallel=true")
        hints.append("a smaller train.max_tokens_per_microbatch" if cfg.train.max_tokens_per_microbatch
                     else "a smaller train.micro_batch_size or train.max_seq_len")
    elif phase == "rollout":
        hints.append("a smaller rollout.sglang.mem_fraction_static")
        if not cfg.train.offload_params and not p.distributed_optimizer:
            hints.append("train.offload_params=true (not with parallel.distributed_optimizer)")
    else:
        hints.append("a smaller weights.bucket_bytes or a larger rollout.sglang.tp")
    return hints


def render(report: PlanReport, recipe: str) -> str:
    cfg, hw, lay, mem = report.cfg, report.hw, report.layout, report.memory
    p, t = cfg.parallel, cfg.train
    lines = [f"rence-plan: {recipe} on {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) (world {hw.world_size}), "
             f"{hw.gpu_mem_gb:g} GiB per GPU"]
    lines += [f"note      {n}" for n in report.notes]
    if mem is not None:
        mp = mem.params
        lines.append(f"model     {cfg.model.arch}: {mp.total:,} params = {_count(mp.total)} (embedding "
                     f"{_count(mp.embedding)}, {mp.num_layers} layers x {_count(mp.layer.total)}, output "
                     f"{_count(mp.output) if mp.output else 'tied'}); vocab {report.vocab_size} -> "
                     f"{mem.padded_vocab} padded")
        lines.append(f"layout    tp={p.tp} pp={p.pp} cp={p.cp} vpp={p.vpp or '-'} dp={lay.dp} "
                     f"sp={'on' if p.sequence_parallel else 'off'} recompute={p.recompute} "
                     f"dist-opt={'on' if p.distributed_optimizer else 'off'}; {lay.num_microbatches} microbatches x "
                     f"{'whole groups packed' if t.max_tokens_per_microbatch else f'{t.micro_batch_size} seqs'}, "
                     f"{mem.tokens_per_microbatch} tokens per microbatch per GPU")
        e = mem.engine
        engine = f"engine    {e.kind} tp={e.tp}, {e.num_engines} engine(s), {e.sequences_per_engine} sequences each"
        if e.kind == "sglang" and e.kv_bytes > 0:
            engine += (f"; KV cache {e.kv_bytes / GiB:.2f} GiB/GPU = {e.kv_tokens:,} tokens "
                       f"({e.kv_tokens // t.max_seq_len} sequences of {t.max_seq_len}), "
                       f"{mem.kv_tokens_after_restart:,} after a restart")
        lines.append(engine)
        lines.append(f"rollout   trainer keeps {mem.rollout_trainer_resident / GiB:.2f} GiB/GPU during rollout; "
                     f"a step's sequences at full length need {e.kv_tokens_needed:,} KV tokens per engine")
        lines.extend(_table(mem))
    if report.sync is not None:
        lines.append(_sync_line(report.sync))
        if report.sync.phase is not None:
            lines.append(_phase_line(report.sync))
    lines += [f"warning   {w}" for w in lay.warnings + (_kv_warnings(mem) if mem is not None else [])]
    problems = report.problems
    lines += [f"error     {msg}" for msg in problems]
    if not problems:
        lines.append(f"ok        fits: peak {mem.worst.peak / GiB:.1f} GiB of {hw.gpu_mem_gb:g} GiB "
                     f"({mem.worst.peak_phase} phase, pipeline stage {mem.worst.stage})")
    return "\n".join(lines)


def _kv_warnings(mem: MemoryPlan) -> list[str]:
    e = mem.engine
    if e.kind != "sglang" or e.kv_bytes <= 0:
        return []
    out = []
    if e.kv_tokens < e.kv_tokens_needed:
        out.append(f"rollout.sglang.mem_fraction_static: the KV cache holds {e.kv_tokens:,} of the "
                   f"{e.kv_tokens_needed:,} tokens of a step's sequences at full length: SGLang queues the rest")
    elif mem.kv_tokens_after_restart < e.kv_tokens_needed:
        out.append(f"rollout.sglang.mem_fraction_static: an engine restarted next to the trainer's rollout residue "
                   f"holds {mem.kv_tokens_after_restart:,} of the {e.kv_tokens_needed:,} KV tokens a step needs")
    return out


def _sync_line(c: SyncCost) -> str:
    busiest = c.counts[c.busiest_rank]
    return (f"sync      weights: est. {c.estimate_s:.2f} s per sync (transfers {c.transfer_s:.2f}, engine load "
            f"{c.engine_s:.2f}, latency {c.latency_s:.2f}); busiest rank {c.busiest_rank} sends "
            f"{busiest.sent / 1e9:.1f} GB ({busiest.sent_inter / 1e9:.1f} inter-node), max per rank "
            f"{c.max_rank_send / 1e9:.1f} GB; model {c.model_bytes / 1e9:.1f} GB")


def _phase_line(c: SyncCost) -> str:
    ph = c.phase
    terms = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in ph.terms.items())
    return (f"sync      phase: est. {ph.phase_estimate_s:.2f} s per step ({terms}); {ph.buckets} buckets, "
            f"{ph.engine_calls} engine calls")


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _table(mem: MemoryPlan) -> list[str]:
    worst = mem.worst
    rows = [f"memory    per GPU in GiB, pipeline stage {worst.stage} of {len(mem.stages)} (the worst)",
            f"  {'item':<26}{'rollout':>9}{'train':>9}{'sync':>9}  note"]
    for item in worst.items:
        cells = "".join(f"{item.bytes / GiB:>9.2f}" if ph in item.phases else f"{'-':>9}" for ph in PHASES)
        rows.append(f"  {item.name:<26}{cells}  {item.note}")
    rows.append(f"  {'total':<26}" + "".join(f"{worst.totals[ph] / GiB:>9.2f}" for ph in PHASES))
    return rows


def to_json(report: PlanReport) -> dict:
    mem = report.memory
    out = {"world_size": report.layout.world_size, "dp": report.layout.dp,
           "num_microbatches": report.layout.num_microbatches, "errors": report.layout.errors,
           "warnings": report.layout.warnings, "problems": report.problems, "notes": report.notes}
    if mem is not None:
        worst = mem.worst
        out.update(num_params=mem.params.total, padded_vocab=mem.padded_vocab, fits=not report.problems,
                   peak_gib=worst.peak / GiB, peak_phase=worst.peak_phase, worst_stage=worst.stage,
                   kv_tokens=mem.engine.kv_tokens, kv_tokens_needed=mem.engine.kv_tokens_needed,
                   kv_tokens_after_restart=mem.kv_tokens_after_restart,
                   rollout_trainer_resident_gib=mem.rollout_trainer_resident / GiB,
                   items={i.name: i.bytes / GiB for i in worst.items},
                   totals_gib={ph: worst.totals[ph] / GiB for ph in PHASES})
    if report.sync is not None:
        out["sync"] = report.sync.to_json()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = recipe_parser("rence-plan", "Check a recipe's parallel layout on a cluster and print per-GPU memory.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=Hardware.gpu_mem_gb,
                        help="GiB per GPU (default 79.65: H100 80GB HBM3, 81,559 MiB)")
    parser.add_argument("--context-gb", type=float, default=Hardware.context_gb,
                        help="GiB per GPU taken before SGLang sizes its pool: the trainer's and the engine's CUDA "
                             "contexts and NCCL setup (an estimate until measured)")
    parser.add_argument("--reserve-gb", type=float, default=6.0,
                        help="GiB per GPU kept free in every phase: CUDA contexts, NCCL, CUDA graphs, fragmentation")
    parser.add_argument("--engine-residue-gb", type=float, default=1.0,
                        help="GiB per GPU an SGLang engine keeps after releasing its memory "
                             "(context, NCCL, workspaces)")
    parser.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="megatron main-grad buffer dtype (fp32 = grad_reduce_in_fp32)")
    parser.add_argument("--unfused-attention", action="store_true",
                        help="count the s^2 softmax activations (no flash/fused attention)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_cluster_args(parser)
    add_rate_args(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(args)
    if handle_info_flags(args, cfg):
        return 0
    hw = Hardware(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb,
                  context_gb=args.context_gb, reserve_gb=args.reserve_gb, engine_residue_gb=args.engine_residue_gb,
                  grad_dtype=args.grad_dtype, flash_attention=not args.unfused_attention)
    report = plan(cfg, hw, Bandwidth(allgather_busbw_gbps=args.allgather_busbw_gbps, ib_gbps=args.ib_gbps,
                                     hbm_gbps=args.hbm_copy_gbps), rates_from_args(args))
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(render(report, args.recipe))
    for msg in report.problems:
        print(f"error: {msg}", file=sys.stderr)
    return max(report.exit_code, cluster_checks(report, args))


def add_rate_args(parser) -> None:
    """The rates of the weight-sync cost model (planning/sync_cost.py, sync_phase.py; sources in
    docs/performance.md): defaults are H100 SXM figures, override them with your cluster's measurements."""
    parser.add_argument("--allgather-busbw-gbps", type=float, default=Bandwidth.allgather_busbw_gbps,
                        help="nccl-tests all_gather_perf bus bandwidth within a node, GB/s (default: 8 x H100)")
    parser.add_argument("--ib-gbps", type=float, default=Bandwidth.ib_gbps,
                        help="GB/s per GPU and direction between nodes (default: NDR 400 Gb/s, as measured)")
    parser.add_argument("--hbm-copy-gbps", type=float, default=Bandwidth.hbm_gbps,
                        help="device-to-device copy GB/s (default: H100 HBM3 3.35 TB/s / 2)")
    parser.add_argument("--host-pageable-gbps", type=float, default=PhaseRates.host_pageable_gbps,
                        help="GPU <-> pageable host memory GB/s, train.offload_params (default: an assumption)")
    parser.add_argument("--bucket-overhead-ms", type=float, default=PhaseRates.bucket_fixed_s * 1e3,
                        help="fixed ms per flattened bucket handed to SGLang (default: measured on CPU, a floor)")
    parser.add_argument("--engine-resume-s", type=float, default=PhaseRates.engine_resume_s,
                        help="seconds for SGLang to resume its weights and KV cache (default: an assumption)")
    parser.add_argument("--engine-release-s", type=float, default=PhaseRates.engine_release_s,
                        help="seconds for SGLang to release its memory (default: an assumption)")


def rates_from_args(args) -> PhaseRates:
    return PhaseRates(host_pageable_gbps=args.host_pageable_gbps, hbm_copy_gbps=args.hbm_copy_gbps,
                      bucket_fixed_s=args.bucket_overhead_ms / 1e3, engine_resume_s=args.engine_resume_s,
                      engine_release_s=args.engine_release_s)


def add_cluster_args(parser) -> None:
    """Slurm launch checks (planning/cluster.py); slurm/rence.sbatch passes them."""
    from megatron_rence.planning.cluster import DEFAULT_FS_GBPS

    parser.add_argument("--cpus-per-task", type=int,
                        help="CPUs of each task: check they fit the engine + reward workers")
    parser.add_argument("--grace-s", type=float, help="seconds the trainers get after the time-limit warning (GRACE_S "
                        "of slurm/rence.sbatch): warn when the worst-case stop needs longer")
    parser.add_argument("--kill-wait-s", type=float, help="the cluster's KillWait (scancel, time limit, preemption "
                        "without grace, requeue): warn when the worst-case stop needs longer")
    parser.add_argument("--rollout-s", type=float, help="seconds of one rollout phase (perf/rollout_s of a run)")
    parser.add_argument("--train-s", type=float, help="seconds of the rest of a step (perf/step_s - perf/rollout_s)")
    parser.add_argument("--fs-gbps", type=float, default=DEFAULT_FS_GBPS, help="aggregate checkpoint write bandwidth "
                        f"in GB/s (default {DEFAULT_FS_GBPS:g}: an assumption, see planning/cluster.py)")


def cluster_checks(report: PlanReport, args) -> int:
    """Print the CPU and checkpoint-time checks (to stderr with --json); 2 when the CPUs do not fit, else 0."""
    from megatron_rence.planning.cluster import StopTimes, check_cluster

    if report.memory is None:
        return 0
    times = StopTimes(args.grace_s, args.kill_wait_s, args.rollout_s, args.train_s)
    checks = check_cluster(report.cfg, report.memory.params.total, args.cpus_per_task, args.grace_s, args.fs_gbps,
                           times)
    out = sys.stderr if args.json else sys.stdout
    for prefix, msgs in (("cluster  ", checks.lines), ("warning  ", checks.warnings), ("error    ", checks.errors)):
        for msg in msgs:
            print(f"{prefix} {msg}", file=out)
    for msg in checks.errors:
        print(f"error: {msg}", file=sys.stderr)
    return 2 if checks.errors else 0


if __name__ == "__main__":
    sys.exit(main())

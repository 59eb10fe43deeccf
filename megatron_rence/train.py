"""Training entry point: `python -m megatron_rence.train RECIPE [overrides] [--print-config|--dry-run|--resume]`.

One step, as in docs/design.md: prompts -> engine.generate(K) -> rewards -> groups -> release engine memory
-> log-likelihoods -> objective -> optimizer step -> weight sync -> metrics; evaluation every
`eval.every` steps, a checkpoint every `checkpoint.every` steps and on SIGTERM / SIGUSR1 / Ctrl-C (after the
step in flight, or instead of it with train.on_stop=abandon_step; `perf/stop_to_checkpoint_s` times it).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_rence.cli import handle_info_flags, load_or_exit, recipe_parser, set_cpu_threads
from megatron_rence.config import Config, ConfigError, check_world_size
from megatron_rence.recipe import save_resolved


@dataclass
class Run:
    """Every component of a run, built once by `setup`."""

    cfg: Config
    pstate: Any
    tokenizer: Any
    trainer: Any
    ref_trainer: Any
    objective: Any
    dataset: Any
    engine: Any  # None on ranks outside every engine group
    engine_index: int  # -1 except on engine owners (they generate)
    num_engines: int
    engine_ranks: list[int]  # every rank that receives the full weights each sync
    vocab_size: int
    reward_pool: Any
    logger: Any  # None except on rank 0
    start_step: int
    handoff: Any = None  # megatron.offload.MemoryHandoff: the trainer's GPU state around rollout
    barrier: Any = None  # phases.HandoffBarrier: orders the hand-off across the ranks of this rank's engine group
    health: Any = None  # health.RunHealth: non-finite / collapsed steps (its counters are checkpointed)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; the loop checkpoints at the end of the step and exits.

    The signals usually reach every process of the job (Slurm, `kill -- -PGID`): the processes we start
    ignore them and die with this one (lifecycle.py), so they are still there for the checkpoint.

    A context manager: on exit the handlers this process had before come back and forks are plain again, or,
    with `ignore_after` (the trainer program on its way out: rence.sbatch repeats the time-limit warning every
    5 s), SIGTERM / SIGUSR1 are ignored from then on. Ignoring is inherited through exec, so only the program
    may leave it behind: a caller in the same process (a test, a notebook) would start shells that cannot trap
    those signals."""

    def __init__(self, ignore_after: bool = False):
        self.signum: Optional[int] = None
        self.at: Optional[float] = None  # time.monotonic() of the first stop signal
        self.ignore_after = ignore_after
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        from megatron_rence.lifecycle import STOP_SIGNALS, install_fork_hook

        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        install_fork_hook()
        return self

    def __exit__(self, *exc) -> None:
        from megatron_rence.lifecycle import remove_fork_hook

        remove_fork_hook()
        for sig, previous in self._previous.items():
            ignore = self.ignore_after and sig in (signal.SIGTERM, signal.SIGUSR1)
            signal.signal(sig, signal.SIG_IGN if ignore else previous)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        if self.signum is None:
            self.at = time.monotonic()
        self.signum = signum

    def since(self) -> float:
        """Seconds since the first stop signal."""
        return time.monotonic() - self.at if self.at is not None else float("nan")


class RunHistory(list):
    """The step metrics of a run; `stopped_at` is the last checkpointed step when a stop signal ended the run
    before `train.num_steps` (None otherwise)."""

    stopped_at: Optional[int] = None


def setup(cfg: Config, resume: bool) -> Run:
    from megatron_rence.data.benchmarks import check_benchmarks
    from megatron_rence.data.prompts import PromptDataset
    from megatron_rence.data.tokenizer import load_tokenizer
    from megatron_rence.evaluate import reconcile_summary
    from megatron_rence.health import RunHealth
    from megatron_rence.megatron import checkpoint, parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.megatron.offload import MemoryHandoff
    from megatron_rence.megatron.step import Trainer
    from megatron_rence.metrics import MetricsLogger
    from megatron_rence.objectives import get_objective
    from megatron_rence.rewards.pool import RewardPool
    from megatron_rence.phases import (HandoffBarrier, engine_feed_ranks, engine_layout, engine_process_group,
                                       wait_for_every_engine)
    from megatron_rence.rollout.engine import build_engine
    from megatron_rence.weights.hf_config import to_hf_config

    pstate = parallel.initialize(cfg.parallel, cfg.train.seed)
    check_world_size(cfg, pstate.world_size)
    threads = set_cpu_threads(cfg.train.num_threads)
    if pstate.rank == 0:
        print(f"torch threads per process: {threads} (train.num_threads={cfg.train.num_threads})", flush=True)
    tokenizer = load_tokenizer(cfg.model)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer ({cfg.model.tokenizer}: "
                          f"{len(tokenizer)} tokens)")
    # the inputs first: a bad data or benchmark file fails before any model is built, not at the first eval
    dataset = PromptDataset(cfg.data, tokenizer)
    check_benchmarks(cfg.eval, cfg.data.synthetic)
    # the engine starts before the trainer allocates: SGLang sizes its pool as mem_fraction_static of the GPU
    # memory free at its start (planning/memory.py assumes the same), then rests until the first sync
    engine_index, num_engines = engine_layout(cfg, pstate.rank, pstate.world_size)
    engine = reward_pool = None
    in_group, group = engine_process_group(cfg, pstate.rank, pstate.world_size)
    if in_group:
        hf_config = to_hf_config(cfg.model, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
        engine = build_engine(cfg, hf_config, tokenizer, group=group)
        engine.release_memory()
    wait_for_every_engine()  # no rank allocates before every engine of the job started and released its memory
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab_size), pstate, vocab_size,
                      pad_id=tokenizer.pad_token_id)
    objective = get_objective(cfg.objective)
    ref_trainer = None
    if objective.needs_ref:
        ref_trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab_size), pstate, vocab_size,
                              frozen=True, pad_id=tokenizer.pad_token_id)
    if pstate.rank == 0:
        print(dataset.summary(), flush=True)
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")
    resuming = resume and checkpoint.latest(ckpt_dir) is not None
    if resume and not resuming:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    source = "random init"
    if not resuming or ref_trainer is not None:  # the starting weights are also the reference
        source = load_starting_weights(cfg, trainer, vocab_size, pstate)
    if ref_trainer is not None:
        ref_trainer.copy_weights_from(trainer)
    health = RunHealth(cfg.train.max_nonfinite_steps)  # NaN / inf steps in a row stop the run
    start_step = 0
    if resuming:
        start_step, loaded = resume_from(ckpt_dir, cfg, trainer, ref_trainer, dataset, objective, health)
        source = f"{loaded} (checkpoint, resumed)"  # after a corrupt latest: the one actually loaded
    resume_step = start_step if resuming else None
    if pstate.rank == 0:
        print(f"start: weights from {source} {trainer.precision()}", flush=True)
    if engine_index is not None:
        reward_pool = RewardPool(cfg.reward)
    logger = None
    if pstate.rank == 0:
        save_resolved(cfg, cfg.train.run_dir)
        reconcile_summary(Path(cfg.eval.out_dir or Path(cfg.train.run_dir) / "eval"), resume_step)
        logger = MetricsLogger(cfg.logging, cfg.train.run_dir, cfg.train.num_steps, start_step, resume_step)
    return Run(cfg, pstate, tokenizer, trainer, ref_trainer, objective, dataset, engine,
               engine_index if engine_index is not None else -1, num_engines,
               engine_feed_ranks(cfg, pstate.world_size), vocab_size, reward_pool, logger, start_step,
               MemoryHandoff(trainer, ref_trainer, cfg.train.offload_params, cfg.train.offload_optimizer),
               HandoffBarrier(group), health)


def load_starting_weights(cfg: Config, trainer, vocab_size: int, pstate) -> str:
    """checkpoint.load (weights only), else model.hf_path's safetensors, else the seeded random init stays;
    returns where the weights came from (for the `start:` line)."""
    if cfg.checkpoint.load:
        trainer.load(cfg.checkpoint.load, weights_only=True)
        return f"{cfg.checkpoint.load} (checkpoint)"
    if cfg.model.hf_path:
        from megatron_rence.weights.convert import init_from_hf

        init_from_hf(trainer.model_chunks, cfg.model, vocab_size, pstate)
        trainer.reload_main_params()  # or the first optimizer step restores the random init (bf16 / fp16)
        return f"{cfg.model.hf_path} (hf)"
    return f"random init (train.seed={cfg.train.seed})"


def resume_from(ckpt_dir: Path, cfg: Config, trainer, ref_trainer, dataset, objective, health) -> tuple[int, str]:
    """Weights, optimizer, RNG, data position, objective and health state of the newest intact checkpoint;
    returns its step and directory."""
    state = trainer.load(ckpt_dir)  # the newest intact checkpoint (a corrupt one is skipped with a warning)
    step = state["step"]
    dataset.load_state_dict(state["data"])
    objective.load_state_dict(state["objective"])
    health.load_state_dict(state.get("health", {}))
    print(f"resumed from {state['checkpoint']} at step {step}")
    every = cfg.objective.ref_update_every
    if ref_trainer is not None and every:  # semi-online DPO: the reference is not in the checkpoint
        ref_trainer.copy_weights_from(trainer)
        if step % every:
            print(f"objective.ref_update_every={every}: the reference restarts from the resumed policy "
                  f"(step {step}), not from step {step - step % every}")
    return step, state["checkpoint"]


def sync_weights(run: Run, version: int) -> dict:
    """Trainer shards -> HF layout buckets -> the engine, in place; the trainer's gradients and optimizer
    state leave the GPU first (and its parameters after, with train.offload_params) until `handoff.restore`.
    At each switch between trainer and engine the ranks of the engine group wait for each other (run.barrier)."""
    from megatron_rence.phases import check_engine_sync
    from megatron_rence.weights.sync import push_weights

    offload = run.handoff.offload()
    run.barrier()  # every rank of the engine group has offloaded before the engine takes memory back
    if run.engine is not None:
        run.engine.resume_memory(tags=["weights"])
    run.barrier()  # the engine's weight memory is back before any rank allocates sync buffers
    chunks, model_cfg = run.trainer.model_chunks, run.cfg.model
    fp8 = run.cfg.rollout.sglang.fp8_weights
    metrics = push_weights(chunks, model_cfg, run.vocab_size, run.engine, version, run.cfg.weights.bucket_bytes,
                           run.pstate, run.engine_ranks, fp8=fp8, overlap=run.cfg.weights.overlap_gather)
    metrics.update(offload)
    metrics.update(run.handoff.offload_params())  # train.offload_params; frees the sync's buffers
    run.barrier()  # ... on every rank before the KV cache comes back
    if run.engine is not None:
        run.engine.resume_memory(tags=["kv_cache"])
    if run.cfg.train.debug_check_sync:
        metrics.update(check_engine_sync(chunks, model_cfg, run.vocab_size, run.engine, run.pstate, run.engine_ranks,
                                         fp8))
    return metrics


def train_step(run: Run, step: int, abandon_if=None) -> Optional[dict]:
    """One step; None when `abandon_if()` holds on any rank once the rollout is done (train.on_stop=abandon_step):
    the step stops before its training phase, with the weights and optimizer as the previous step left them."""
    from megatron_rence.config import samples_per_prompt
    from megatron_rence.phases import rollout_phase, sampling_params, train_phase

    t0 = time.perf_counter()
    cfg = run.cfg
    prompts = run.dataset.next_batch(cfg.rollout.prompts_per_step)
    restarts = 0.0
    while True:
        exp, metrics = rollout_phase(prompts, run.engine, run.reward_pool, sampling_params(cfg, step),
                                     samples_per_prompt(cfg), run.engine_index, run.num_engines,
                                     cfg.objective.positive_threshold)
        if exp is not None:
            break
        restarts += metrics["engine/restarts"]  # an engine restarted with dummy weights: push them again
        if restarts > cfg.rollout.sglang.max_restarts * run.num_engines:
            raise RuntimeError(f"the rollout engines restarted {restarts:.0f} times in step {step} "
                               "(rollout.sglang.max_restarts); see the SGLang logs")
        sync_weights(run, version=step - 1)  # the weights the step started from
    metrics["engine/restarts"] = restarts
    if run.engine is not None:
        run.engine.release_memory()
    run.barrier()  # the engine has released its memory before any rank of its group restores training state
    metrics.update(run.handoff.restore())
    if abandon_if is not None and run.trainer.any_rank(abandon_if()):
        return None
    metrics.update(train_phase(exp, run.trainer, run.ref_trainer, run.objective, cfg))
    every = cfg.objective.ref_update_every
    if run.ref_trainer is not None and every and step % every == 0:  # semi-online DPO
        run.ref_trainer.copy_weights_from(run.trainer)
        metrics["train/ref_updated"] = 1.0
    run.objective.update_after_step(metrics)
    metrics.update(sync_weights(run, version=step))  # version = optimizer updates applied
    metrics.update(run.barrier.metrics())
    metrics["perf/step_s"] = time.perf_counter() - t0
    return metrics


def save(run: Run, step: int) -> None:
    from megatron_rence.rundir import forget_previous_run

    run.trainer.save(Path(run.cfg.checkpoint.dir or Path(run.cfg.train.run_dir) / "checkpoints"), step,
                     {"step": step, "data": run.dataset.state_dict(), "objective": run.objective.state_dict(),
                      "health": run.health.state_dict()},
                     keep_last=run.cfg.checkpoint.keep_last)
    if run.pstate.rank == 0:
        forget_previous_run(run.cfg)  # train.overwrite: the old run, set aside until now, is removed


def maybe_evaluate(run: Run, step: int) -> dict:
    """Every `eval.every` steps and at the last step (collective): each engine evaluates its share of the
    problems, as in rollout; rank 0 writes the reports and returns the metrics."""
    from megatron_rence.evaluate import evaluate
    from megatron_rence.phases import gather_objects

    e = run.cfg.eval
    if not (e.every and e.benchmarks and (step % e.every == 0 or step == run.cfg.train.num_steps)):
        return {}
    out_dir = Path(e.out_dir or Path(run.cfg.train.run_dir) / "eval")
    engine = run.engine if run.engine_index >= 0 else None
    metrics = evaluate(engine, run.tokenizer, e, run.cfg.data, run.reward_pool, out_dir, step=step,
                       shard=(max(run.engine_index, 0), run.num_engines), gather=gather_objects,
                       write=run.pstate.rank == 0,
                       progress=run.cfg.logging.progress_bar and run.pstate.rank == 0)
    return metrics if run.pstate.rank == 0 else {}


def evaluate_at_start(run: Run) -> None:
    """eval.at_start: the starting weights before step 1 (reports under eval/step_000000, a summary.jsonl line)."""
    metrics = maybe_evaluate(run, 0)
    keys = (f"avg@{run.cfg.eval.num_samples}", "fallback_frac")
    if metrics:
        print("eval at start: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.endswith(keys)),
              flush=True)


def run_training(cfg: Config, resume: bool = False, stop: Optional[StopFlag] = None) -> list[dict]:
    """Train `cfg.train.num_steps` steps (from the latest checkpoint with `resume`); returns the step metrics.
    `stop`: an entered StopFlag (main's); without one the run installs its own for its duration."""
    from megatron_rence.rundir import claim_run_dir

    if stop is None:
        with StopFlag() as own:
            return run_training(cfg, resume, own)
    with claim_run_dir(cfg, resume):  # one run per run dir; a fresh launch never clobbers an earlier run
        return _train_loop(cfg, resume, stop)


def _train_loop(cfg: Config, resume: bool, stop: StopFlag) -> RunHistory:
    deadline = time.monotonic() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    run = setup(cfg, resume)
    health = run.health  # NaN / inf steps in a row stop the run (its counters are checkpointed)
    history, saved = RunHistory(), run.start_step
    try:
        sync_weights(run, version=run.start_step)  # the engine starts from the trainer's weights
        if cfg.eval.at_start and run.start_step == 0:
            evaluate_at_start(run)
        if run.trainer.any_rank(stop.signum is not None):  # signalled during setup: the resumed state is the stop
            history.stopped_at = _report_stop(run, stop, run.start_step, "before the first step")
        last = cfg.train.num_steps if history.stopped_at is None else run.start_step
        for step in range(run.start_step + 1, last + 1):
            metrics = _step_or_abandon(run, step, stop)
            if metrics is None:  # train.on_stop=abandon_step: the last completed step is the stop checkpoint
                if step - 1 > saved:
                    save(run, step - 1)
                history.stopped_at = _report_stop(run, stop, step - 1, f"step {step} abandoned (train.on_stop)")
                break
            failure = None
            try:  # the step's update is done: a failure from here on is checkpointed before it is raised
                metrics.update(maybe_evaluate(run, step))
                metrics.update(run.dataset.metrics())
                health.observe(step, metrics)
            except Exception as exc:
                failure = exc
            if run.trainer.any_rank(failure is not None):  # every rank saves, or none
                save_after_failure(run, step, failure)
            over_budget = deadline is not None and time.monotonic() >= deadline  # train.max_minutes
            stopping = run.trainer.any_rank(stop.signum is not None or over_budget)
            if stopping and stop.signum is not None:  # the stop checkpoint first: its time goes in this record
                save(run, saved := step)
                if stop.at is not None:
                    metrics["perf/stop_to_checkpoint_s"] = stop.since()
            if run.logger is not None:
                run.logger.log(step, metrics)
            history.append({"step": step, **metrics})
            health.stop_if_diverged()
            if saved < step and (stopping or step == cfg.train.num_steps or
                                 (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                save(run, saved := step)
            if stopping:
                if stop.signum is None:
                    print(f"train.max_minutes={cfg.train.max_minutes} reached: checkpoint written at step {step}; "
                          "exiting", flush=True)
                elif step < cfg.train.num_steps:
                    history.stopped_at = _report_stop(run, stop, step, "step finished")
                break
    finally:
        close(run)
    return history


def save_after_failure(run: Run, step: int, failure: Optional[BaseException]) -> None:
    """Step `step` failed after its optimizer update (evaluation, metrics) on some rank: write an emergency
    checkpoint of it, so that no completed step is lost, then raise (`failure`, or why this rank stops)."""
    if failure is not None:
        print(f"error: step {step} failed after its optimizer update ({type(failure).__name__}: {failure}); "
              f"writing a checkpoint of step {step}", file=sys.stderr, flush=True)
    try:
        save(run, step)
    except Exception as exc:
        print(f"error: the emergency checkpoint of step {step} failed too ({type(exc).__name__}: {exc})",
              file=sys.stderr, flush=True)
    else:
        if run.pstate.rank == 0:
            print(f"checkpoint written at step {step}: --resume continues from step {step + 1} (the evaluation "
                  f"and metrics of step {step} that failed are not redone)", flush=True)
    if failure is not None:
        raise failure
    raise RuntimeError(f"step {step}: another rank failed after the optimizer update (see its error)")


def _step_or_abandon(run: Run, step: int, stop: StopFlag) -> Optional[dict]:
    """train_step; with train.on_stop=abandon_step, None when a stop signal came before the step's training
    phase, with the data position and RNG states put back to the step's start (the weights and optimizer were
    not touched): the state after step - 1, exactly."""
    if run.cfg.train.on_stop != "abandon_step":
        return train_step(run, step)
    from megatron_rence.megatron.checkpoint import rng_state, set_rng_state

    data, rng = run.dataset.state_dict(), rng_state()
    metrics = train_step(run, step, abandon_if=lambda: stop.signum is not None)
    if metrics is None:
        run.dataset.load_state_dict(data)
        set_rng_state(rng)
    return metrics


def _report_stop(run: Run, stop: StopFlag, step: int, how: str) -> int:
    """The stop line, and `stops.jsonl` in the run dir (rank 0): step, signal, perf/stop_to_checkpoint_s (this
    rank's signal -> checkpoint on disk); returns `step`."""
    seconds = stop.since()
    if run.pstate.rank == 0:
        record = {"step": step, "signal": stop.signum, "on_stop": run.cfg.train.on_stop, "how": how,
                  "perf/stop_to_checkpoint_s": round(seconds, 4) if stop.at is not None else None,
                  "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}
        with open(Path(run.cfg.train.run_dir) / "stops.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    signal_name = signal.Signals(stop.signum).name if stop.signum else "stop signal on another rank"
    print(f"{signal_name}: {how}; checkpoint written at step {step}, on disk {seconds:.2f} s after the signal "
          "(perf/stop_to_checkpoint_s); exiting", flush=True)
    return step


def close(run: Run) -> None:
    """Flush the metrics, stop the grading workers and the engine (training state is already on disk)."""
    if run.logger is not None:
        run.logger.close()
    if run.reward_pool is not None:
        run.reward_pool.close()
    if run.engine is not None:
        run.engine.shutdown()


def main(argv: list[str] | None = None, program: bool = False) -> int:
    """The trainer's command line. `program`: this is the process's entry (`python -m megatron_rence.train`):
    stop signals that come after the run are ignored on the way out (StopFlag.ignore_after)."""
    parser = recipe_parser("rence-train", "Train with ReNCE / GRPO / DAPO / online DPO.")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    parser.add_argument("--stopped-exit", type=int, default=0, metavar="STATUS",
                        help="exit status when a stop signal ended the run (checkpointed) before train.num_steps; "
                             "slurm/rence.sbatch passes 75 to tell a stop from a finished run (default 0)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(args)
    if handle_info_flags(args, cfg):
        return 0
    from megatron_rence.health import NonFiniteTraining
    from megatron_rence.megatron.ckpt_integrity import CheckpointLoadError
    from megatron_rence.rundir import RunDirError

    try:
        with StopFlag(ignore_after=program) as stop:  # the run's state is on disk when this block is left
            history = run_training(cfg, resume=args.resume, stop=stop)
    except (RunDirError, CheckpointLoadError, NonFiniteTraining, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (RunDirError, CheckpointLoadError)) else 1
    except (ValueError, OSError) as exc:  # bad input (a data / benchmark file, a key), a full disk: the message
        print(f"error: {exc}", file=sys.stderr)  # names the file, line or key
        return 1
    if history and os.environ.get("RANK", "0") == "0":
        print(summary(cfg, history))
    return args.stopped_exit if history.stopped_at is not None else 0


def summary(cfg: Config, history: list[dict]) -> str:
    """The end-of-run lines: reward at the start and at the end (10-step means), where the plots went."""
    rewards = [r["reward/mean"] for r in history if "reward/mean" in r]
    first, last = rewards[:10], rewards[-10:]
    lines = [f"done: step {history[-1]['step']} reward/mean={rewards[-1] if rewards else float('nan'):.3f} "
             f"(mean of the first {len(first)} steps {sum(first) / max(len(first), 1):.3f}, of the last "
             f"{len(last)} {sum(last) / max(len(last), 1):.3f}); run dir {cfg.train.run_dir}"]
    if "data/num_prompts" in history[-1]:
        from megatron_rence.data.prompts import summary_line

        lines.append(summary_line(history[-1], cfg.data))
    if history[-1].get("train/nonfinite_steps_total"):
        lines.append(f"train/nonfinite_steps_total={history[-1]['train/nonfinite_steps_total']:.0f}: optimizer steps "
                     f"skipped for a NaN / inf loss or gradient norm")
    flat = 0
    for record in reversed(history):  # trailing steps whose gradient was exactly 0 with tokens to learn from
        if record.get("train/grad_norm") != 0.0 or not record.get("train/num_response_tokens"):
            break
        flat += 1
    if flat >= cfg.train.max_nonfinite_steps:
        lines.append(f"warning: train/grad_norm was exactly 0 in the last {flat} steps: the model has probably "
                     f"collapsed (optim.lr too high?)")
    if cfg.logging.plot:
        try:
            from megatron_rence.plots import plot

            written = plot(Path(cfg.train.run_dir), Path(cfg.train.run_dir) / "plots")
            lines.append("curves: " + ", ".join(str(p) for p in written))
        except ImportError as exc:
            lines.append(f"no plots: {exc} (pip install matplotlib)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(program=True))

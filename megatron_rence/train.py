"""Training entry point: `python -m megatron_rence.train RECIPE [overrides] [--print-config|--dry-run|--resume]`.

One step, as in docs/design.md: prompts -> engine.generate(K) -> rewards -> groups -> release engine memory
-> log-likelihoods -> objective -> optimizer step -> weight sync -> metrics; evaluation every
`eval.every` steps, a checkpoint every `checkpoint.every` steps and on SIGTERM / SIGUSR1 / Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_rence.cli import handle_info_flags, load_or_exit, recipe_parser
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


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signum: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum


def setup(cfg: Config, resume: bool) -> Run:
    from megatron_rence.data.prompts import PromptDataset
    from megatron_rence.data.tokenizer import load_tokenizer
    from megatron_rence.megatron import checkpoint, parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.megatron.step import Trainer
    from megatron_rence.metrics import MetricsLogger
    from megatron_rence.objectives import get_objective
    from megatron_rence.rewards.pool import RewardPool
    from megatron_rence.phases import engine_feed_ranks, engine_layout, engine_process_group
    from megatron_rence.rollout.engine import build_engine
    from megatron_rence.weights.hf_config import to_hf_config

    pstate = parallel.initialize(cfg.parallel, cfg.train.seed)
    check_world_size(cfg, pstate.world_size)
    tokenizer = load_tokenizer(cfg.model)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer ({cfg.model.tokenizer}: "
                          f"{len(tokenizer)} tokens)")
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab_size), pstate, vocab_size,
                      pad_id=tokenizer.pad_token_id)
    objective = get_objective(cfg.objective)
    ref_trainer = None
    if objective.needs_ref:
        ref_trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab_size), pstate, vocab_size,
                              frozen=True, pad_id=tokenizer.pad_token_id)
    dataset = PromptDataset(cfg.data, tokenizer)
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")
    resuming = resume and checkpoint.latest(ckpt_dir) is not None
    if resume and not resuming:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    if not resuming or ref_trainer is not None:  # the starting weights are also the reference
        load_starting_weights(cfg, trainer, vocab_size, pstate)
    if ref_trainer is not None:
        ref_trainer.copy_weights_from(trainer)
    start_step = resume_from(ckpt_dir, cfg, trainer, ref_trainer, dataset, objective) if resuming else 0
    resume_step = start_step if resuming else None
    engine_index, num_engines = engine_layout(cfg, pstate.rank, pstate.world_size)
    engine = reward_pool = None
    in_group, group = engine_process_group(cfg, pstate.rank, pstate.world_size)
    if in_group:
        hf_config = to_hf_config(cfg.model, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
        engine = build_engine(cfg, hf_config, tokenizer, group=group)
    if engine_index is not None:
        reward_pool = RewardPool(cfg.reward)
    logger = None
    if pstate.rank == 0:
        save_resolved(cfg, cfg.train.run_dir)
        logger = MetricsLogger(cfg.logging, cfg.train.run_dir, cfg.train.num_steps, start_step, resume_step)
    return Run(cfg, pstate, tokenizer, trainer, ref_trainer, objective, dataset, engine,
               engine_index if engine_index is not None else -1, num_engines,
               engine_feed_ranks(cfg, pstate.world_size), vocab_size, reward_pool, logger, start_step)


def load_starting_weights(cfg: Config, trainer, vocab_size: int, pstate) -> None:
    """checkpoint.load (weights only), else model.hf_path's safetensors, else the seeded random init stays."""
    if cfg.checkpoint.load:
        trainer.load(cfg.checkpoint.load, weights_only=True)
    elif cfg.model.hf_path:
        from megatron_rence.weights.convert import init_from_hf

        init_from_hf(trainer.model_chunks, cfg.model, vocab_size, pstate)


def resume_from(ckpt_dir: Path, cfg: Config, trainer, ref_trainer, dataset, objective) -> int:
    """Weights, optimizer, RNG, data position and objective state of the latest checkpoint; returns its step."""
    from megatron_rence.megatron import checkpoint

    state = trainer.load(ckpt_dir)
    step = state["step"]
    dataset.load_state_dict(state["data"])
    objective.load_state_dict(state["objective"])
    print(f"resumed from {checkpoint.latest(ckpt_dir)} at step {step}")
    every = cfg.objective.ref_update_every
    if ref_trainer is not None and every:  # semi-online DPO: the reference is not in the checkpoint
        ref_trainer.copy_weights_from(trainer)
        if step % every:
            print(f"objective.ref_update_every={every}: the reference restarts from the resumed policy "
                  f"(step {step}), not from step {step - step % every}")
    return step


def sync_weights(run: Run, version: int) -> dict:
    """Trainer shards -> HF layout buckets -> the engine, in place."""
    from megatron_rence.phases import check_engine_sync
    from megatron_rence.weights.sync import push_weights

    if run.engine is not None:
        run.engine.resume_memory(tags=["weights"])
    chunks, model_cfg = run.trainer.model_chunks, run.cfg.model
    fp8 = run.cfg.rollout.sglang.fp8_weights
    metrics = push_weights(chunks, model_cfg, run.vocab_size, run.engine, version, run.cfg.weights.bucket_bytes,
                           run.pstate, run.engine_ranks, fp8=fp8)
    if run.engine is not None:
        run.engine.resume_memory(tags=["kv_cache"])
    if run.cfg.train.debug_check_sync:
        metrics.update(check_engine_sync(chunks, model_cfg, run.vocab_size, run.engine, run.pstate, run.engine_ranks,
                                         fp8))
    return metrics


def train_step(run: Run, step: int) -> dict:
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
    metrics.update(train_phase(exp, run.trainer, run.ref_trainer, run.objective, cfg))
    every = cfg.objective.ref_update_every
    if run.ref_trainer is not None and every and step % every == 0:  # semi-online DPO
        run.ref_trainer.copy_weights_from(run.trainer)
        metrics["train/ref_updated"] = 1.0
    run.objective.update_after_step(metrics)
    metrics.update(sync_weights(run, version=step))  # version = optimizer updates applied
    metrics["perf/step_s"] = time.perf_counter() - t0
    return metrics


def save(run: Run, step: int) -> None:
    run.trainer.save(Path(run.cfg.checkpoint.dir or Path(run.cfg.train.run_dir) / "checkpoints"), step,
                     {"step": step, "data": run.dataset.state_dict(), "objective": run.objective.state_dict()},
                     keep_last=run.cfg.checkpoint.keep_last)


def maybe_evaluate(run: Run, step: int) -> dict:
    from megatron_rence.evaluate import evaluate

    e = run.cfg.eval
    if not (e.every and e.benchmarks and step % e.every == 0) or run.engine is None or run.engine_index != 0:
        return {}
    out_dir = Path(e.out_dir or Path(run.cfg.train.run_dir) / "eval")
    return evaluate(run.engine, run.tokenizer, e, run.cfg.data, run.reward_pool, out_dir, step=step)


def run_training(cfg: Config, resume: bool = False) -> list[dict]:
    """Train `cfg.train.num_steps` steps (from the latest checkpoint with `resume`); returns the step metrics."""
    stop = StopFlag()
    run = setup(cfg, resume)
    history: list[dict] = []
    try:
        sync_weights(run, version=run.start_step)  # the engine starts from the trainer's weights
        for step in range(run.start_step + 1, cfg.train.num_steps + 1):
            metrics = train_step(run, step)
            metrics.update(maybe_evaluate(run, step))
            if run.logger is not None:
                run.logger.log(step, metrics)
            history.append({"step": step, **metrics})
            stopping = run.trainer.any_rank(stop.signum is not None)
            if stopping or step == cfg.train.num_steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save(run, step)
            if stopping:
                print(f"signal {stop.signum}: checkpoint written at step {step}; exiting", flush=True)
                break
    finally:
        close(run)
    return history


def close(run: Run) -> None:
    """Flush the metrics, stop the grading workers and the engine (training state is already on disk)."""
    if run.logger is not None:
        run.logger.close()
    if run.reward_pool is not None:
        run.reward_pool.close()
    if run.engine is not None:
        run.engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser("rence-train", "Train with ReNCE / GRPO / DAPO / online DPO.")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(args)
    if handle_info_flags(args, cfg):
        return 0
    history = run_training(cfg, resume=args.resume)
    if history and os.environ.get("RANK", "0") == "0":
        print(summary(cfg, history))
    return 0


def summary(cfg: Config, history: list[dict]) -> str:
    """The end-of-run lines: reward at the start and at the end (10-step means), where the plots went."""
    rewards = [r["reward/mean"] for r in history if "reward/mean" in r]
    first, last = rewards[:10], rewards[-10:]
    lines = [f"done: step {history[-1]['step']} reward/mean={rewards[-1] if rewards else float('nan'):.3f} "
             f"(mean of the first {len(first)} steps {sum(first) / max(len(first), 1):.3f}, of the last "
             f"{len(last)} {sum(last) / max(len(last), 1):.3f}); run dir {cfg.train.run_dir}"]
    if cfg.logging.plot:
        try:
            from megatron_rence.plots import plot

            written = plot(Path(cfg.train.run_dir), Path(cfg.train.run_dir) / "plots")
            lines.append("curves: " + ", ".join(str(p) for p in written))
        except ImportError as exc:
            lines.append(f"no plots: {exc} (pip install matplotlib)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

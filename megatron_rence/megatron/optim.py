"""Optimizer construction: megatron DDP wrapping, megatron's Adam/AdamW optimizer and the warmup + decay LR schedule.

    ddp_chunks = wrap_ddp(model_chunks, parallel_cfg, loss_is_summed=True)
    optimizer = build_optimizer(optim_cfg, model_cfg, parallel_cfg, ddp_chunks)
    scheduler = build_scheduler(optim_cfg, optimizer, total_steps)

On GPU with ``parallel.distributed_optimizer`` the optimizer is megatron's DistributedOptimizer (state sharded
over data-parallel ranks); otherwise megatron's non-distributed optimizer (FP32Optimizer for fp32,
Float16OptimizerWithFloat16Params for bf16/fp16: fp32 main params copied from the model when it is built),
which works on CPU over gloo (``cpu_compat``). The distributed optimizer needs CUDA tensors.
Mixed precision: after changing parameters outside the optimizer, call ``optimizer.reload_model_params()``,
or the next step writes the stale fp32 main params back into the model.

The schedule is megatron's ``OptimizerParamScheduler`` shifted by one step so that optimizer step ``n``
(1-based) runs at ``lr(n)``: linear warmup ``lr * n / lr_warmup_steps`` for ``n <= lr_warmup_steps``, then
constant / linear / cosine decay from ``lr`` to ``min_lr`` reached at ``n = lr_decay_steps``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_rence.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig

NO_CLIP = 1.0e30  # megatron computes the gradient norm only when clipping; "clip" at this norm = never


def lr_at(optim_cfg: OptimConfig, step: int, decay_steps: int) -> float:
    """The learning rate of optimizer step `step` (1-based), as `build_scheduler` sets it (for tests and logs)."""
    o = optim_cfg
    if o.lr_warmup_steps > 0 and step <= o.lr_warmup_steps:
        return o.lr * step / o.lr_warmup_steps
    if o.lr_decay_style == "constant":
        return o.lr
    if step > decay_steps:
        return o.min_lr
    ratio = (step - o.lr_warmup_steps) / (decay_steps - o.lr_warmup_steps)
    coeff = 1.0 - ratio if o.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return o.min_lr + coeff * (o.lr - o.min_lr)


def check_optim_config(optim_cfg: OptimConfig, decay_steps: int) -> None:
    """ConfigError naming the `optim.*` key for values megatron would reject with a bare assert."""
    o = optim_cfg
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr: need 0 <= optim.min_lr <= optim.lr, got min_lr={o.min_lr}, lr={o.lr}")
    if o.lr_warmup_steps < 0:
        raise ConfigError(f"optim.lr_warmup_steps: must be >= 0, got {o.lr_warmup_steps}")
    if decay_steps <= o.lr_warmup_steps:
        raise ConfigError(f"optim.lr_decay_steps: the schedule's {decay_steps} optimizer steps must exceed "
                          f"optim.lr_warmup_steps={o.lr_warmup_steps}")
    if o.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad: must be >= 0 (0 = no clipping), got {o.clip_grad}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must be >= 0, got {o.weight_decay}")


def wrap_ddp(model_chunks: list, parallel_cfg: ParallelConfig, use_cuda: bool) -> list:
    """Wrap bare GPTModel chunks in megatron's DistributedDataParallel (contiguous grad buffers, DP reduction).

    Sets ``config.calculate_per_token_loss = True`` on the chunks' TransformerConfig: the schedule then leaves
    the loss unscaled and DDP SUMS gradients over data x context parallel ranks (no 1/dp), which is what the
    objectives' contract needs (loss = units / global normalizer, summed over microbatches and ranks).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if parallel_cfg.distributed_optimizer and not use_cuda:
        raise ConfigError("parallel.distributed_optimizer: megatron's distributed optimizer needs CUDA tensors; "
                          "set it to false for CPU runs")
    config = model_chunks[0].config
    config.calculate_per_token_loss = True
    overlap_grad_reduce, overlap_param_gather = overlap_settings(parallel_cfg, use_cuda)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, align_param_gather=overlap_param_gather and parallel_cfg.pp > 1,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer, check_for_nan_in_grad=False)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=i > 0) for i, chunk in enumerate(model_chunks)]
    one = lambda funcs: funcs[0] if len(funcs) == 1 else funcs  # noqa: E731
    if overlap_grad_reduce:  # as megatron's training loop: reduce only after the last microbatch, per chunk
        config.no_sync_func = one([chunk.no_sync for chunk in chunks])
        config.grad_sync_func = one([chunk.start_grad_sync for chunk in chunks])
    if overlap_param_gather and parallel_cfg.pp > 1:
        config.param_sync_func = one([chunk.start_param_sync for chunk in chunks])
    return chunks


def overlap_settings(parallel_cfg: ParallelConfig, use_cuda: bool) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather): `parallel.overlap_*`, by default on with CUDA (the param
    gather only with the distributed optimizer); both off on CPU."""
    p = parallel_cfg
    grad = use_cuda if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    param = (use_cuda and p.distributed_optimizer) if p.overlap_param_gather is None else p.overlap_param_gather
    if not use_cuda and (grad or param):
        key = "parallel.overlap_grad_reduce" if grad else "parallel.overlap_param_gather"
        raise ConfigError(f"{key}: overlapping communication is for CUDA runs; set it to false (or leave it "
                          "unset) on CPU")
    if param and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather: needs parallel.distributed_optimizer=true")
    return grad, param


def finish_param_gather(ddp_chunks: list) -> None:
    """With overlap_param_gather, megatron gathers the updated parameters lazily (next zero_grad / forward). The
    trainer's weights are read right after every step (weight sync, checkpoints): gather them now, the way
    megatron's training loop does before evaluation and checkpoints."""
    for chunk in ddp_chunks:
        if chunk.use_forward_hook:
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def optimizer_config(optim_cfg: OptimConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, use_cuda: bool):
    """megatron's OptimizerConfig for the recipe (the model's dtype, on CPU as on GPU)."""
    from megatron.core.optimizer import OptimizerConfig

    o = optim_cfg
    dtype = model_cfg.dtype
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return OptimizerConfig(
        optimizer="adam", decoupled_weight_decay=o.optimizer == "adamw",
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad if o.clip_grad > 0 else NO_CLIP,
        bf16=dtype == "bf16", fp16=dtype == "fp16", params_dtype=params_dtype,
        use_distributed_optimizer=parallel_cfg.distributed_optimizer and use_cuda,
    )


def build_optimizer(optim_cfg: OptimConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, ddp_chunks: list):
    """megatron's optimizer over DDP-wrapped chunks (a ChainedOptimizer; `.step()` clips and returns the norm)."""
    from megatron.core.optimizer import get_megatron_optimizer

    use_cuda = torch.cuda.is_available()
    config = optimizer_config(optim_cfg, model_cfg, parallel_cfg, use_cuda)
    return get_megatron_optimizer(config, ddp_chunks)


def attach_loss_scale(transformer_config, optimizer) -> None:
    """fp16: the schedule multiplies each microbatch's loss by the optimizer's dynamic loss scale, which
    the optimizer divides out of the gradients again (without it fp16 gradients reach Adam 2^32 times too
    small). bf16 / fp32 have no scaler (megatron's FP32 optimizer keeps its unit scale on CUDA only)."""
    if transformer_config.fp16:
        transformer_config.grad_scale_func = optimizer.scale_loss


def build_scheduler(optim_cfg: OptimConfig, optimizer, decay_steps: int, override: bool = False):
    """megatron's OptimizerParamScheduler, advanced to step 1 so the first optimizer step uses `lr_at(.., 1, ..)`.

    Call ``scheduler.step(1)`` after every optimizer step. `decay_steps` is the optimizer step where
    the decay reaches ``optim.min_lr`` (``optim.lr_decay_steps`` or the run's number of optimizer steps).
    Its `load_state_dict` takes the schedule's settings from the checkpoint, or with `override` (megatron's
    override_opt_param_scheduler) keeps these and takes only the step count (`resume_schedule`).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check_optim_config(optim_cfg, decay_steps)
    o = optim_cfg
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override, override_opt_param_scheduler=override)
    if not override:
        scheduler.step(1)
    return scheduler


def resume_schedule(optim_cfg: OptimConfig, optimizer, scheduler, decay_steps: int) -> tuple[object, list[str]]:
    """After a checkpoint's optimizer and scheduler state are loaded: the recipe's `optim.*` settings apply from
    the next step. Returns the scheduler to use and one line per setting that differs from the checkpoint's.

    A checkpoint carries its own settings twice: the scheduler's state (lr, min_lr, warmup, decay length and
    style, weight decay: megatron's `use_checkpoint_opt_param_scheduler` keeps those) and the optimizer's
    parameter groups (max_lr / min_lr, which megatron's scheduler reads before its own, Adam's betas and eps).
    Both are replaced: the groups in place, the scheduler by a new one with megatron's
    `override_opt_param_scheduler` that takes only the step count from the loaded one. clip_grad is not in
    the checkpoint (the optimizer config) and always follows the recipe.
    """
    o, saved, group = optim_cfg, scheduler.state_dict(), optimizer.param_groups[0]
    pairs = [("optim.lr", group.get("max_lr", saved["max_lr"]), o.lr),
             ("optim.min_lr", group.get("min_lr", saved["min_lr"]), o.min_lr),
             ("optim.lr_warmup_steps", saved["lr_warmup_steps"], o.lr_warmup_steps),
             ("optim.lr_decay_steps (default: the run's optimizer steps)", saved["lr_decay_steps"], decay_steps),
             ("optim.lr_decay_style", saved["lr_decay_style"], o.lr_decay_style),
             ("optim.weight_decay", saved["start_wd"], o.weight_decay),
             ("optim.adam_beta1", group["betas"][0], o.adam_beta1), ("optim.adam_beta2", group["betas"][1], o.adam_beta2),
             ("optim.adam_eps", group["eps"], o.adam_eps)]
    changes = [f"{key}: {old!r} in the checkpoint, {new!r} in the recipe" for key, old, new in pairs
               if (old != new if isinstance(new, str) else not math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0))]
    for g in optimizer.param_groups:
        g["max_lr"], g["min_lr"] = o.lr, o.min_lr
        g["betas"], g["eps"] = (o.adam_beta1, o.adam_beta2), o.adam_eps
    resumed = build_scheduler(o, optimizer, decay_steps, override=True)
    resumed.load_state_dict(saved)  # megatron: the step count from the checkpoint, every setting from the recipe
    return resumed, changes


def zero_lr_warning(optim_cfg: OptimConfig, optimizer, scheduler, steps_left: int) -> Optional[str]:
    """A warning when the run has steps left but the schedule gives the next optimizer step a learning rate of 0
    (e.g. a resumed run whose decay already reached optim.min_lr=0): those steps would not change the weights."""
    if steps_left <= 0 or current_lr(optimizer) > 0:
        return None
    o, done = optim_cfg, scheduler.num_steps - 1
    return (f"warning: optim: the learning rate of optimizer step {done + 1} and after is 0 (optim.lr={o.lr}, "
            f"optim.lr_decay_style={o.lr_decay_style} reaches optim.min_lr={o.min_lr} at optimizer step "
            f"{scheduler.lr_decay_steps}): the remaining steps will not change the weights; raise "
            f"optim.lr_decay_steps (or leave it unset: the run's length) or optim.min_lr")


def current_lr(optimizer) -> float:
    """The learning rate the next optimizer step uses (first parameter group; all groups share the schedule)."""
    return float(optimizer.param_groups[0]["lr"])


def main_params_dtype(optimizer) -> str:
    """The dtype of the tensors the optimizer updates ("fp32" main params for bf16 / fp16 models)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtypes = {names[p.dtype] for group in optimizer.param_groups for p in group["params"]}
    return "/".join(sorted(dtypes)) or "none"

"""Typed recipe configuration: a tree of dataclasses loaded from YAML with `base:` inheritance and dotted overrides.

Each component receives only its own section (``cfg.objective``, ``cfg.rollout`` ...). Loading is in
``megatron_rence.recipe``; this module holds the schema and the checks that need no world size.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, NamedTuple, Optional


class ConfigError(ValueError):
    """A user error in a recipe or override; the message names the dotted key (and file when known)."""


class ConfigWarning(UserWarning):
    """A recipe setting that cannot have an effect (ineffective.ineffective_settings); the message names the key."""


@dataclass
class ModelConfig:
    """Decoder-only transformer (Llama-3 / Qwen2.5 / Qwen3 families)."""

    arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    hf_path: Optional[str] = None  # HF checkpoint dir; its config.json fills the architecture fields
    tokenizer: str = "synthetic"  # "synthetic" (built in code) or a directory with tokenizer files
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 0  # 0 = take it from the tokenizer
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    rope_scaling: bool = False  # Llama-3.1 style frequency scaling
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise"]] = None  # TE FP8 training (GPU only)
    # the layer implementation on a GPU: "transformer_engine" (TE layer spec; a TE that does not import on a CUDA
    # machine is an error naming the exception) or "local" (megatron's local spec: bf16, slower, other parameter
    # names). Without CUDA the local spec is always used (TE needs CUDA)
    transformer_impl: Literal["transformer_engine", "local"] = "transformer_engine"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Trainer layout. Data parallel size is derived: world_size / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank
    sequence_parallel: bool = False
    distributed_optimizer: bool = False  # GPU only
    # overlap the data-parallel gradient reduction with the backward pass (megatron DDP); None = on with CUDA,
    # off on CPU (true on CPU is an error)
    overlap_grad_reduce: Optional[bool] = None
    # overlap the distributed optimizer's parameter all-gather; None = on with CUDA and distributed_optimizer.
    # The colocated loop reads the weights right after each step, so the trainer finishes the gather there
    overlap_param_gather: Optional[bool] = None
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1


@dataclass
class SyntheticTaskConfig:
    """The CPU recipes' verifiable tasks (data/synthetic.py): integer arithmetic or word problems, exact answers."""

    num_terms: int = 2
    min_value: int = 0
    max_value: int = 20
    operators: str = "+"
    num_problems: int = 5000
    seed: int = 0
    kind: Literal["arithmetic", "word_problems"] = "arithmetic"  # "3+4" / one-step word problems (2 numbers)
    # > 0: about a tenth of the problem space (by a hash of the text) never appears in training, and
    # eval.benchmarks entries with format "synthetic" draw this many distinct problems from it; 0 = no split
    num_heldout: int = 0


@dataclass
class DataConfig:
    source: Literal["file", "synthetic"] = "synthetic"
    train_path: Optional[str] = None  # jsonl or parquet
    extra_train_paths: list[str] = field(default_factory=list)  # more files mixed in (e.g. DAPO-Math + MATH)
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: Optional[str] = None
    template: str = "chat"  # "chat" = tokenizer's chat template; otherwise a format string with {problem}
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    max_prompt_len: int = 512
    shuffle: bool = True
    seed: int = 1234
    skip_malformed: bool = False
    # records larger than this many bytes (a jsonl line; a json item or parquet row as one jsonl line) are
    # skipped before tokenizing and counted (data/num_dropped_oversized); jsonl lines are never read whole.
    # A prompt that long could never fit data.max_prompt_len anyway
    max_record_bytes: int = 1 << 20
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


@dataclass
class SGLangConfig:
    """The colocated SGLang engine (rollout/sglang_engine.py): one per inference TP group of `tp` GPUs."""

    tp: int = 1
    mem_fraction_static: float = 0.6
    enable_memory_saver: bool = True
    fp8_weights: bool = False  # quantise weights in the sync stream so the engine serves FP8
    extra_args: dict[str, str] = field(default_factory=dict)  # more ServerArgs; values parsed as YAML scalars
    base_port: int = 30000  # engine i on a node listens on base_port + 100 * i (and its NCCL port + 1)
    max_restarts: int = 2  # engine crashes survived per run (each restart re-pushes the current weights)
    model_dir: Optional[str] = None  # where config.json + tokenizer for the engine go; default <run_dir>/sglang_model
    log_level: str = "error"
    health_poll_s: float = 5.0  # how often a pending engine call checks that the engine processes live
    # an engine call (generate, weight update, memory) with no answer after this long counts as a crash: the
    # engine is restarted (max_restarts). Keep it, plus an engine restart, under the 30-min collective timeout
    # the other ranks wait in.
    request_timeout_s: float = 900.0
    # SGLang's flush_cache fails while the scheduler still holds a batch (its overlap scheduler keeps the
    # last finished one for a moment after generate returns): retried for up to this long, then an error
    # naming the requests still pending
    flush_timeout_s: float = 60.0
    # SGLang's enable_deterministic_inference: batch-invariant kernels and per-request sampling seeds (without
    # it SGLang ignores the seed, so a resumed run does not draw the same samples); GPU attention backends only
    deterministic_inference: bool = False


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    prompts_per_step: int = 32
    num_samples: int = 8  # K completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop: list[str] = field(default_factory=list)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class ObjectiveConfig:
    """One section for the four objectives (megatron_rence/objectives/); each reads the fields its docstring names."""

    name: Literal["rence", "grpo", "dapo", "online_dpo"] = "rence"
    positive_threshold: float = 0.5  # reward >= threshold is a positive
    # ReNCE (objectives/rence.py and docs/design.md say which source each part comes from)
    beta: float = 1.0  # score scale on the log-ratio; also the DPO beta
    margin_alpha: float = 0.0  # margin alpha * (r_p - mean negative reward) subtracted from positives' scores
    reduce_positives: Literal["mean", "sum"] = "mean"
    length_normalize: bool = False  # ReNCE score / DPO log-likelihood divided by the response length
    t_easy: float = 1.0  # drop groups whose positive fraction exceeds this
    kl_coef: float = 0.0  # KL penalty (k3) to the reference policy; the starting value when kl_target is set
    kl_target: Optional[float] = None  # adapt kl_coef towards this KL with time constant kl_window steps
    kl_window: int = 10
    # GRPO / DAPO (None = the objective's default: see objectives/policy_gradient.py)
    clip_eps_low: float = 0.2
    clip_eps_high: Optional[float] = None  # None: grpo = clip_eps_low, dapo = 0.28 (clip-higher)
    token_level_loss: Optional[bool] = None  # None: grpo false, dapo true
    dynamic_sampling: Optional[bool] = None  # drop all-correct / all-wrong groups; None: grpo false, dapo true
    overlong_buffer: int = 0  # overlong shaping: tokens before max_new_tokens where the penalty ramps (0 = off)
    overlong_penalty: float = 1.0
    normalize_std: bool = True  # divide advantages by the group std
    # truncated importance sampling (grpo / dapo): each token's policy-gradient term times
    # min(pi_old / pi_rollout, tis_cap), pi_rollout = the engine's log-probs (e.g. FP8 rollouts); None = off
    tis_cap: Optional[float] = None
    # online DPO
    max_pairs_per_group: int = 1  # 0 = all |P|*|N| pairs
    ref_update_every: int = 0  # semi-online DPO: refresh the reference every s steps (0 = never)
    # ReNCE hard negatives (objectives/groups.py, hard_negative_selection): the engine samples K + this many
    # completions per prompt; each group keeps K of them with the sampled positive fraction, its negatives
    # being those with the highest mean per-token log-prob under the sampling policy. 0 = off; rence only
    hard_negative_samples: int = 0
    # dual-clip PPO (grpo / dapo; verl's clip_ratio_c, default 3 there): for a negative advantage A the
    # per-token loss is capped at dual_clip_c * |A|, so a token whose ratio grew past dual_clip_c gives no
    # gradient. None = off; must be > 1
    dual_clip_c: Optional[float] = None
    # ReNCE: the policy the score's log-ratio is taken against. "old": pi_old, the policy that sampled the
    # rollout (the paper's form). "current": the trainer's own log-probs at each optimizer step, detached, so
    # every score is 0 at its update (as with one optimizer step per rollout) at any batch size: the
    # one_step_per_rollout ablation changes only this
    score_against: Literal["old", "current"] = "old"


def max_positives_kept(t_easy: float, k: int) -> int:
    """objective.t_easy as an integer: the most positives a group of k keeps, the largest c with c / k <= t_easy.

    Exact (t_easy's float64 value as a fraction): ReNCE's filter (objectives/groups.too_easy) and the config
    check both compare counts with this one integer, so no precision can make them disagree (in float32,
    5/6 and 0.8333333 are the same number; as reals 5/6 is larger).
    """
    return math.floor(Fraction(t_easy) * k)


@dataclass
class RewardConfig:
    num_workers: int = 2
    timeout_s: float = 5.0
    # answer extraction when a response has no \boxed{} (rewards/extract.py), tried in order; [] is the strict
    # setting (only boxed answers are graded). reward/fallback_frac and the eval tables report how many
    # graded answers came from a fallback, reward/correct_fallback_frac how many of the correct ones
    fallbacks: list[Literal["last_number", "answer_is"]] = field(default_factory=lambda: ["last_number"])
    correct: float = 1.0
    incorrect: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 = no clipping (the norm is still logged)
    optimizer: Literal["adamw", "adam"] = "adamw"  # adamw: decoupled weight decay
    lr_decay_steps: Optional[int] = None  # optimizer step where the decay reaches min_lr; None = the run's last


@dataclass
class TrainConfig:
    num_steps: int = 100
    global_batch_size: int = 256  # sequences per optimizer step
    micro_batch_size: int = 4
    max_seq_len: int = 2048  # prompt + response
    seed: int = 1234
    run_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    debug_check_sync: bool = False  # after each sync, compare the engine's weights with the trainer's (CPU engine)
    logprobs_micro_batch_size: int = 0  # sequences per forward-only microbatch (old/ref log-probs); 0 = micro_batch_size
    # the "old" policy of the objectives (PPO ratio of grpo / dapo, NCE noise log-probs of rence): "trainer"
    # recomputes them with the trainer's weights before the update; "engine" takes the rollout engine's own
    # log-probs of the sampled tokens (the policy that actually sampled, e.g. with FP8 rollout weights), which
    # also skips that forward pass (and the mismatch/* metrics, which compare the two)
    old_logprobs: Literal["trainer", "engine"] = "trainer"
    # move the trainer's parameters (and the reference's) to CPU after each weight sync until the engine has
    # released its memory (gradients and optimizer state always leave the GPU during rollout:
    # megatron/offload.py); frees params bytes per GPU for the KV cache at the cost of two copies per step.
    # Not with parallel.distributed_optimizer (config error; docs/design.md, "Memory lifecycle")
    offload_params: bool = False
    # move the optimizer state (fp32 main params + Adam moments) to reusable pinned host buffers for rollout
    # and back for training (megatron/offload.py: two host copies per step, ~0.6 s for 13 GB per H100);
    # false keeps it on the GPU (the engine's KV cache gets that much less: rence-plan shows whether it still
    # fits). Gradient buffers are always freed (nothing is copied)
    offload_optimizer: bool = True
    # an optimizer step whose loss or gradient norm is not finite is skipped (train/nonfinite_steps); this many
    # such steps in a row stop the run with an error naming the metric and step
    max_nonfinite_steps: int = 3
    overwrite: bool = False  # a fresh launch (no --resume) may replace the checkpoints and metrics in run_dir
    # torch intra-op threads of each process (its trainer and CPU engine share them); 0 = leave torch's
    # setting (all cores, or OMP_NUM_THREADS: torchrun sets 1 per process). Give each process at most
    # cores / processes-per-machine, fewer on busy machines (docs/real_model.md measures 1 vs 2).
    num_threads: int = 0
    # wall-clock budget from the start of the run (setup included): checkpoint and stop after the step that
    # passes it (all ranks agree); 0 = none
    max_minutes: float = 0.0
    # what a stop signal (SIGTERM / SIGUSR1 / SIGINT: Slurm's time-limit warning, scancel, preemption) does to
    # the step in flight: "finish_step" completes it, then checkpoints it; "abandon_step" drops it if the
    # signal came before its training phase (the rollout is finished first: the engines cannot be cut off
    # mid-batch) and checkpoints the last completed step instead, exactly: the data position and RNG states
    # are restored to the step's start, the weights and optimizer are not touched yet. Pick the one whose
    # worst case fits the stop window (rence-plan compares both with the --signal lead and KillWait).
    on_stop: Literal["finish_step", "abandon_step"] = "finish_step"
    # packed THD microbatches (sequences concatenated, block-diagonal causal attention; megatron_rence/megatron/
    # attention.py on CPU, Transformer Engine on GPU) for the log-prob passes and training; false: every
    # microbatch padded to the step's longest sequence (the reference path)
    packing: bool = True
    # with packing: tokens (sequence lengths rounded up to the TP/CP padding multiple) per microbatch; whole
    # groups (a prompt's K samples) are packed up to it, so the number of microbatches varies per step;
    # 0 = train.micro_batch_size sequences (logprobs_micro_batch_size for log-prob passes) per microbatch
    max_tokens_per_microbatch: int = 0


@dataclass
class WeightsConfig:
    bucket_bytes: int = 512 * 1024 * 1024  # full-size bytes per sync bucket
    # start the exchange and TP all-gathers of bucket i + 1 before handing bucket i to the engine, so the
    # collectives run while the engine loads (weights/sync.py); costs one more bucket of gather buffers
    overlap_gather: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end and on SIGTERM
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    keep_last: int = 2
    load: Optional[str] = None  # megatron checkpoint to start from (weights only)
    # load a checkpoint that has no manifest.json (written before checksums, or the file was deleted) unverified;
    # false: such a checkpoint is refused (skipped on --resume when an older verified one exists)
    allow_unverified: bool = False


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress_bar: bool = True
    plot: bool = False  # at the end of the run, PNG curves in <run_dir>/plots (needs matplotlib)


@dataclass
class BenchmarkConfig:
    name: str = ""
    path: str = ""
    # "synthetic": the held-out split of data.synthetic (data.synthetic.num_heldout problems; path unused)
    format: Literal["auto", "aime", "amc", "math500", "minerva", "olympiadbench", "gsm8k", "synthetic"] = "auto"


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = never during training; N: every N steps and at the last step
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    num_samples: int = 4  # k for avg@k / pass@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    out_dir: Optional[str] = None  # default: <run_dir>/eval
    prompts_per_batch: int = 64  # prompts per engine.generate call
    seed: int = 0  # sampling seed (engines that support per-request seeds)
    at_start: bool = False  # also evaluate the starting weights before step 1 (a fresh run; logged as step 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class Range(NamedTuple):
    """The allowed values of one numeric key: `lo` / `hi` (None = unbounded), each bound included unless open."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def violation(self, value: float) -> Optional[str]:
        """Why `value` is outside the range ("must be ... , got ..."), or None when it is inside."""
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {self.lo}, got {value}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {self.hi}, got {value}"
        return None


def _at_least(lo: float) -> Range:
    return Range(lo)


_POS = Range(0, lo_open=True)  # > 0 (timeouts, intervals, scales)
_NONNEG = Range(0)
_UNIT = Range(0, 1, lo_open=True)  # (0, 1]: top_p
MAX_REWARD_WORKERS = 256  # grading processes per engine owner: more would exhaust a node's processes / memory
MAX_THREADS = 1024
# a record under the cap is tokenized in full before data.max_prompt_len can drop it, at about 500x its size
# in memory (issue 28: a 5 MB record cost 2.4 GB); no prompt that fits a context is anywhere near 16 MiB
MAX_RECORD_BYTES = 16 << 20

# The range of every int / float key (tests/unit/test_config.py checks that none is missing); every float
# must also be finite. Relations between keys are checked in `check_relations` and `validate`.
RANGES: dict[str, Range] = {
    "model.num_layers": _at_least(1), "model.hidden_size": _at_least(1), "model.ffn_hidden_size": _at_least(1),
    "model.num_attention_heads": _at_least(1), "model.num_query_groups": _at_least(1),
    "model.kv_channels": _at_least(1), "model.vocab_size": _NONNEG, "model.max_position_embeddings": _at_least(1),
    "model.rotary_base": _POS, "model.rope_scaling_factor": _POS, "model.norm_epsilon": _POS,
    "model.make_vocab_size_divisible_by": _at_least(1), "model.init_method_std": _POS,
    "parallel.tp": _at_least(1), "parallel.pp": _at_least(1), "parallel.cp": _at_least(1), "parallel.vpp": _at_least(1),
    "parallel.recompute_num_layers": _at_least(1),
    "data.synthetic.num_terms": _at_least(2), "data.synthetic.min_value": _NONNEG,
    "data.synthetic.max_value": _NONNEG, "data.synthetic.num_problems": _at_least(1), "data.synthetic.seed": _NONNEG,
    "data.synthetic.num_heldout": _NONNEG,
    "data.max_prompt_len": _at_least(1), "data.seed": _NONNEG, "data.max_record_bytes": Range(1, MAX_RECORD_BYTES),
    "rollout.sglang.tp": _at_least(1), "rollout.sglang.mem_fraction_static": Range(0, 1, lo_open=True, hi_open=True),
    "rollout.sglang.base_port": Range(1024, 65000), "rollout.sglang.max_restarts": _NONNEG,
    "rollout.sglang.health_poll_s": _POS, "rollout.sglang.request_timeout_s": _POS,
    "rollout.sglang.flush_timeout_s": _POS,
    "rollout.prompts_per_step": _at_least(1), "rollout.num_samples": _at_least(1), "rollout.temperature": _POS,
    "rollout.top_p": _UNIT, "rollout.top_k": _at_least(-1), "rollout.max_new_tokens": _at_least(1),
    "objective.positive_threshold": Range(), "objective.beta": _POS, "objective.margin_alpha": _NONNEG,
    "objective.t_easy": Range(0, 1), "objective.kl_coef": _NONNEG, "objective.kl_target": _NONNEG,
    "objective.kl_window": _at_least(1), "objective.clip_eps_low": _NONNEG, "objective.clip_eps_high": _NONNEG,
    "objective.overlong_buffer": _NONNEG, "objective.overlong_penalty": _NONNEG, "objective.tis_cap": _POS,
    "objective.max_pairs_per_group": _NONNEG, "objective.ref_update_every": _NONNEG,
    "objective.hard_negative_samples": _NONNEG, "objective.dual_clip_c": Range(1, lo_open=True),
    "reward.num_workers": Range(0, MAX_REWARD_WORKERS), "reward.timeout_s": _POS,
    "reward.correct": Range(), "reward.incorrect": Range(),
    "optim.lr": _NONNEG, "optim.min_lr": _NONNEG, "optim.lr_warmup_steps": _NONNEG, "optim.weight_decay": _NONNEG,
    "optim.adam_beta1": Range(0, 1, hi_open=True), "optim.adam_beta2": Range(0, 1, hi_open=True),
    "optim.adam_eps": _POS, "optim.clip_grad": _NONNEG, "optim.lr_decay_steps": _at_least(1),
    "train.num_steps": _at_least(1), "train.global_batch_size": _at_least(1), "train.micro_batch_size": _at_least(1),
    "train.max_seq_len": _at_least(2), "train.seed": _NONNEG, "train.logprobs_micro_batch_size": _NONNEG,
    "train.max_nonfinite_steps": _at_least(1), "train.num_threads": Range(0, MAX_THREADS),
    "train.max_minutes": _NONNEG, "train.max_tokens_per_microbatch": _NONNEG,
    "weights.bucket_bytes": _at_least(1), "checkpoint.every": _NONNEG, "checkpoint.keep_last": _NONNEG,
    "eval.every": _NONNEG, "eval.num_samples": _at_least(1), "eval.temperature": _NONNEG, "eval.top_p": _UNIT,
    "eval.max_new_tokens": _at_least(1), "eval.prompts_per_batch": _at_least(1), "eval.seed": _NONNEG,
}


def _get_dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: Config, fail) -> None:
    """`fail(key, message)` for the first numeric value outside its RANGES entry (NaN / inf included)."""
    for key, allowed in RANGES.items():
        value = _get_dotted(cfg, key)
        why = None if value is None else allowed.violation(value)
        if why is not None:
            fail(key, why)
    check_relations(cfg, fail)


def check_relations(cfg: Config, fail) -> None:
    """Numeric keys that bound each other: rewards and the positive threshold, the context length."""
    r, o, m = cfg.reward, cfg.objective, cfg.model
    if not r.incorrect < r.correct:
        fail("reward.correct", f"must be above reward.incorrect={r.incorrect}, got {r.correct}")
    if not r.incorrect < o.positive_threshold <= r.correct:
        fail("objective.positive_threshold", f"must lie in (reward.incorrect, reward.correct] = ({r.incorrect}, "
             f"{r.correct}] or no answer (or every answer) counts as a positive, got {o.positive_threshold}")
    if cfg.optim.min_lr > cfg.optim.lr:
        fail("optim.min_lr", f"must be <= optim.lr={cfg.optim.lr}, got {cfg.optim.min_lr}")
    syn = cfg.data.synthetic
    if syn.max_value < syn.min_value:
        fail("data.synthetic.max_value", f"must be >= data.synthetic.min_value={syn.min_value}, got {syn.max_value}")
    if m.hf_path is None:  # else recipe.fill_model_from_hf checks it once config.json has given the context
        check_context(cfg, fail)


def check_context(cfg: Config, fail) -> None:
    """train.max_seq_len (prompt + response) and eval's responses fit the model's position embeddings."""
    limit = cfg.model.max_position_embeddings
    if cfg.train.max_seq_len > limit:
        fail("train.max_seq_len", f"{cfg.train.max_seq_len} exceeds model.max_position_embeddings={limit}")
    e = cfg.eval
    if e.benchmarks and (e.every or e.at_start) and e.max_new_tokens >= limit:
        fail("eval.max_new_tokens", f"{cfg.eval.max_new_tokens} leaves no room for a prompt in "
             f"model.max_position_embeddings={limit}")


def validate(cfg: Config, source: str = "<recipe>", where=None) -> None:
    """Checks that need no world size. Raises ConfigError naming the dotted key and where it was set:
    `where(key)` (the recipe file or the command line, see recipe.load_recipe), else `source`."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{where(key) if where else source}: {key}: {msg}")

    check_ranges(cfg, fail)
    m, p, t, r, o = cfg.model, cfg.parallel, cfg.train, cfg.rollout, cfg.objective
    if m.hf_path is None:
        if m.num_attention_heads % m.num_query_groups:
            fail("model.num_query_groups", f"{m.num_query_groups} does not divide "
                 f"model.num_attention_heads={m.num_attention_heads}")
        if m.num_attention_heads % p.tp:
            fail("parallel.tp", f"model.num_attention_heads={m.num_attention_heads} is not divisible by tp={p.tp}")
        if m.num_query_groups % p.tp:
            fail("parallel.tp", f"model.num_query_groups={m.num_query_groups} is not divisible by tp={p.tp}")
        if m.ffn_hidden_size % p.tp:
            fail("parallel.tp", f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by tp={p.tp}")
        stages = p.pp * (p.vpp or 1)
        if m.num_layers % stages:
            fail("parallel.pp", f"model.num_layers={m.num_layers} is not divisible by pp*vpp={stages}")
    if p.vpp is not None and p.pp < 2:
        fail("parallel.vpp", "virtual pipeline stages need parallel.pp >= 2")
    if p.sequence_parallel and p.tp < 2:
        fail("parallel.sequence_parallel", "sequence parallel needs parallel.tp >= 2")
    if t.max_tokens_per_microbatch < 0:
        fail("train.max_tokens_per_microbatch", f"must be >= 0 (0 = by train.micro_batch_size), got "
             f"{t.max_tokens_per_microbatch}")
    if t.max_tokens_per_microbatch and not t.packing:
        fail("train.max_tokens_per_microbatch", "token-budget microbatches need train.packing=true")
    if not t.max_tokens_per_microbatch and t.global_batch_size % t.micro_batch_size:
        fail("train.global_batch_size", f"{t.global_batch_size} is not divisible by "
             f"train.micro_batch_size={t.micro_batch_size}")
    sequences = r.prompts_per_step * r.num_samples
    if sequences % t.global_batch_size:
        fail("train.global_batch_size", f"rollout.prompts_per_step*rollout.num_samples={sequences} "
             f"is not divisible by train.global_batch_size={t.global_batch_size}")
    if r.max_new_tokens >= t.max_seq_len:
        fail("rollout.max_new_tokens", f"{r.max_new_tokens} leaves no room for the prompt in "
             f"train.max_seq_len={t.max_seq_len}")
    if not 0.0 < r.temperature:
        fail("rollout.temperature", f"must be > 0, got {r.temperature}")
    if not 0.0 < r.top_p <= 1.0:
        fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    if o.beta <= 0:
        fail("objective.beta", f"must be > 0, got {o.beta}")
    if not 0.0 <= o.t_easy <= 1.0:
        fail("objective.t_easy", f"must be in [0, 1], got {o.t_easy}")
    if o.clip_eps_low < 0 or (o.clip_eps_high is not None and o.clip_eps_high < 0):
        fail("objective.clip_eps_low", "clip ranges must be >= 0")
    if o.name == "online_dpo" and r.num_samples < 2:
        fail("rollout.num_samples", "online_dpo needs at least 2 samples per prompt to form pairs")
    if o.overlong_buffer >= r.max_new_tokens and o.overlong_buffer > 0:
        fail("objective.overlong_buffer", f"{o.overlong_buffer} must be < rollout.max_new_tokens={r.max_new_tokens}")
    if o.tis_cap is not None:
        if o.name not in ("grpo", "dapo"):
            fail("objective.tis_cap", f"truncated importance sampling weights the policy-gradient loss of grpo / "
                 f"dapo; objective.name={o.name} has none (for rence, train.old_logprobs=engine makes the "
                 f"engine the NCE noise distribution)")
        if o.tis_cap <= 0:
            fail("objective.tis_cap", f"must be > 0, got {o.tis_cap}")
        if t.old_logprobs == "engine":
            fail("objective.tis_cap", "with train.old_logprobs=engine the old policy is the engine's: "
                 "every weight would be 1 (unset one of the two)")
    if m.fp8 is not None and m.dtype == "fp32":
        fail("model.fp8", "FP8 training needs model.dtype bf16")
    if m.fp8 is not None and m.transformer_impl == "local":
        fail("model.fp8", "FP8 training runs through Transformer Engine: it needs "
             "model.transformer_impl=transformer_engine, not local")
    if t.offload_params and p.distributed_optimizer:
        fail("train.offload_params", "not with parallel.distributed_optimizer=true: megatron-core offloads the "
             "distributed optimizer's parameter buffer by resizing its storage to 0, so every parameter (a view "
             "into it) is unreadable until the next step, and the checkpoint written after the weight sync reads "
             "them all; set one of train.offload_params / parallel.distributed_optimizer to false")
    if cfg.data.source == "file" and not cfg.data.train_path:
        fail("data.train_path", "data.source=file needs a train_path (jsonl or parquet)")
    if t.debug_check_sync and r.engine != "hf":
        fail("train.debug_check_sync", "compares the engine's weights with the trainer's, which only the CPU "
             "engine (rollout.engine=hf) exposes")
    if t.num_threads < 0:
        fail("train.num_threads", f"must be >= 0 (0 = torch's default), got {t.num_threads}")
    if t.max_minutes < 0:
        fail("train.max_minutes", f"must be >= 0 (0 = no budget), got {t.max_minutes}")
    syn = cfg.data.synthetic
    if syn.num_heldout < 0:
        fail("data.synthetic.num_heldout", f"must be >= 0, got {syn.num_heldout}")
    if any(b.format == "synthetic" for b in cfg.eval.benchmarks) and syn.num_heldout < 1:
        fail("data.synthetic.num_heldout", "an eval.benchmarks entry has format synthetic (the held-out split): "
             "set data.synthetic.num_heldout >= 1")
    if o.hard_negative_samples < 0:
        fail("objective.hard_negative_samples", f"must be >= 0, got {o.hard_negative_samples}")
    if o.dual_clip_c is not None and o.dual_clip_c <= 1.0:
        fail("objective.dual_clip_c", f"must be > 1 (the cap is dual_clip_c * |A|), got {o.dual_clip_c}")
    from megatron_rence.rundir import load_inside_replaced_run

    if problem := load_inside_replaced_run(cfg):
        fail("checkpoint.load", problem)


def samples_per_prompt(cfg: Config) -> int:
    """Completions the engine samples per prompt: rollout.num_samples, plus objective.hard_negative_samples
    (ReNCE only) from which the train phase keeps each group's hardest negatives."""
    extra = cfg.objective.hard_negative_samples if cfg.objective.name == "rence" else 0
    return cfg.rollout.num_samples + extra


def check_world_size(cfg: Config, world_size: int, source: str = "<recipe>") -> int:
    """Checks the layout against the number of ranks; returns the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(f"{source}: parallel: tp*pp*cp={model_parallel} does not divide the world size {world_size}")
    dp = world_size // model_parallel
    by_count = t.micro_batch_size if not t.max_tokens_per_microbatch else 1  # a token budget packs by tokens
    if t.global_batch_size % (by_count * dp):
        what = f"train.micro_batch_size*dp={t.micro_batch_size}*{dp}" if by_count > 1 else f"dp={dp}"
        raise ConfigError(f"{source}: train.global_batch_size: {t.global_batch_size} is not divisible by {what}")
    return dp

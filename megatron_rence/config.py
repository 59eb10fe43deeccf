"""Typed recipe configuration: a tree of dataclasses loaded from YAML with `base:` inheritance and dotted overrides.

Each component receives only its own section (``cfg.objective``, ``cfg.rollout`` ...). Loading is in
``megatron_rence.recipe``; this module holds the schema and the checks that need no world size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A user error in a recipe or override; the message names the dotted key (and file when known)."""


class ConfigWarning(UserWarning):
    """A recipe setting that cannot have an effect (config.ineffective_settings); the message names the key."""


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
    # jsonl lines longer than this many bytes are skipped without being read whole and counted
    # (data/num_dropped_oversized); a prompt that long could never fit data.max_prompt_len anyway
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
    # megatron/offload.py); frees params bytes per GPU for the KV cache at the cost of two copies per step
    offload_params: bool = False
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


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end and on SIGTERM
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    keep_last: int = 2
    load: Optional[str] = None  # megatron checkpoint to start from (weights only)


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


# every count / size has a minimum and every timeout / interval must be > 0 (None = unset is allowed)
_MINIMUMS = {
    "model.num_layers": 1, "model.hidden_size": 1, "model.ffn_hidden_size": 1, "model.num_attention_heads": 1,
    "model.num_query_groups": 1, "model.kv_channels": 1, "model.vocab_size": 0, "model.max_position_embeddings": 1,
    "model.make_vocab_size_divisible_by": 1, "parallel.tp": 1, "parallel.pp": 1, "parallel.cp": 1,
    "parallel.vpp": 1, "parallel.recompute_num_layers": 1, "data.max_prompt_len": 1, "data.max_record_bytes": 1,
    "data.synthetic.num_problems": 1, "rollout.prompts_per_step": 1, "rollout.num_samples": 1,
    "rollout.max_new_tokens": 1, "rollout.top_k": -1, "rollout.sglang.tp": 1, "rollout.sglang.max_restarts": 0,
    "rollout.sglang.base_port": 1, "objective.kl_window": 1, "objective.overlong_buffer": 0,
    "objective.max_pairs_per_group": 0, "objective.ref_update_every": 0, "reward.num_workers": 0,
    "optim.lr_warmup_steps": 0, "optim.lr_decay_steps": 1, "train.num_steps": 1, "train.global_batch_size": 1,
    "train.micro_batch_size": 1, "train.max_seq_len": 2, "train.logprobs_micro_batch_size": 0,
    "train.max_nonfinite_steps": 1, "weights.bucket_bytes": 1, "checkpoint.every": 0, "checkpoint.keep_last": 0,
    "eval.every": 0, "eval.num_samples": 1, "eval.max_new_tokens": 1, "eval.prompts_per_batch": 1,
}
_POSITIVE = ["reward.timeout_s", "rollout.sglang.health_poll_s", "rollout.sglang.request_timeout_s",
             "rollout.sglang.mem_fraction_static", "model.norm_epsilon", "model.rotary_base"]


def _get_dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: Config, fail) -> None:
    """`fail(key, message)` for every count below its minimum (_MINIMUMS) and every timeout <= 0 (_POSITIVE)."""
    for key, minimum in _MINIMUMS.items():
        value = _get_dotted(cfg, key)
        if value is not None and value < minimum:
            fail(key, f"must be >= {minimum}, got {value}")
    for key in _POSITIVE:
        value = _get_dotted(cfg, key)
        if value is not None and not value > 0:
            fail(key, f"must be > 0, got {value}")


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
    if t.global_batch_size % t.micro_batch_size:
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
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"{source}: train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size*dp={t.micro_batch_size}*{dp}")
    return dp


# objective keys each objective reads (the others have no effect for it); name / positive_threshold / kl_* for all
_OBJECTIVE_KEYS = {
    "rence": {"beta", "margin_alpha", "reduce_positives", "length_normalize", "t_easy", "hard_negative_samples"},
    "grpo": {"clip_eps_low", "clip_eps_high", "token_level_loss", "dynamic_sampling", "overlong_buffer",
             "overlong_penalty", "normalize_std", "tis_cap", "dual_clip_c"},
    "online_dpo": {"beta", "length_normalize", "max_pairs_per_group", "ref_update_every"},
}
_OBJECTIVE_KEYS["dapo"] = _OBJECTIVE_KEYS["grpo"]
_COMMON_OBJECTIVE_KEYS = {"name", "positive_threshold", "kl_coef", "kl_target", "kl_window"}


def ineffective_settings(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, why) for each setting that cannot change training (recipe.load_recipe warns about them).

    Only settings whose effect is provably nil are listed (docs/design.md, "Settings that cannot have an
    effect", works each case out):
    - an objective key that `objective.name` does not read, set away from its default;
    - objective.kl_window without objective.kl_target (the coefficient is fixed);
    - objective.t_easy below 1 that drops no group at K = rollout.num_samples: ReNCE trains only groups with
      1..K-1 positives, whose positive fraction is at most (K-1)/K, so t_easy >= (K-1)/K drops none;
    - objective.beta (ReNCE) with one optimizer step per rollout, old log-probs from the trainer, no KL term
      and no gradient clipping: every score beta * (log pi - log pi_old) is 0 at the update, so beta only
      multiplies the whole gradient, which Adam's normalisation undoes (up to optim.adam_eps).
    """
    o, r, t = cfg.objective, cfg.rollout, cfg.train
    defaults = ObjectiveConfig()
    out: list[tuple[str, str]] = []
    reads = _OBJECTIVE_KEYS.get(o.name, set()) | _COMMON_OBJECTIVE_KEYS
    for f in dataclasses.fields(ObjectiveConfig):
        value = getattr(o, f.name)
        if f.name not in reads and value != getattr(defaults, f.name):
            out.append((f"objective.{f.name}", f"{value!r} has no effect with objective.name={o.name}"))
    if o.kl_target is None and o.kl_window != defaults.kl_window:
        out.append(("objective.kl_window", f"{o.kl_window} has no effect without objective.kl_target "
                    f"(the KL coefficient stays objective.kl_coef={o.kl_coef})"))
    if o.name != "rence":
        return out
    k = r.num_samples
    if o.t_easy < 1.0 and (k - 1) / k <= o.t_easy:
        out.append(("objective.t_easy", f"{o.t_easy} drops no group at rollout.num_samples={k}: a group with "
                    f"both positives and negatives has a positive fraction of at most {k - 1}/{k}, and groups "
                    f"without negatives are dropped anyway (choose t_easy < {(k - 1) / k:.4g})"))
    one_step = t.global_batch_size >= r.prompts_per_step * r.num_samples
    has_kl = o.kl_coef > 0 or o.kl_target is not None
    if (o.beta != defaults.beta and one_step and t.old_logprobs == "trainer" and not has_kl
            and cfg.optim.clip_grad == 0):
        out.append(("objective.beta", f"{o.beta} has no effect: with one optimizer step per rollout "
                    f"(train.global_batch_size={t.global_batch_size}) every ReNCE score is 0 at the update, so "
                    f"beta only scales the gradient, which Adam undoes (no KL term, optim.clip_grad=0)"))
    return out

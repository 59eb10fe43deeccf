"""The objective contract: ObjectiveBatch (microbatch of whole groups), Prepared (group decisions), Objective.

How the trainer drives an objective (docs/interfaces.md, "objectives"):

    prepared = objective.prepare(rewards [G,K], lengths [G,K], max_new_tokens)   # whole rollout batch
    keep only groups with prepared.keep; normalizer = objective.normalizer(prepared)  (or normalizer_for)
    for each microbatch of WHOLE kept groups:  loss, metrics = objective(batch, normalizer); loss.backward()
    objective.update_after_step(step_metrics)                                     # adaptive KL

Every loss is (sum over this microbatch's units) / normalizer, where the unit is a group (ReNCE), a
sequence (GRPO), a token (DAPO token-level loss) or a pair (online DPO), and the normalizer counts the units
of the whole global batch (all microbatches, all data-parallel ranks). So summing the gradients of the
microbatches gives the gradient of the whole batch: the trainer must SUM (not average) over microbatches
and data-parallel ranks. Metrics are additive in the same way: a `*/num_*` metric is a plain count in this
microbatch, every other metric is (sum over this microbatch's units) / normalizer, so summing a metric over
the microbatches of one optimizer step gives that step's value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives.kl import AdaptiveKLController, k3_per_token


@dataclass
class ObjectiveBatch:
    """A microbatch of whole groups: N = G*K rows, group g = rows g*K .. g*K+K-1.

    `T` is any per-token layout in which `mask` marks the response tokens (response-aligned, or the full
    padded prompt+response sequence); `old_logprobs` and `ref_logprobs` are aligned with `logprobs`.
    Values where mask is 0 are ignored (they may be anything finite or not).

    logprobs [N,T] float (requires grad): the trained policy's per-token log-probs.
    old_logprobs [N,T]: the policy before this rollout's updates (no grad).
    mask [N,T] bool or {0,1}: response tokens.
    rewards [N]: shaped rewards (Prepared.rewards of the kept groups, flattened).
    group_size: K.
    ref_logprobs [N,T] or None: the reference policy (KL penalty, online DPO).
    rollout_logprobs [N,T] or None: the engine's log-probs of the sampled tokens (objective.tis_cap).
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    group_size: int
    ref_logprobs: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None

    def __post_init__(self):
        n, t = self.logprobs.shape
        assert self.group_size >= 1 and n % self.group_size == 0, (
            f"ObjectiveBatch: {n} rows are not whole groups of K={self.group_size}")
        assert self.old_logprobs.shape == (n, t) and self.mask.shape == (n, t), "ObjectiveBatch: shape mismatch"
        assert self.rewards.shape == (n,), f"ObjectiveBatch: rewards must be [N]={n}, got {tuple(self.rewards.shape)}"
        assert self.ref_logprobs is None or self.ref_logprobs.shape == (n, t), "ObjectiveBatch: ref shape"
        assert self.rollout_logprobs is None or self.rollout_logprobs.shape == (n, t), "ObjectiveBatch: rollout shape"

    @property
    def num_groups(self) -> int:
        return self.logprobs.shape[0] // self.group_size

    def token_mask(self) -> torch.Tensor:
        """[N,T] bool."""
        return self.mask.bool()

    def lengths(self) -> torch.Tensor:
        """[N] float32 response lengths (number of masked tokens)."""
        return self.token_mask().sum(dim=1).to(torch.float32)

    def masked(self, values: torch.Tensor) -> torch.Tensor:
        """values [N,T] with 0 off the response (torch.where, so junk off the mask cannot leak NaN)."""
        return torch.where(self.token_mask(), values, torch.zeros((), dtype=values.dtype, device=values.device))

    def log_ratio(self) -> torch.Tensor:
        """[N,T] fp32 log pi_theta - log pi_old, 0 off the response."""
        return self.masked(self.logprobs.float() - self.old_logprobs.float())

    def sequence_logprobs(self, length_normalize: bool = False) -> torch.Tensor:
        """[N] fp32 sum (or mean) of log-probs over response tokens."""
        sums = self.masked(self.logprobs.float()).sum(dim=1)
        return sums / self.lengths().clamp(min=1.0) if length_normalize else sums

    def ref_sequence_logprobs(self, length_normalize: bool = False) -> torch.Tensor:
        """[N] fp32, as sequence_logprobs for ref_logprobs."""
        assert self.ref_logprobs is not None
        sums = self.masked(self.ref_logprobs.float()).sum(dim=1)
        return sums / self.lengths().clamp(min=1.0) if length_normalize else sums

    def kl_tokens(self) -> torch.Tensor:
        """[N,T] k3 estimate of KL(pi_theta || pi_ref) per response token (0 off the response)."""
        if self.ref_logprobs is None:
            raise ValueError("the objective has a KL penalty (objective.kl_coef > 0 or objective.kl_target set) "
                             "but the batch has no ref_logprobs")
        return self.masked(k3_per_token(self.masked(self.logprobs.float()), self.masked(self.ref_logprobs.float())))

    def kl_per_sequence(self) -> torch.Tensor:
        """[N] mean k3 over each sequence's response tokens (0 for an empty response)."""
        return self.kl_tokens().sum(dim=1) / self.lengths().clamp(min=1.0)

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """values [N, ...] -> [G, K, ...]."""
        return values.reshape(self.num_groups, self.group_size, *values.shape[1:])


@dataclass
class Prepared:
    """What `prepare` decided for a rollout batch.

    rewards [G,K]: shaped rewards (DAPO overlong shaping; otherwise the input rewards).
    keep [G] bool: groups that train (the others give no gradient and are dropped by the trainer).
    lengths [G,K]: response lengths in tokens (the token-level normalizer needs them).
    metrics: `groups/*` and `objective/*` floats about the decision.
    """

    rewards: torch.Tensor
    keep: torch.Tensor
    lengths: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """What the trainer relies on (see the module docstring for the call order)."""

    name: str
    needs_ref: bool
    needs_rollout_logprobs: bool

    def prepare(self, rewards: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Prepared: ...

    def normalizer(self, prepared: Prepared) -> float: ...

    def normalizer_for(self, rewards: torch.Tensor, lengths) -> float: ...

    def __call__(self, batch: ObjectiveBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]: ...

    def update_after_step(self, metrics: dict) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Lengths = Union[torch.Tensor, Sequence[int]]


class ObjectiveBase:
    """Shared pieces: config checks, the (adaptive) KL coefficient and its checkpointed state."""

    name = "base"
    uses_overlong_shaping = False

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        if cfg.kl_coef < 0:
            raise ValueError(f"objective.kl_coef must be >= 0, got {cfg.kl_coef}")
        if cfg.kl_target is not None:
            if cfg.kl_target <= 0:
                raise ValueError(f"objective.kl_target must be > 0, got {cfg.kl_target}")
            if cfg.kl_coef <= 0:
                raise ValueError("objective.kl_coef must be > 0 when objective.kl_target is set "
                                 "(it is the starting coefficient of the adaptive controller)")
            if cfg.kl_window < 1:
                raise ValueError(f"objective.kl_window must be >= 1, got {cfg.kl_window}")
        if cfg.overlong_buffer < 0:
            raise ValueError(f"objective.overlong_buffer must be >= 0, got {cfg.overlong_buffer}")
        if cfg.overlong_buffer > 0 and not self.uses_overlong_shaping:
            raise ValueError(f"objective.overlong_buffer={cfg.overlong_buffer} is overlong reward shaping for "
                             f"grpo/dapo; objective.name={cfg.name} does not use it (set it to 0)")
        self.kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_window)

    @property
    def has_kl(self) -> bool:
        return self.cfg.kl_coef > 0 or self.cfg.kl_target is not None

    @property
    def needs_ref(self) -> bool:
        return self.has_kl

    @property
    def needs_rollout_logprobs(self) -> bool:
        """Whether batches must carry the engine's log-probs (truncated importance sampling)."""
        return False

    def normalizer(self, prepared: Prepared) -> float:
        """Global count of loss units over the kept groups of `prepared`."""
        keep = prepared.keep.bool()
        return self.normalizer_for(prepared.rewards[keep], prepared.lengths[keep])

    def normalizer_for(self, rewards: torch.Tensor, lengths: Lengths) -> float:
        """Count of loss units in kept groups `rewards` [G,K] with response `lengths` ([G,K] or N ints)."""
        raise NotImplementedError

    def update_after_step(self, metrics: dict) -> None:
        """Adapt the KL coefficient from the step's `objective/kl` (no-op without kl_target or that metric)."""
        value = metrics.get("objective/kl")
        if value is not None:
            self.kl.update(float(value))

    def state_dict(self) -> dict:
        return {"name": self.name, "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"objective state is for {state.get('name')!r}, "
                             f"this run's objective.name is {self.name!r}")
        self.kl.load_state_dict(state["kl"])

    def kl_metrics(self) -> dict[str, float]:
        return {"objective/kl_coef": self.kl.coef} if self.has_kl else {}


def total_length(lengths: Lengths) -> float:
    """Sum of response lengths given as a tensor of any shape or a sequence of ints."""
    return float(torch.as_tensor(lengths, dtype=torch.float64).sum().item()) if len(lengths) else 0.0

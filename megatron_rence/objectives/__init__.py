"""Pure-torch training objectives: ReNCE, GRPO, DAPO and online DPO, picked by `objective.name` from OBJECTIVES.

    objective = get_objective(cfg.objective)
    prepared = objective.prepare(rewards [G,K], lengths [G,K], max_new_tokens)
    loss, metrics = objective(ObjectiveBatch(...), objective.normalizer(prepared))

See base.py for the contract (whole groups per microbatch; loss = sum over units / global normalizer).
"""
from __future__ import annotations

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives.base import Objective, ObjectiveBase, ObjectiveBatch, Prepared
from megatron_rence.objectives.online_dpo import OnlineDPO
from megatron_rence.objectives.policy_gradient import DAPO, GRPO
from megatron_rence.objectives.rence import ReNCE

OBJECTIVES: dict[str, type[ObjectiveBase]] = {
    "rence": ReNCE,
    "grpo": GRPO,
    "dapo": DAPO,
    "online_dpo": OnlineDPO,
}


def get_objective(cfg: ObjectiveConfig) -> ObjectiveBase:
    """The objective named by `cfg.name`, built from `cfg` (ValueError for an unknown name or bad option)."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective {cfg.name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.name](cfg)


__all__ = ["OBJECTIVES", "get_objective", "Objective", "ObjectiveBase", "ObjectiveBatch", "Prepared",
           "ReNCE", "GRPO", "DAPO", "OnlineDPO"]

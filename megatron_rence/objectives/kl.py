"""KL penalty pieces: the k3 per-token estimator and the adaptive coefficient controller.

k3 (Schulman, "Approximating KL divergence", 2020): with samples from pi_theta and d = log pi_ref - log pi_theta,
KL(pi_theta || pi_ref) ~ exp(d) - d - 1 per token; it is >= 0, unbiased, and 0 exactly when the log-probs agree.

Clamps at the edges, the constants verl uses (verl/trainer/ppo/core_algos.py, kl_penalty "low_var_kl" and
compute_policy_loss): d is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] nats before the exp
(exp(d) overflows float32 past ~88.7 nats), and the per-token k3 to [-K3_CLAMP, K3_CLAMP] = [-10, 10]. A token
whose d or k3 is clamped contributes a constant: ZERO gradient. k3 reaches 10 at d ~ 2.61 (the reference finds
the token ~14x likelier than the policy) and at d = -11, so beyond those the KL term stops pulling that token.
The same LOG_RATIO_CLAMP bounds the PPO ratio's log in objectives/policy_gradient.py.

Adaptive coefficient (a proportional controller in the style of Ziegler et al. 2019, our reconstruction of the
ReNCE paper's "KL coefficient adapted over a window"): after each training step with measured KL `kl`,
    coef <- coef * (1 + clip(kl / kl_target - 1, -0.2, 0.2) / kl_window)
so the coefficient moves by at most 20% per kl_window steps, up when the KL is above target, down when below.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

MAX_ERROR = 0.2
LOG_RATIO_CLAMP = 20.0  # nats; verl's bound on a per-token log-ratio before exp
K3_CLAMP = 10.0  # verl's bound on the per-token k3 value


def k3_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[...] k3 KL estimate exp(d) - d - 1 with d = clamp(ref - lp, +-20), clamped to [-10, 10] (fp32; gradient
    flows through logprobs, and is zero for a clamped token)."""
    d = (ref_logprobs.float() - logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


class AdaptiveKLController:
    """The KL coefficient: fixed at kl_coef, or adapted towards kl_target with time constant kl_window steps."""

    def __init__(self, kl_coef: float, kl_target: Optional[float], kl_window: int):
        self.coef = float(kl_coef)
        self.target = kl_target
        self.window = kl_window

    def update(self, kl: float) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -MAX_ERROR), MAX_ERROR)
        self.coef *= 1.0 + error / self.window

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])

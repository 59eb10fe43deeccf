"""KL penalty pieces: the k3 per-token estimator and the adaptive coefficient controller.

k3 (Schulman, "Approximating KL divergence", 2020): with samples from pi_theta and d = log pi_ref - log pi_theta,
KL(pi_theta || pi_ref) ~ exp(d) - d - 1 per token; it is >= 0, unbiased, and 0 exactly when the log-probs agree.

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


def k3_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[...] k3 KL estimate exp(ref - lp) - (ref - lp) - 1 (fp32; gradient flows through logprobs)."""
    d = ref_logprobs.float() - logprobs.float()
    return torch.exp(d) - d - 1.0


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

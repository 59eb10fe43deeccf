"""Run health from the step metrics: non-finite steps in a row stop the run; a collapsed gradient is reported.

    health = RunHealth(cfg.train.max_nonfinite_steps)
    health.observe(step, metrics)      # adds train/nonfinite_steps_total; warns
    logger.log(step, metrics)
    health.stop_if_diverged()          # NonFiniteTraining after train.max_nonfinite_steps skipped steps in a row
    run_state["health"] = health.state_dict()   # checkpointed; load_state_dict on resume

The trainer already skipped the optimizer step whose loss or gradient norm was NaN / inf (on every rank:
the flag is all-reduced, so every rank raises at the same step). A gradient norm of exactly 0 with response
tokens to learn from, `max_nonfinite_steps` steps in a row, means the model collapsed (e.g. a huge learning
rate saturated the softmax): that is a warning, not an error.
"""
from __future__ import annotations

import math
from typing import Optional


class NonFiniteTraining(RuntimeError):
    """`train.max_nonfinite_steps` optimizer steps in a row had a NaN / inf loss or gradient norm."""


class RunHealth:
    def __init__(self, max_nonfinite_steps: int):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0.0
        self.zero_grad_in_a_row = 0
        self.collapsed_since: Optional[int] = None
        self._error: Optional[str] = None

    def observe(self, step: int, metrics: dict) -> None:
        skipped = metrics.get("train/nonfinite_steps", 0.0)
        self.nonfinite_total += skipped
        metrics["train/nonfinite_steps_total"] = self.nonfinite_total
        if skipped:
            self.nonfinite_in_a_row += 1
            loss = metrics.get("loss/total", 0.0)
            metric, value = ("loss/total", loss) if not math.isfinite(loss) else \
                ("train/grad_norm", metrics.get("train/grad_norm", float("nan")))
            print(f"warning: step {step}: {metric}={value}: optimizer step skipped ({self.nonfinite_in_a_row} "
                  f"in a row; the run stops at train.max_nonfinite_steps={self.max_nonfinite_steps})", flush=True)
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                self._error = (f"step {step}: {metric} is {value}: {self.nonfinite_in_a_row} optimizer steps in a row "
                               f"had a NaN / inf loss or gradient norm (train.max_nonfinite_steps="
                               f"{self.max_nonfinite_steps}); the run stopped. The last checkpoint holds finite "
                               f"weights: lower optim.lr (or set optim.clip_grad) and --resume")
        else:
            self.nonfinite_in_a_row = 0
        self._observe_collapse(step, metrics)

    def _observe_collapse(self, step: int, metrics: dict) -> None:
        grad_norm = metrics.get("train/grad_norm")
        if grad_norm == 0.0 and metrics.get("train/num_response_tokens", 0.0) > 0:
            self.zero_grad_in_a_row += 1
        else:
            self.zero_grad_in_a_row, self.collapsed_since = 0, None
            return
        if self.zero_grad_in_a_row == self.max_nonfinite_steps:
            self.collapsed_since = step - self.zero_grad_in_a_row + 1
            print(f"warning: step {step}: train/grad_norm is exactly 0 for {self.zero_grad_in_a_row} steps in a row "
                  f"with response tokens to learn from: the model has probably collapsed (optim.lr too high?); "
                  f"its weights no longer change", flush=True)

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps, so that a resumed run counts as an uninterrupted one would."""
        return {"nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total,
                "zero_grad_in_a_row": self.zero_grad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        """Counters from `state_dict` (a checkpoint written before they were kept has none: they stay 0)."""
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = float(state.get("nonfinite_total", 0.0))
        self.zero_grad_in_a_row = int(state.get("zero_grad_in_a_row", 0))

    def stop_if_diverged(self) -> None:
        if self._error is not None:
            raise NonFiniteTraining(self._error)

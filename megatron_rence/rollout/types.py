"""Plain dataclasses exchanged with rollout engines: sampling parameters in, completions out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of completions.

    `temperature == 0` means greedy decoding (log-probs are then those of the unscaled logits).
    `top_k <= 0` and `top_p == 1` disable those filters. `stop` strings end a completion (the matched
    string is cut from `Completion.text`; the token that completed it stays in `token_ids`). `seed`
    makes sampling reproducible on the CPU engine; SGLang honours its per-request seeds only when started
    with `enable_deterministic_inference` (rollout.sglang.extra_args), otherwise it samples freely.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop: empty stop string in {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class GenerateRequest:
    """One engine call: each prompt (token ids) is sampled `n` times with `params`."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"GenerateRequest.n: must be >= 1, got {self.n}")
        for i, prompt in enumerate(self.prompts):
            if not prompt:
                raise ValueError(f"GenerateRequest.prompts[{i}] is empty: every prompt needs at least one token")

    def rows(self) -> list[tuple[int, int]]:
        """(prompt index, sample index) of each flat row, prompt-major: the order engines generate in."""
        return [(i, j) for i in range(len(self.prompts)) for j in range(self.n)]


@dataclass
class Completion:
    """One sampled response.

    `token_ids` excludes the prompt and any padding and includes the eos token when one was generated.
    `logprobs[i]` is the sampling policy's log-prob of `token_ids[i]`: log_softmax(logits / temperature)
    before top-k / top-p filtering (what SGLang returns, and what the trainer recomputes).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    text: str = ""

    def __post_init__(self):
        assert len(self.token_ids) == len(self.logprobs), (len(self.token_ids), len(self.logprobs))


def group_rows(flat: list[Completion], num_prompts: int, n: int) -> list[list[Completion]]:
    """Prompt-major flat rows -> [num_prompts][n]."""
    assert len(flat) == num_prompts * n, (len(flat), num_prompts, n)
    return [flat[i * n:(i + 1) * n] for i in range(num_prompts)]

"""Training prompts: synthetic or file records -> rendered, tokenized Prompts in a resumable shuffled order.

File layouts recognised per record (first match wins):
  1. the configured keys `data.problem_key` / `data.answer_key` (defaults "problem" / "answer": MATH-500,
     DeepScaleR `problem`/`answer`/`solution`); an answer containing "####" keeps the part after it;
  2. GSM8K: `question` + `answer` ending in "#### N" -> N (commas removed);
  3. MATH: `problem` + `solution` without an answer field -> the last \\boxed{} of the solution;
  4. DAPO-Math-17k: `prompt` (a list of chat messages; the last user message is the problem, DAPO's own
     instruction text included) + `reward_model.ground_truth`.
`data.extra_train_paths` are read after `data.train_path` into one dataset (layouts may differ per record).
Ids come from `data.id_key`, else an `id` / `unique_id` field, else "file:line". Answers may be strings or
finite numbers; anything else (NaN, inf, an empty string), a missing field, bad JSON, a non-string problem or
a lone surrogate is a ValueError naming the file and line, or, with `data.skip_malformed`, skipped and
counted; so is a line that is not valid UTF-8. A file without any record is a ValueError naming it. Prompts
longer than `data.max_prompt_len` tokens are dropped and counted, and so are records larger than
`data.max_record_bytes` (jsonl lines skipped while reading, never held whole in memory; json items and
parquet rows measured as one jsonl line), before tokenizing: `metrics()`, `summary()`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_rence.data.records import (MalformedRecord, answer_text, boxed_answer, gsm8k_final_answer,
                                         read_records, text_field)
from megatron_rence.data.synthetic import generate_problems
from megatron_rence.data.templates import check_template, encode_prompt, render_prompt


@dataclass
class Prompt:
    id: str
    text: str  # rendered prompt (template applied)
    token_ids: list[int]
    answer: str  # reference answer for the verifier
    problem: str = ""  # the problem before templating


def problem_and_answer(record: dict, problem_key: str = "problem", answer_key: str = "answer") -> tuple[str, str]:
    """(problem, answer) from one record in any layout listed in the module docstring; MalformedRecord if none."""
    if problem_key in record and answer_key in record:
        problem, answer = text_field(record, problem_key), answer_text(record[answer_key], answer_key)
        return problem, gsm8k_final_answer(answer) or answer
    if "question" in record and "answer" in record:
        answer = text_field(record, "answer")
        final = gsm8k_final_answer(answer)
        return text_field(record, "question"), final if final is not None else answer
    if "problem" in record and "solution" in record:
        return text_field(record, "problem"), boxed_answer(text_field(record, "solution"), "solution")
    if isinstance(record.get("prompt"), list) and isinstance(record.get("reward_model"), dict):
        users = [m for m in record["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
        if not users or "ground_truth" not in record["reward_model"]:
            raise MalformedRecord("DAPO layout needs a user message in 'prompt' and reward_model.ground_truth")
        return (text_field(users[-1], "content"),
                answer_text(record["reward_model"]["ground_truth"], "reward_model.ground_truth"))
    missing = problem_key if problem_key not in record else answer_key
    raise MalformedRecord(f"missing field {missing!r} (data.problem_key={problem_key!r}, "
                          f"data.answer_key={answer_key!r}) and no known layout matches "
                          f"(GSM8K, MATH, DAPO); fields: {sorted(record)}")


def _record_id(record: dict, id_key: Optional[str], location: str) -> str:
    if id_key is not None:
        if id_key not in record:
            raise MalformedRecord(f"missing field {id_key!r} (data.id_key)")
        return str(record[id_key])
    for key in ("id", "unique_id"):
        if isinstance(record.get(key), (str, int)):
            return str(record[key])
    return Path(location).name


class PromptDataset:
    """Prompts in a deterministic order: a fresh permutation per epoch from `data.seed`; resumable."""

    def __init__(self, data_cfg, tokenizer):
        check_template(data_cfg.template)
        self.cfg = data_cfg
        self.num_malformed = 0
        self.num_too_long = 0
        self.num_oversized = 0
        raw = self._load_raw()
        self.prompts = self._build_prompts(raw, tokenizer)
        if not self.prompts:
            raise ValueError(f"data: no usable prompts ({len(raw)} records, {self.num_too_long} longer than "
                             f"data.max_prompt_len={data_cfg.max_prompt_len}, {self.num_oversized} lines over "
                             f"data.max_record_bytes={data_cfg.max_record_bytes}, {self.num_malformed} malformed)")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    # ---- loading ----
    def _load_raw(self) -> list[tuple[str, str, str]]:
        if self.cfg.source == "synthetic":
            return [(r["id"], r["problem"], r["answer"]) for r in generate_problems(self.cfg.synthetic)]
        if self.cfg.source != "file":
            raise ValueError(f"data.source: unknown source {self.cfg.source!r} (use 'synthetic' or 'file')")
        if not self.cfg.train_path:
            raise ValueError("data.train_path: data.source=file needs a jsonl or parquet file")
        raw = []
        for key, path in [("data.train_path", self.cfg.train_path),
                          *((f"data.extra_train_paths[{i}]", p) for i, p in enumerate(self.cfg.extra_train_paths))]:
            seen, skipped = 0, self.num_malformed + self.num_oversized
            for location, record in read_records(path, self._on_malformed, self.cfg.max_record_bytes,
                                                 self._on_oversized):
                seen += 1
                try:
                    problem, answer = problem_and_answer(record, self.cfg.problem_key, self.cfg.answer_key)
                    raw.append((_record_id(record, self.cfg.id_key, location), problem, answer))
                except MalformedRecord as exc:
                    self._on_malformed(location, str(exc))
            if not seen and skipped == self.num_malformed + self.num_oversized:  # nothing skipped either
                raise ValueError(f"{path}: no records ({key}): the file is empty")
        return raw

    def _on_malformed(self, location: str, message: str) -> None:
        if not self.cfg.skip_malformed:
            raise ValueError(f"{location}: {message} (set data.skip_malformed=true to skip such records)")
        self.num_malformed += 1

    def _on_oversized(self, location: str, size: int) -> None:
        self.num_oversized += 1

    def _build_prompts(self, raw: list[tuple[str, str, str]], tokenizer) -> list[Prompt]:
        prompts = []
        for record_id, problem, answer in raw:
            text = render_prompt(problem, tokenizer, self.cfg.template, self.cfg.instruction)
            token_ids = encode_prompt(text, tokenizer, self.cfg.template)
            if len(token_ids) > self.cfg.max_prompt_len:
                self.num_too_long += 1
                continue
            prompts.append(Prompt(record_id, text, token_ids, answer, problem))
        return prompts

    # ---- order and resumption ----
    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.cfg.shuffle:
            random.Random(f"{self.cfg.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts; crossing an epoch boundary starts the next epoch's permutation."""
        batch = []
        while len(batch) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.prompts[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.cfg.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off; the dataset must be the same size and seed."""
        if state.get("num_prompts") != len(self.prompts) or state.get("seed") != self.cfg.seed:
            raise ValueError(f"data: resume state is for {state.get('num_prompts')} prompts with seed "
                             f"{state.get('seed')}, but this dataset has {len(self.prompts)} prompts with "
                             f"data.seed={self.cfg.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)

    def metrics(self) -> dict:
        return {"data/num_prompts": len(self.prompts), "data/num_dropped_too_long": self.num_too_long,
                "data/num_dropped_oversized": self.num_oversized, "data/num_malformed": self.num_malformed,
                "data/epoch": self.epoch}

    def summary(self) -> str:
        """One line: usable prompts and what was dropped (and which key controls it)."""
        return summary_line(self.metrics(), self.cfg)

    def __len__(self) -> int:
        return len(self.prompts)


def summary_line(metrics: dict, data_cfg) -> str:
    """"data: N prompts; dropped ..." from `PromptDataset.metrics()` (or a step record holding them)."""
    dropped = [f"{metrics.get('data/num_dropped_too_long', 0):.0f} longer than data.max_prompt_len="
               f"{data_cfg.max_prompt_len} tokens",
               f"{metrics.get('data/num_dropped_oversized', 0):.0f} lines over data.max_record_bytes="
               f"{data_cfg.max_record_bytes}",
               f"{metrics.get('data/num_malformed', 0):.0f} malformed (data.skip_malformed)"]
    return f"data: {metrics.get('data/num_prompts', 0):.0f} prompts; dropped " + ", ".join(dropped)

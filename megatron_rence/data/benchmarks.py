"""Evaluation benchmarks from local files (jsonl / json / parquet) in their usual schemas -> {id, problem, answer}.

Schemas read (field names as published; `format: auto` picks one per file from the first record):
  aime          AIME 2024 / 2025: `problem`/`answer` (HuggingFaceH4, AI-MO, yentinglin), `Problem`/`Answer`/`ID`
                (Maxwell-Jia), `question`/`answer` (opencompass); answers are integers or strings
  amc           AMC 2023: `problem`/`answer` with float answers (27.0 -> "27"), or `question`/`answer`
  math500       MATH-500: `problem`/`solution`/`answer`/`subject`/`level`/`unique_id`
  minerva       Minerva Math: `problem`/`solution` (answer = last \\boxed{} of the solution) or `question`/`answer`
  olympiadbench OlympiadBench: `question`/`final_answer` (a list; several answers are joined with ", " so
                math-verify compares them as a set); records with images are skipped and counted
  gsm8k         GSM8K: `question`/`answer` ending in "#### N"
  synthetic     no file: the held-out split of the recipe's `data.synthetic` task (data/synthetic.py),
                `data.synthetic.num_heldout` problems that training never sees
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_rence.data.records import (MalformedRecord, answer_text, boxed_answer, check_unicode,
                                         gsm8k_final_answer, raise_malformed, read_records)

FORMATS = ("aime", "amc", "math500", "minerva", "olympiadbench", "gsm8k")
_PROBLEM_KEYS = ("problem", "Problem", "question", "Question")
_ID_KEYS = ("id", "ID", "unique_id", "idx", "problem_idx")


def detect_format(record: dict) -> str:
    """The schema of a record (see the module docstring); ValueError when none fits."""
    if "final_answer" in record:
        return "olympiadbench"
    if "subject" in record and "level" in record:
        return "math500"
    answer = record.get("answer", record.get("Answer"))
    if isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if isinstance(answer, float):
        return "amc"
    if answer is not None:
        return "aime"
    if "solution" in record:
        return "minerva"
    raise MalformedRecord(f"cannot detect the benchmark format from fields {sorted(record)} "
                          f"(known: {', '.join(FORMATS)})")


def _first(record: dict, keys: tuple[str, ...], what: str):
    for key in keys:
        if key in record and record[key] is not None:
            return key, record[key]
    raise MalformedRecord(f"missing {what} field (one of {list(keys)}); fields: {sorted(record)}")


def _olympiad_answer(record: dict) -> str:
    final = record["final_answer"]
    if isinstance(final, str):
        final = [final]
    if not isinstance(final, list) or not final or not all(isinstance(a, str) for a in final):
        raise MalformedRecord(f"field 'final_answer' must be a non-empty list of strings, got {final!r}")
    return answer_text(", ".join(a.strip().strip("$").strip() for a in final), "final_answer")


def normalize_record(record: dict, fmt: str) -> tuple[Optional[str], str, str]:
    """(id or None, problem, answer) of one record in schema `fmt`; MalformedRecord when fields are missing."""
    key, problem = _first(record, _PROBLEM_KEYS, "problem")
    if not isinstance(problem, str):
        raise MalformedRecord(f"field {key!r} must be a string, got {type(problem).__name__}")
    check_unicode(problem, key)
    if fmt == "olympiadbench":
        answer = _olympiad_answer(record)
    elif fmt == "minerva" and "answer" not in record:
        answer = boxed_answer(_first(record, ("solution",), "solution")[1], "solution")
    elif fmt == "gsm8k":
        raw = answer_text(_first(record, ("answer",), "answer")[1], "answer")
        answer = gsm8k_final_answer(raw)
        if answer is None:
            raise MalformedRecord("GSM8K answer has no '#### N' final answer")
    else:
        key, value = _first(record, ("answer", "Answer"), "answer")
        answer = answer_text(value, key)
    record_id = next((str(record[k]) for k in _ID_KEYS if record.get(k) is not None), None)
    return record_id, problem, answer


def _has_image(record: dict) -> bool:
    return any(k.startswith("image") and record[k] for k in record) or "Multimodal" in str(record.get("modality", ""))


def load_benchmark(bench_cfg, synthetic_cfg=None) -> tuple[list[dict], dict]:
    """Records `{"id", "problem", "answer"}` of one `eval.benchmarks[i]` entry, and load stats
    `{"format", "num_skipped_images"}`. Errors name the file and line. Format "synthetic" needs
    `synthetic_cfg` (the recipe's data.synthetic)."""
    if bench_cfg.format == "synthetic":
        if synthetic_cfg is None:
            raise ValueError(f"eval.benchmarks: {bench_cfg.name!r}: format synthetic needs the recipe's data.synthetic")
        from megatron_rence.data.synthetic import generate_problems

        return generate_problems(synthetic_cfg, split="heldout"), {"format": "synthetic", "num_skipped_images": 0}
    if not bench_cfg.path:
        raise ValueError(f"eval.benchmarks: benchmark {bench_cfg.name!r} has no path")
    if bench_cfg.format != "auto" and bench_cfg.format not in FORMATS:
        raise ValueError(f"eval.benchmarks: {bench_cfg.name}: unknown format {bench_cfg.format!r}")
    name = benchmark_name(bench_cfg)
    fmt = None if bench_cfg.format == "auto" else bench_cfg.format
    records, skipped = [], 0
    for location, record in read_records(bench_cfg.path, raise_malformed):
        try:
            fmt = fmt or detect_format(record)
            if fmt == "olympiadbench" and _has_image(record):
                skipped += 1
                continue
            record_id, problem, answer = normalize_record(record, fmt)
        except MalformedRecord as exc:
            raise ValueError(f"{location}: {exc} (benchmark {name}, format {fmt or 'auto'})") from None
        records.append({"id": record_id or f"{name}-{len(records)}", "problem": problem, "answer": answer})
    if not records:
        raise ValueError(f"{bench_cfg.path}: benchmark {name} has no usable records")
    return records, {"format": fmt, "num_skipped_images": skipped}


def benchmark_name(bench_cfg) -> str:
    if not bench_cfg.name and bench_cfg.format == "synthetic":
        return "heldout"
    return bench_cfg.name or Path(bench_cfg.path).stem


def check_benchmarks(eval_cfg, synthetic_cfg) -> None:
    """Load each `eval.benchmarks` entry once, so that a missing file, an unusable record or a held-out split
    larger than the task space is a ValueError naming the entry before any training (--dry-run, run setup)
    rather than at the first evaluation. Nothing to check when the run never evaluates."""
    if not eval_cfg.benchmarks or not (eval_cfg.every or eval_cfg.at_start):
        return
    for i, bench in enumerate(eval_cfg.benchmarks):
        try:
            load_benchmark(bench, synthetic_cfg)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"eval.benchmarks[{i}] ({benchmark_name(bench)}): {exc}") from None

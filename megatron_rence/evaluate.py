"""Benchmark evaluation: k samples per problem from a rollout engine, graded by the reward pool -> avg@k, pass@k.

From training: `evaluate(engine, tokenizer, cfg.eval, cfg.data, reward_pool, out_dir, step)` returns flat
metrics (`eval/<benchmark>/avg@k`, `eval/<benchmark>/pass@j` for j = 1, 2, 4, ..., k) and writes, under
`out_dir[/step_NNNNNN]`: `results.md` (a table), `results.json`, and `<benchmark>.jsonl` (per problem: the k
responses, extracted answers, statuses, rewards); `out_dir/summary.jsonl` holds one line per evaluated step,
keyed by step (evaluating a step again replaces its line; `reconcile_summary` drops the steps a resume will run
again), in step order.
With several engines (training with one SGLang engine per inference TP group) every engine samples and
grades its contiguous share of each benchmark, as in rollout, and the results are gathered on every rank
(`shard`, `gather`); only the writing rank writes the reports.

Standalone: `rence-eval RECIPE [overrides] --hf-dir DIR [--bench NAME=PATH[:FORMAT]] [--out DIR]` evaluates
an HF-format directory (config.json + *.safetensors, e.g. written by tools/export_megatron_to_hf.py): the
engine named by `rollout.engine` is built from its config and fed its tensors through `update_weights`,
the same path the trainer's weight sync uses. Prompts use the recipe's `data.template` / `data.instruction`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from megatron_rence.cli import handle_info_flags, load_or_exit, recipe_parser, set_cpu_threads
from megatron_rence.config import BenchmarkConfig
from megatron_rence.data.benchmarks import FORMATS, benchmark_name, load_benchmark
from megatron_rence.data.templates import encode_prompt, render_prompt
from megatron_rence.rewards.math import GradeResult, fallback_fractions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0  # C(n-c, k) / C(n, k) as a product, stable for large n
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def report_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks, j = [], 1
    while j < k:
        ks.append(j)
        j *= 2
    return ks + [k]


def sample_and_grade(engine, tokenizer, records: list[dict], eval_cfg, data_cfg, reward_pool,
                     progress: bool = False, desc: str = "eval") -> list[dict]:
    """Per-problem results: k completions of each rendered problem, graded against its answer
    (with `progress`, a progress bar over the problems, advanced after each engine batch)."""
    from tqdm import tqdm

    from megatron_rence.rollout.types import SamplingParams

    params = SamplingParams(temperature=eval_cfg.temperature, top_p=eval_cfg.top_p, top_k=-1,
                            max_new_tokens=eval_cfg.max_new_tokens, stop=[], seed=eval_cfg.seed)
    k = eval_cfg.num_samples
    token_ids = [encode_prompt(render_prompt(r["problem"], tokenizer, data_cfg.template, data_cfg.instruction),
                               tokenizer, data_cfg.template) for r in records]
    completions = []
    with tqdm(total=len(records), desc=desc, unit="problem", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for start in range(0, len(records), eval_cfg.prompts_per_batch):
            batch = engine.generate(token_ids[start:start + eval_cfg.prompts_per_batch], params, k)
            assert all(len(samples) == k for samples in batch), "engine.generate must return n samples per prompt"
            completions.extend(batch)
            bar.update(len(batch))
    texts = [c.text for samples in completions for c in samples]
    grades = reward_pool.grade(texts, [r["answer"] for r in records for _ in range(k)])
    results = []
    for i, (record, samples) in enumerate(zip(records, completions)):
        graded = grades[i * k:(i + 1) * k]
        correct = [g.reward == reward_pool.cfg.correct for g in graded]
        results.append({**record, "num_correct": sum(correct), "correct": correct,
                        "responses": [c.text for c in samples], "extracted": [g.extracted for g in graded],
                        "statuses": [g.status for g in graded], "rewards": [g.reward for g in graded],
                        "sources": [g.source for g in graded],
                        "response_lens": [len(c.token_ids) for c in samples],
                        "finish_reasons": [c.finish_reason for c in samples]})
    return results


def summarize(results: list[dict], k: int) -> dict:
    """avg@k, pass@j (j in report_ks(k)), mean response length, truncated fraction and the shares of answers
    (all / correct ones) that a fallback found instead of \\boxed{} (rewards.math.fallback_fractions)."""
    n = len(results)
    summary = {"num_problems": n, f"avg@{k}": sum(r["num_correct"] / k for r in results) / n}
    for j in report_ks(k):
        summary[f"pass@{j}"] = sum(pass_at_k(k, r["num_correct"], j) for r in results) / n
    lens = [length for r in results for length in r["response_lens"]]
    summary["response_len_mean"] = sum(lens) / len(lens)
    summary["truncated_frac"] = sum(f == "length" for r in results for f in r["finish_reasons"]) / len(lens)
    grades = [GradeResult(float(ok), None, status, source=source) for r in results
              for ok, status, source in zip(r["correct"], r["statuses"], r["sources"])]
    summary.update(fallback_fractions(grades))
    return summary


def markdown_table(summaries: dict[str, dict], k: int, step: Optional[int]) -> str:
    ks = report_ks(k)
    header = ["benchmark", "problems", f"avg@{k}"] + [f"pass@{j}" for j in ks] + ["mean len", "truncated",
                                                                                 "fallback", "correct via fallback"]
    lines = [f"# Evaluation{'' if step is None else f' at step {step}'}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        cells = [name, str(s["num_problems"]), f"{100 * s[f'avg@{k}']:.1f}"]
        cells += [f"{100 * s[f'pass@{j}']:.1f}" for j in ks]
        cells += [f"{s['response_len_mean']:.0f}", f"{100 * s['truncated_frac']:.1f}%",
                  f"{100 * s['fallback_frac']:.1f}%", f"{100 * s['correct_fallback_frac']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def engine_share(num_items: int, engine_index: int, num_engines: int) -> list[int]:
    """The contiguous indices engine `engine_index` of `num_engines` handles (rollout splits prompts the same way).

    >>> engine_share(5, 0, 2), engine_share(5, 1, 2), engine_share(1, 1, 2)
    ([0, 1, 2], [3, 4], [])
    """
    return [i for i in range(num_items) if i * num_engines // num_items == engine_index]


def sample_and_grade_share(engine, tokenizer, records: list[dict], eval_cfg, data_cfg, reward_pool,
                           shard: tuple[int, int], gather: Optional[Callable[[list], list]],
                           progress: bool = False, desc: str = "eval") -> list[dict]:
    """Every record's results: this engine's share sampled here (none when `engine` is None), the rest gathered."""
    mine = engine_share(len(records), *shard) if engine is not None else []
    local = list(zip(mine, sample_and_grade(engine, tokenizer, [records[i] for i in mine], eval_cfg, data_cfg,
                                            reward_pool, progress, desc=desc))) if mine else []
    everything = sorted(gather(local) if gather is not None else local, key=lambda item: item[0])
    assert [i for i, _ in everything] == list(range(len(records))), "every problem must be evaluated exactly once"
    return [result for _, result in everything]


def evaluate(engine, tokenizer, eval_cfg, data_cfg, reward_pool, out_dir, step: Optional[int] = None,
             shard: tuple[int, int] = (0, 1), gather: Optional[Callable[[list], list]] = None,
             write: bool = True, progress: bool = False) -> dict:
    """Evaluate every `eval_cfg.benchmarks` entry; write the reports (when `write`); return `eval/...` metrics.

    `shard` = (this engine's index, number of engines): this engine samples and grades its share of each
    benchmark; `gather` (a collective every rank calls: local list -> every rank's lists concatenated)
    joins the shares. Ranks without an engine pass `engine=None` and only take part in the gather.
    `progress`: a progress bar per benchmark."""
    if eval_cfg.num_samples < 1:
        raise ValueError(f"eval.num_samples: must be >= 1, got {eval_cfg.num_samples}")
    if not eval_cfg.benchmarks:
        raise ValueError("eval.benchmarks: nothing to evaluate (add entries with name, path, format)")
    k, root = eval_cfg.num_samples, Path(out_dir)
    out = root / f"step_{step:06d}" if step is not None else root
    if write:
        out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    for bench in eval_cfg.benchmarks:
        name = benchmark_name(bench)
        records, info = load_benchmark(bench, data_cfg.synthetic)
        results = sample_and_grade_share(engine, tokenizer, records, eval_cfg, data_cfg, reward_pool, shard, gather,
                                         progress, desc=f"eval {name} ({len(records)} problems x {k})")
        summaries[name] = {**summarize(results, k), **info}
        if write:
            with (out / f"{name}.jsonl").open("w") as f:
                for r in results:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    metrics = {f"eval/{name}/{key}": value for name, s in summaries.items() for key, value in s.items()
               if isinstance(value, (int, float))}
    metrics[f"eval/avg@{k}"] = sum(s[f"avg@{k}"] for s in summaries.values()) / len(summaries)
    if not write:
        return metrics
    (out / "results.md").write_text(markdown_table(summaries, k, step))
    (out / "results.json").write_text(json.dumps({"step": step, "k": k, "benchmarks": summaries}, indent=2))
    write_summary_line(root, step, metrics)
    return metrics


SUMMARY = "summary.jsonl"


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def write_summary_line(root: Path, step: Optional[int], metrics: dict) -> None:
    """Put step `step`'s line into `root/summary.jsonl`, replacing an earlier line of the same step (a step
    evaluated again after a resume); lines stay in step order. Standalone evaluations (step None) are appended."""
    from megatron_rence.metrics import parse_records

    path = root / SUMMARY
    records = parse_records(path) if path.exists() else []
    line = json.dumps({"step": step, **metrics})
    if step is None:
        _rewrite(path, [text for text, _ in records] + [line])
        return
    kept = [(r.get("step"), text) for text, r in records if r.get("step") != step]
    ordered = sorted(kept + [(step, line)], key=lambda item: (item[0] is None, item[0] or 0))
    _rewrite(path, [text for _, text in ordered])


def reconcile_summary(out_dir: Path, resume_step: Optional[int]) -> None:
    """At the start of a training run (the writing rank). Resuming from step S: the summary lines and
    `step_*` reports after S are removed (those steps are about to be run again, as metrics.jsonl's lines
    are). A fresh run: a summary.jsonl left by an earlier run that stopped before its first checkpoint is
    kept as summary.jsonl.<n> (train.overwrite already set a finished run's aside)."""
    import shutil

    from megatron_rence.metrics import keep_aside, parse_records

    path = Path(out_dir) / SUMMARY
    if resume_step is None:
        if path.exists():
            keep_aside(path, "eval summary")
        return
    if path.exists():
        records = parse_records(path)
        kept = [text for text, r in records if r.get("step") is None or r["step"] <= resume_step]
        if len(kept) != len(records):
            print(f"eval: dropped {len(records) - len(kept)} line(s) after step {resume_step} from {path} "
                  f"(resuming from step {resume_step})", flush=True)
            _rewrite(path, kept)
    for report in sorted(Path(out_dir).glob("step_*")):
        if report.is_dir() and report.name[5:].isdigit() and int(report.name[5:]) > resume_step:
            shutil.rmtree(report)


def load_hf_engine(cfg, hf_dir: Path, tokenizer):
    """The recipe's rollout engine built from an HF directory's config and fed its safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    files = sorted(hf_dir.glob("*.safetensors"))
    if not (hf_dir / "config.json").is_file() or not files:
        raise FileNotFoundError(f"--hf-dir {hf_dir}: needs config.json and *.safetensors "
                                "(export a Megatron checkpoint with tools/export_megatron_to_hf.py)")
    from megatron_rence.rollout.engine import build_engine

    engine = build_engine(cfg, AutoConfig.from_pretrained(str(hf_dir), local_files_only=True), tokenizer)
    for path in files:  # one shard at a time, as the trainer's sync sends buckets
        engine.update_weights(list(load_file(str(path)).items()), version=0)
    return engine


def _parse_bench(spec: str) -> BenchmarkConfig:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--bench {spec!r}: expected NAME=PATH[:FORMAT]")
    head, _, tail = rest.rpartition(":")
    path, fmt = (head, tail) if head and tail in FORMATS + ("auto",) else (rest, "auto")
    if rest == "synthetic":  # --bench heldout=synthetic: the recipe's held-out split
        path, fmt = "", "synthetic"
    return BenchmarkConfig(name=name, path=path, format=fmt)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser("rence-eval", "Evaluate a model on math benchmarks (avg@k, pass@k).")
    parser.add_argument("--hf-dir", type=Path, help="HF-format model directory (config.json + safetensors)")
    parser.add_argument("--checkpoint", type=Path, help="a Megatron checkpoint: export it with "
                        "tools/export_megatron_to_hf.py and pass --hf-dir instead")
    parser.add_argument("--bench", action="append", default=[], help="NAME=PATH[:FORMAT], adds a benchmark")
    parser.add_argument("--out", type=Path, help="output directory (default: eval.out_dir or <run_dir>/eval)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(args)
    if handle_info_flags(args, cfg):
        return 0
    from megatron_rence.data.tokenizer import load_tokenizer
    from megatron_rence.rewards.pool import RewardPool

    set_cpu_threads(cfg.train.num_threads)

    try:
        cfg.eval.benchmarks = list(cfg.eval.benchmarks) + [_parse_bench(b) for b in args.bench]
        if args.hf_dir is None:
            raise ValueError("--hf-dir is required" + (" (a Megatron --checkpoint must first be exported with "
                                                       "tools/export_megatron_to_hf.py)" if args.checkpoint else ""))
        tokenizer = load_tokenizer(cfg.model)
        engine = load_hf_engine(cfg, args.hf_dir, tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or Path(cfg.eval.out_dir or Path(cfg.train.run_dir) / "eval")
    try:
        with RewardPool(cfg.reward) as pool:
            evaluate(engine, tokenizer, cfg.eval, cfg.data, pool, out_dir, progress=cfg.logging.progress_bar)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

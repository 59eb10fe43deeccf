"""Evaluation: pass@k by hand, avg@k / pass@k over a benchmark, reports on disk, rence-eval argument errors.

`ScriptedEngine` is a test double for the rollout engine (the real engines are tested in their own
package): it returns scripted completions per prompt, so the expected metrics can be computed by hand.
"""
import json
from dataclasses import dataclass
from math import comb

import pytest

from megatron_rence.config import BenchmarkConfig, DataConfig, EvalConfig, RewardConfig
from megatron_rence.data.templates import encode_prompt, render_prompt
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.evaluate import main, pass_at_k, report_ks, summarize
from megatron_rence.rewards.pool import RewardPool


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
    (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 1, 0.3),
    (16, 0, 8, 0.0),
    (8, 8, 8, 1.0),
    (8, 1, 8, 1.0),
    (3, 1, 2, 2 / 3),  # 1 - C(2,2)/C(3,2)
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_n():
    for n, c, k in [(64, 5, 16), (200, 3, 50), (1000, 10, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-9)


def test_report_ks():
    assert report_ks(1) == [1] and report_ks(4) == [1, 2, 4] and report_ks(6) == [1, 2, 4, 6]


@dataclass
class FakeCompletion:
    token_ids: list
    text: str
    finish_reason: str = "stop"


class ScriptedEngine:
    """Test double: `script[prompt token ids] = list of k response texts`."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompts, params, n):
        self.calls.append((len(prompts), params.temperature, n))
        out = []
        for ids in prompts:
            texts = self.script[tuple(ids)]
            assert len(texts) == n
            out.append([FakeCompletion([1] * len(t), t, "length" if t == "" else "stop") for t in texts])
        return out


PROBLEMS = [("p1", "1+1", "2", ["\\boxed{2}", "3", "2", "\\boxed{5}"]),  # 2 of 4 correct
            ("p2", "2+2", "4", ["1", "", "\\boxed{5}", "7"]),  # 0 of 4
            ("p3", "3*3", "9", ["9", "\\boxed{9}", "\\boxed{9.0}", "so 9"])]  # 4 of 4


def _toy_benchmark(tmp_path):
    """The synthetic tokenizer, a data config, PROBLEMS written as a jsonl benchmark, and the scripted
    responses keyed by each problem's prompt tokens."""
    tok = build_synthetic_tokenizer()
    data_cfg = DataConfig(template="{problem}=")
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, p, a, _ in PROBLEMS))
    script = {tuple(encode_prompt(render_prompt(p, tok, data_cfg.template), tok, data_cfg.template)): r
              for _, p, _, r in PROBLEMS}
    return tok, data_cfg, bench, script


def test_evaluate_metrics_and_reports(tmp_path):
    pytest.importorskip("megatron_rence.rollout.types")
    from megatron_rence.evaluate import evaluate

    tok, data_cfg, bench, script = _toy_benchmark(tmp_path)
    engine = ScriptedEngine(script)
    eval_cfg = EvalConfig(benchmarks=[BenchmarkConfig(name="toy", path=str(bench))], num_samples=4,
                          temperature=0.7, prompts_per_batch=2)
    with RewardPool(RewardConfig(num_workers=0)) as pool:
        metrics = evaluate(engine, tok, eval_cfg, data_cfg, pool, tmp_path / "eval", step=7)
    assert engine.calls == [(2, 0.7, 4), (1, 0.7, 4)]
    assert metrics["eval/toy/avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["eval/toy/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/toy/pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert metrics["eval/toy/pass@4"] == pytest.approx(2 / 3)
    assert metrics["eval/toy/num_problems"] == 3 and metrics["eval/avg@4"] == metrics["eval/toy/avg@4"]
    assert metrics["eval/toy/truncated_frac"] == pytest.approx(1 / 12)
    # 11 answers extracted ("" has none); 6 by last_number: "3", "2", "1", "7", "9", "so 9";
    # 6 correct, 3 of them by last_number ("2", "9", "so 9")
    assert metrics["eval/toy/fallback_frac"] == pytest.approx(6 / 11)
    assert metrics["eval/toy/correct_fallback_frac"] == pytest.approx(0.5)
    out = tmp_path / "eval" / "step_000007"
    rows = [json.loads(line) for line in (out / "toy.jsonl").read_text().splitlines()]
    assert [r["num_correct"] for r in rows] == [2, 0, 4]
    assert rows[0]["correct"] == [True, False, True, False] and rows[1]["statuses"][1] == "no_answer"
    table = (out / "results.md").read_text()
    assert "| toy | 3 | 50.0 | 50.0 | 61.1 | 66.7 | 5 | 8.3% | 54.5% | 50.0% |" in table
    assert rows[2]["sources"] == ["last_number", "boxed", "boxed", "last_number"]
    assert json.loads((out / "results.json").read_text())["benchmarks"]["toy"]["pass@4"] == pytest.approx(2 / 3)
    summary = (tmp_path / "eval" / "summary.jsonl").read_text().splitlines()
    assert len(summary) == 1 and json.loads(summary[0])["step"] == 7


def test_summarize_single_sample():
    results = [{"num_correct": 1, "response_lens": [3], "finish_reasons": ["stop"], "correct": [True],
                "statuses": ["ok"], "sources": ["boxed"]},
               {"num_correct": 0, "response_lens": [5], "finish_reasons": ["length"], "correct": [False],
                "statuses": ["no_answer"], "sources": [None]}]
    s = summarize(results, 1)
    assert s["avg@1"] == s["pass@1"] == 0.5 and s["response_len_mean"] == 4 and s["truncated_frac"] == 0.5
    assert s["fallback_frac"] == s["correct_fallback_frac"] == 0.0


def test_synthetic_heldout_benchmark(tmp_path):
    """format synthetic: the recipe's held-out split, no file; the same problems on every call."""
    from megatron_rence.config import SyntheticTaskConfig
    from megatron_rence.data.benchmarks import load_benchmark
    from megatron_rence.data.synthetic import is_heldout

    task = SyntheticTaskConfig(kind="word_problems", min_value=1, max_value=20, operators="+-", num_heldout=12)
    records, info = load_benchmark(BenchmarkConfig(format="synthetic"), task)
    assert len(records) == 12 and info["format"] == "synthetic" and all(is_heldout(r["problem"]) for r in records)
    assert records == load_benchmark(BenchmarkConfig(name="h", format="synthetic"), task)[0]
    with pytest.raises(ValueError, match="data.synthetic.num_heldout"):
        load_benchmark(BenchmarkConfig(format="synthetic"), SyntheticTaskConfig())


def test_rence_eval_argument_errors(tmp_path, capsys):
    recipe = "recipes/demo_cpu.yaml"
    assert main([recipe]) == 2
    assert "--hf-dir is required" in capsys.readouterr().err
    assert main([recipe, "--checkpoint", str(tmp_path)]) == 2
    assert "export_megatron_to_hf" in capsys.readouterr().err
    assert main([recipe, "--hf-dir", str(tmp_path)]) == 2
    assert "needs config.json and *.safetensors" in capsys.readouterr().err
    assert main([recipe, "--bench", "oops"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_evaluation_split_across_engines_gives_the_single_engine_results(tmp_path):
    """Two engines (threads standing in for ranks; `gather` is their all_gather) each sample their contiguous
    share, a third rank without an engine only gathers; every rank gets the single-engine metrics, only the
    writing rank writes the reports."""
    import threading

    from megatron_rence.evaluate import evaluate

    tok, data_cfg, bench, script = _toy_benchmark(tmp_path)
    eval_cfg = EvalConfig(benchmarks=[BenchmarkConfig(name="toy", path=str(bench))], num_samples=4, prompts_per_batch=2)
    with RewardPool(RewardConfig(num_workers=0)) as pool:
        single = evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, tmp_path / "single", step=1)

    parts, barrier = [None] * 3, threading.Barrier(3)

    def gather(rank):
        def all_gather(local):
            parts[rank] = local
            barrier.wait()
            return [item for part in parts for item in part]
        return all_gather

    engines = [ScriptedEngine(script), ScriptedEngine(script), None]
    results = [None] * 3

    def rank_main(rank):
        with RewardPool(RewardConfig(num_workers=0)) as pool:
            results[rank] = evaluate(engines[rank], tok, eval_cfg, data_cfg, pool, tmp_path / "split", step=1,
                                     shard=(min(rank, 1), 2), gather=gather(rank), write=rank == 0)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [e.calls for e in engines[:2]] == [[(2, 0.6, 4)], [(1, 0.6, 4)]]  # problems 0-1 and 2
    assert results[0] == results[1] == results[2] == single
    assert (tmp_path / "split" / "step_000001" / "toy.jsonl").read_text() == \
        (tmp_path / "single" / "step_000001" / "toy.jsonl").read_text()
    assert len((tmp_path / "split" / "summary.jsonl").read_text().splitlines()) == 1


def test_training_evaluates_every_n_steps_and_at_the_last_step(monkeypatch):
    """eval.every=4 with 10 steps: steps 4, 8 and 10 (the run's last step is always evaluated), never 0."""
    from types import SimpleNamespace

    import megatron_rence.evaluate
    from megatron_rence.config import Config
    from megatron_rence.train import maybe_evaluate

    steps = []
    monkeypatch.setattr(megatron_rence.evaluate, "evaluate", lambda *a, step, **kw: steps.append(step) or {"e": 1.0})
    cfg = Config()
    cfg.eval.every, cfg.train.num_steps = 4, 10
    cfg.eval.benchmarks = [BenchmarkConfig(name="toy", path="toy.jsonl")]
    run = SimpleNamespace(cfg=cfg, engine=None, engine_index=0, num_engines=1, tokenizer=None, reward_pool=None,
                          pstate=SimpleNamespace(rank=0))
    got = {step: maybe_evaluate(run, step) for step in range(1, 11)}
    assert steps == [4, 8, 10] and [s for s, m in got.items() if m] == [4, 8, 10]
    cfg.eval.every = 0
    assert maybe_evaluate(run, 10) == {} and steps == [4, 8, 10]


def _summary_steps(root, name="summary.jsonl"):
    return [json.loads(line)["step"] for line in (root / name).read_text().splitlines()]


def test_summary_is_keyed_by_step_and_reconciled_on_resume_and_fresh_start(tmp_path, capsys):
    """The report's case: evaluations at 5, 10, 12, then a resume from step 10's checkpoint re-runs step 12
    (and a step evaluated twice must not appear twice); a fresh start keeps an old summary aside."""
    pytest.importorskip("megatron_rence.rollout.types")
    from megatron_rence.evaluate import evaluate, reconcile_summary

    tok, data_cfg, bench, script = _toy_benchmark(tmp_path)
    eval_cfg = EvalConfig(benchmarks=[BenchmarkConfig(name="toy", path=str(bench))], num_samples=4)
    root = tmp_path / "eval"
    with RewardPool(RewardConfig(num_workers=0)) as pool:
        for step in (5, 10, 12):
            evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root, step=step)
        assert _summary_steps(root) == [5, 10, 12]
        reconcile_summary(root, resume_step=10)  # --resume from step 10
        assert _summary_steps(root) == [5, 10] and not (root / "step_000012").exists()
        assert (root / "step_000010").is_dir() and "dropped 1 line(s) after step 10" in capsys.readouterr().out
        evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root, step=10)  # step 10 once more
        evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root, step=12)
        assert _summary_steps(root) == [5, 10, 12]
        reconcile_summary(root, resume_step=None)  # a fresh run in this run dir (no checkpoint to resume)
        assert not (root / "summary.jsonl").exists() and _summary_steps(root, "summary.jsonl.1") == [5, 10, 12]
        evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root, step=5)
        assert _summary_steps(root) == [5]
        evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root)  # standalone (step None): appended
        evaluate(ScriptedEngine(script), tok, eval_cfg, data_cfg, pool, root)
        assert _summary_steps(root) == [5, None, None]


def test_summary_with_a_torn_last_line_is_repaired_not_appended_to(tmp_path):
    from megatron_rence.evaluate import write_summary_line

    (tmp_path / "summary.jsonl").write_text('{"step": 1, "eval/avg@4": 0.5}\n{"step": 2, "eval/av')
    write_summary_line(tmp_path, 2, {"eval/avg@4": 0.75})
    assert [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()] == [
        {"step": 1, "eval/avg@4": 0.5}, {"step": 2, "eval/avg@4": 0.75}]

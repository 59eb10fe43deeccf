"""Issue 28 (input validation), short real runs on CPU: eval misconfiguration refused by --dry-run and before the
first step; a step that fails after its update (evaluation) is checkpointed so --resume loses nothing; data and
disk errors end in one line naming the file, without a traceback."""
import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_train_loop import REPO, TINY, _env, _metrics

EVAL = ["eval.every=2", "eval.num_samples=1", "eval.max_new_tokens=2", "eval.prompts_per_batch=4"]


def _bench(tmp_path: Path) -> str:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1", "answer": i + 1}) + "\n" for i in range(3)))
    return f"eval.benchmarks=[{{name: sums, path: {path}, format: aime}}]"


def _run(run_dir: Path, *overrides: str, flag: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY,
           f"train.run_dir={run_dir}", *overrides] + ([flag] if flag else [])
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def test_dry_run_and_launch_refuse_eval_misconfiguration(tmp_path):
    missing = tmp_path / "aime.jsonl"
    cases = [([f"eval.benchmarks=[{{name: aime, path: {missing}}}]"],
              f"eval.benchmarks[0] (aime): data file not found: {missing}"),
             (["eval.benchmarks=[{format: synthetic}]", "data.synthetic.num_heldout=100"],  # 3 x 3 sums
              "eval.benchmarks[0] (heldout): data.synthetic.num_heldout: 100 exceeds the 9 distinct problems")]
    for overrides, message in cases:
        proc = _run(tmp_path / "run", *EVAL, *overrides, flag="--dry-run")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "is valid" not in proc.stdout
    proc = _run(tmp_path / "run", *EVAL, *cases[0][0], "train.num_steps=2")  # a launch fails before step 1
    assert proc.returncode == 1 and cases[0][1] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list(tmp_path.glob("run/checkpoints/iter_*"))
    assert _run(tmp_path / "run", *EVAL, _bench(tmp_path), flag="--dry-run").returncode == 0


def test_a_step_failing_in_evaluation_is_checkpointed_and_resumed(tmp_path):
    run_dir, blocker = tmp_path / "run", tmp_path / "not_a_dir"
    blocker.write_text("")  # eval.out_dir below a regular file: the first evaluation (step 2) fails
    proc = _run(run_dir, *EVAL, _bench(tmp_path), "train.num_steps=3", "checkpoint.every=0",
                f"eval.out_dir={blocker / 'eval'}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: step 2 failed after its optimizer update" in proc.stderr and str(blocker) in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"  # checkpoint.every=0: only the emergency one
    proc = _run(run_dir, *EVAL, _bench(tmp_path), "train.num_steps=3", "checkpoint.every=0", flag="--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {ckpts / 'iter_0000002'} at step 2" in proc.stdout
    assert [r["step"] for r in _metrics(run_dir)] == [1, 3]  # step 2's metrics were never logged; nothing re-run
    assert (run_dir / "eval" / "step_000003" / "results.json").is_file()


def test_bad_data_and_full_disk_errors_name_the_file_without_traceback(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n" + '{"problem": "1+\\ud800", "answer": "2"}\n')
    proc = _run(tmp_path / "run", "data.source=file", f"data.train_path={data}", "train.num_steps=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: {data}:2: field 'problem' is not valid Unicode: a lone surrogate" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("run/checkpoints/iter_*"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _run(tmp_path / "run2", "data.source=file", f"data.train_path={empty}", "train.num_steps=1")
    assert proc.returncode == 1 and f"error: {empty}: no records (data.train_path): the file is empty" in proc.stderr

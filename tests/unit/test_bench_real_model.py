"""benchmarks/real_model_objectives.py's report: the table from run results, and the doc section replaced in place."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("real_model_objectives", ROOT / "benchmarks" / "real_model_objectives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(avg, fallback=1.0, length=80.0):
    return {"avg@4": avg, "pass@4": min(1.0, 2 * avg), "fallback_frac": fallback, "correct_fallback_frac": fallback,
            "truncated_frac": 0.25, "response_len_mean": length}


def test_report_and_section_replacement(tmp_path):
    b = _bench()
    before = {**_summary(0.172), "seconds": 60.0}
    results = [{"objective": "rence", "seconds": 1200.0, "after": _summary(0.5, 0.5, 30.0), "skipped": 1.0,
                "records": [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.3}]},
               {"objective": "grpo", "seconds": 1100.0, "after": _summary(0.4), "skipped": 0.0,
                "records": [{"step": 1, "reward/mean": 0.1}]}]
    doc = tmp_path / "real_model.md"
    section = b.report(results, before, 4, 2, "a test run", {1: 8.0, 2: 0.5}, [tmp_path / "real_model" / "reward.png"], doc)
    assert "| start (before training) | 0 | 17.2 | 34.4 | 100% / 100% | 80 | 25% | - | 60 s (eval) |" in section
    assert "| rence | 2 | 50.0 | 100.0 | 50% / 50% | 30 | 25% | 1 | 1200 s |" in section
    assert "Some runs stopped before 2 steps" in section  # grpo has one record
    assert "1 thread: 8.0 tokens/s, 2 threads: 0.5 tokens/s" in section and "![reward](real_model/reward.png)" in section
    doc.write_text("# Title\n\nhand-written text\n")
    b.write_section(doc, section)
    b.write_section(doc, section.replace("a test run", "the second run"))
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written text\n") and text.count(b.BEGIN) == 1
    assert "the second run" in text and "a test run" not in text


def test_report_only_rewrites_the_section_from_summary_json(tmp_path, capsys):
    b = _bench()
    out, doc = tmp_path / "runs", tmp_path / "docs" / "real_model.md"
    assert b.main(["--report-only", "--out", str(out), "--doc", str(doc)]) == 2
    assert "summary.json" in capsys.readouterr().err
    out.mkdir()
    doc.parent.mkdir()
    saved = {"before": {**_summary(0.2), "seconds": 10.0}, "k": 4, "steps": 1, "note": "saved run", "speeds": {"1": 3.0},
             "results": [{"objective": "rence", "seconds": 5.0, "after": _summary(0.6), "skipped": 0.0,
                          "records": [{"step": 1, "reward/mean": 0.5}]}]}
    (out / "summary.json").write_text(__import__("json").dumps(saved))
    assert b.main(["--report-only", "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "saved run" in text and "| rence | 1 | 60.0 |" in text and "1 thread: 3.0 tokens/s" in text
    assert (doc.parent / "real_model" / "heldout.png").is_file()

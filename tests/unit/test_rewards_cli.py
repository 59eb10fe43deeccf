"""rence-grade: grades a jsonl of responses with the training code; errors name file and line."""
import json

from megatron_rence.rewards.grade_cli import main


def test_grade_cli_writes_records_back(tmp_path, capsys):
    rows = [{"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"},
            {"id": 2, "response": "The answer is 7.", "answer": 8},
            {"id": 3, "response": "", "answer": "1"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sub" / "out.jsonl"
    assert main([str(src), "--out", str(out), "--workers", "1", "--fallbacks", "answer_is"]) == 0
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in graded] == [1, 2, 3]
    assert [(g["reward"], g["status"], g["extracted"]) for g in graded] == [
        (1.0, "ok", "\\frac{1}{2}"), (0.0, "ok", "7"), (0.0, "no_answer", None)]
    assert "graded 3 records" in capsys.readouterr().err


def test_grade_cli_errors_name_file_and_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"response": "1", "answer": "1"}) + "\n" + json.dumps({"response": "1"}) + "\n")
    assert main([str(src), "--out", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"{src}:2: missing field 'answer'" in capsys.readouterr().err
    src.write_text("{oops\n")
    assert main([str(src), "--out", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"{src}:1: invalid JSON" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

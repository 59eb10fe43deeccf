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


# ---- issue 17: --out is written atomically (streamed to a temp file), never the input, checked before grading
import os  # noqa: E402

import pytest  # noqa: E402

from megatron_rence.rewards import grade_cli  # noqa: E402

ROWS = [{"id": i, "response": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(5)]


def _src(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return src


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_out_equal_to_the_input_is_refused(tmp_path, capsys, spelling):
    src = _src(tmp_path)
    before = src.read_text()
    out = {"same": src, "dotted": tmp_path / "." / "sub" / ".." / "in.jsonl", "symlink": tmp_path / "link.jsonl"}
    if spelling == "symlink":
        os.symlink(src, out["symlink"])
    assert main([str(src), "--out", str(out[spelling]), "--workers", "0"]) == 2
    assert f"--out {out[spelling]} is the input file {src}" in capsys.readouterr().err
    assert src.read_text() == before


def test_output_is_streamed_to_a_temp_file_and_renamed_at_the_end(tmp_path, monkeypatch, capsys):
    src, out = _src(tmp_path), tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    real_grade, seen = grade_cli.RewardPool.grade, []

    def grade(self, responses, answers):
        temps = list(tmp_path.glob(".out.jsonl.*.tmp"))
        seen.append(len(temps[0].read_text().splitlines()) if temps else None)
        if len(seen) == 3:
            raise KeyboardInterrupt  # interrupted while grading the third chunk
        return real_grade(self, responses, answers)

    monkeypatch.setattr(grade_cli.RewardPool, "grade", grade)
    with pytest.raises(KeyboardInterrupt):
        main([str(src), "--out", str(out), "--workers", "0", "--chunk", "2"])
    assert seen == [0, 2, 4]  # earlier chunks were already on disk (in the temp file)
    assert out.read_text() == "previous results\n" and not list(tmp_path.glob(".out.jsonl.*"))
    monkeypatch.undo()
    assert main([str(src), "--out", str(out), "--workers", "0", "--chunk", "2"]) == 0
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.0] * 5
    assert "graded 5 records" in capsys.readouterr().err and not list(tmp_path.glob(".out.jsonl.*"))


def test_bad_input_or_unwritable_out_is_reported_before_grading(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("graded before the input and --out were checked")

    monkeypatch.setattr(grade_cli.RewardPool, "grade", never)
    src = _src(tmp_path)
    with src.open("a") as f:
        f.write(json.dumps({"response": "x"}) + "\n")
    assert main([str(src), "--out", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"{src}:6: missing field 'answer'" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    bad_out = tmp_path / "a_file" / "o.jsonl"
    assert main([str(_src(tmp_path)), "--out", str(bad_out), "--workers", "0"]) == 2
    assert f"--out {bad_out}: cannot write there: {tmp_path / 'a_file'} is not a directory" in capsys.readouterr().err
    assert main([str(src), "--out", str(tmp_path / "o.jsonl"), "--timeout", "0"]) == 2
    assert "--timeout: must be > 0" in capsys.readouterr().err

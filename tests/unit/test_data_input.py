"""Issue 28 (input validation): lone surrogates, NaN / inf / empty answers, empty files, a record-size cap for
json and parquet applied before tokenizing, and rence-grade's --out DIR and SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_rence.config import DataConfig
from megatron_rence.data.benchmarks import load_benchmark
from megatron_rence.config import BenchmarkConfig
from megatron_rence.data.prompts import PromptDataset
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rewards.grade_cli import main as grade_main


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def file_cfg(path, **kw):
    return DataConfig(source="file", train_path=str(path), template="{problem}=", **kw)


GOOD = [{"problem": f"{i}+1", "answer": str(i + 1)} for i in range(3)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---- item 14: a lone surrogate names file:line (was a bare TypeError from the tokenizer) and is skippable
@pytest.mark.parametrize("line,field", [
    ('{"problem": "1+\\ud800", "answer": "2"}', "problem"),
    ('{"problem": "1+1", "answer": "\\udfff"}', "answer"),
])
def test_lone_surrogate_names_file_and_line_and_is_skippable(tok, tmp_path, line, field):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD[0]), line, json.dumps(GOOD[1])])
    with pytest.raises(ValueError, match=rf"t\.jsonl:2: field '{field}' is not valid Unicode: a lone surrogate"):
        PromptDataset(file_cfg(path), tok)
    ds = PromptDataset(file_cfg(path, skip_malformed=True), tok)
    assert len(ds) == 2 and ds.metrics()["data/num_malformed"] == 1


# ---- item 14: NaN / Infinity / empty answers are malformed records
@pytest.mark.parametrize("answer,message", [
    ("NaN", "field 'answer' must be a finite number, got nan"),
    ("-Infinity", "field 'answer' must be a finite number, got -inf"),
    ('""', "field 'answer' is empty"),
    ('"   "', "field 'answer' is empty"),
])
def test_nan_inf_and_empty_answers_are_malformed(tok, tmp_path, answer, message):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD[0]), '{"problem": "1+1", "answer": %s}' % answer])
    with pytest.raises(ValueError, match=rf"t\.jsonl:2: {message}"):
        PromptDataset(file_cfg(path), tok)
    assert len(PromptDataset(file_cfg(path, skip_malformed=True), tok)) == 1


def test_benchmark_with_a_nan_answer_or_a_surrogate_names_the_line(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", ['{"problem": "1+1", "answer": 2}', '{"problem": "2+2", "answer": NaN}'])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: field 'answer' must be a finite number"):
        load_benchmark(BenchmarkConfig(name="b", path=str(path), format="aime"))
    path = write_lines(tmp_path / "c.jsonl", ['{"problem": "1+\\ud800", "answer": 2}'])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'problem' is not valid Unicode"):
        load_benchmark(BenchmarkConfig(name="c", path=str(path), format="aime"))


# ---- item 14: an empty data file is named
@pytest.mark.parametrize("suffix,content", [(".jsonl", ""), (".jsonl", "\n\n"), (".json", "[]")])
def test_empty_file_is_named(tok, tmp_path, suffix, content):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    empty = tmp_path / f"empty{suffix}"
    empty.write_text(content)
    with pytest.raises(ValueError, match=rf"^{empty}: no records \(data.train_path\): the file is empty"):
        PromptDataset(file_cfg(empty), tok)
    cfg = file_cfg(good, extra_train_paths=[str(empty)])
    with pytest.raises(ValueError, match=rf"^{empty}: no records \(data.extra_train_paths\[0\]\)"):
        PromptDataset(cfg, tok)


def test_a_file_whose_records_were_all_skipped_is_not_called_empty(tok, tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    bad = write_lines(tmp_path / "bad.jsonl", ['{"problem": 1}'])
    ds = PromptDataset(file_cfg(good, extra_train_paths=[str(bad)], skip_malformed=True), tok)
    assert len(ds) == 3 and ds.metrics()["data/num_malformed"] == 1


# ---- item 12: data.max_record_bytes caps json items and parquet rows too, before anything is tokenized
def _big_and_small(size):
    return [{"problem": "1+" + "1" * size, "answer": "2"}, *GOOD]


def test_json_record_over_the_cap_is_dropped_before_tokenizing(tok, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_big_and_small(5000)))
    ds = PromptDataset(file_cfg(path, max_record_bytes=4096, max_prompt_len=10_000), tok)
    m = ds.metrics()
    # counted as oversized, not as too long: the tokenizer never saw it (max_prompt_len would have kept it)
    assert (len(ds), m["data/num_dropped_oversized"], m["data/num_dropped_too_long"]) == (3, 1, 0)
    ds = PromptDataset(file_cfg(path, max_record_bytes=6000, max_prompt_len=10_000), tok)
    assert len(ds) == 4 and ds.metrics()["data/num_dropped_oversized"] == 0


def test_parquet_row_over_the_cap_is_dropped_before_tokenizing(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(_big_and_small(5000)), path)
    ds = PromptDataset(file_cfg(path, max_record_bytes=4096, max_prompt_len=10_000), tok)
    m = ds.metrics()
    assert (len(ds), m["data/num_dropped_oversized"], m["data/num_dropped_too_long"]) == (3, 1, 0)


def test_record_size_is_its_jsonl_line(tok, tmp_path):
    """The same record is kept or dropped at the same cap whatever the format: its size as one jsonl line."""
    record = {"problem": "1+1", "answer": "2"}
    line = json.dumps(record, ensure_ascii=False)  # the limit counts a line without its newline
    for name, text in [("t.jsonl", line + "\n"), ("t.json", json.dumps([record]))]:
        path = tmp_path / name
        path.write_text(text)
        assert len(PromptDataset(file_cfg(path, max_record_bytes=len(line)), tok)) == 1
        with pytest.raises(ValueError, match="no usable prompts"):
            PromptDataset(file_cfg(path, max_record_bytes=len(line) - 1), tok)


# ---- item 14: rence-grade
def _grade_input(tmp_path, rows):
    src = tmp_path / "in.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return src


@pytest.mark.parametrize("row,message", [
    ('{"response": "\\\\boxed{1}", "answer": NaN}', "field 'answer' must be a finite number, got nan"),
    ('{"response": "\\\\boxed{1}", "answer": Infinity}', "field 'answer' must be a finite number, got inf"),
    ('{"response": "\\\\boxed{1}", "answer": " "}', "field 'answer' is empty"),
    ('{"response": "\\\\boxed{\\ud800}", "answer": "1"}', "field 'response' is not valid Unicode"),
])
def test_grade_refuses_nan_inf_empty_answers_and_surrogates(tmp_path, capsys, row, message):
    src = _grade_input(tmp_path, [{"response": "\\boxed{1}", "answer": 1}, row])
    assert grade_main([str(src), "--out", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"{src}:2: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_grade_refuses_a_directory_out_before_grading(tmp_path, capsys, monkeypatch):
    from megatron_rence.rewards import grade_cli

    def never(*args, **kwargs):
        raise AssertionError("graded before --out was checked")

    monkeypatch.setattr(grade_cli.RewardPool, "grade", never)
    src = _grade_input(tmp_path, [{"response": "\\boxed{1}", "answer": 1}])
    out = tmp_path / "outdir"
    out.mkdir()
    assert grade_main([str(src), "--out", str(out), "--workers", "0"]) == 2
    assert f"--out {out} is a directory" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and not list(tmp_path.glob(".outdir*"))


def test_grade_sigterm_leaves_no_temp_file_and_keeps_out(tmp_path):
    rows = [{"response": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(20000)]
    src = _grade_input(tmp_path, rows)
    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rence.rewards.grade_cli", str(src), "--out", str(out),
                             "--workers", "1", "--chunk", "16"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in tmp_path.glob(".o.jsonl.*.tmp")):  # grading has written a chunk
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert out.read_text() == "previous\n" and not list(tmp_path.glob(".o.jsonl*")), err

"""PromptDataset: layouts, malformed records (file:line), length filtering, deterministic shuffle and resume."""
import json

import pytest

from megatron_rence.config import DataConfig, SyntheticTaskConfig
from megatron_rence.data.prompts import PromptDataset, problem_and_answer
from megatron_rence.data.tokenizer import build_synthetic_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def synthetic_cfg(**kw):
    task = SyntheticTaskConfig(num_problems=kw.pop("num_problems", 10), max_value=9)
    return DataConfig(source="synthetic", template="{problem}=", synthetic=task, **kw)


def test_layouts():
    assert problem_and_answer({"problem": "p", "answer": "4", "solution": "s"}) == ("p", "4")  # DeepScaleR
    assert problem_and_answer({"question": "q", "answer": "so 3*4=12\n#### 1,200"}) == ("q", "1200")  # GSM8K
    assert problem_and_answer({"problem": "p", "solution": "x \\boxed{\\frac{1}{2}}."}) == ("p", "\\frac{1}{2}")
    dapo = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Solve 1+1"}],
            "reward_model": {"ground_truth": "2", "style": "rule"}, "data_source": "math_dapo"}
    assert problem_and_answer(dapo) == ("Solve 1+1", "2")
    assert problem_and_answer({"problem": "p", "answer": 12}) == ("p", "12")
    assert problem_and_answer({"problem": "p", "answer": 12.0}) == ("p", "12")
    assert problem_and_answer({"q": "p", "a": "5"}, "q", "a") == ("p", "5")


def test_file_source_jsonl_and_parquet(tok, tmp_path):
    records = [{"id": f"r{i}", "problem": f"{i}+1", "answer": str(i + 1)} for i in range(6)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    ds = PromptDataset(DataConfig(source="file", train_path=str(path), template="{problem}=", shuffle=False), tok)
    batch = ds.next_batch(6)
    assert [p.id for p in batch] == [f"r{i}" for i in range(6)]
    assert batch[2].text == "2+1=" and batch[2].answer == "3" and batch[2].token_ids == tok.encode("2+1=")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "train.parquet")
    ds2 = PromptDataset(DataConfig(source="file", train_path=str(tmp_path / "train.parquet"),
                                   template="{problem}=", shuffle=False), tok)
    assert [(p.id, p.text, p.answer) for p in ds2.next_batch(6)] == [(p.id, p.text, p.answer) for p in batch]


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "invalid JSON"),
    ({"problem": "1+1"}, "missing field 'answer'"),
    ({"problem": 5, "answer": "5"}, "must be a string"),
    ({"problem": "1+1", "answer": None}, "must be a string or a number"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_record_names_file_and_line(tok, tmp_path, bad, needle):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}, "", bad, {"problem": "2+2", "answer": "4"}])
    cfg = DataConfig(source="file", train_path=str(path), template="{problem}=")
    with pytest.raises(ValueError) as info:
        PromptDataset(cfg, tok)
    assert f"{path}:3: " in str(info.value) and needle in str(info.value)  # line 3: the blank line counts
    cfg.skip_malformed = True
    ds = PromptDataset(cfg, tok)
    assert len(ds) == 2 and ds.metrics()["data/num_malformed"] == 1


def test_missing_file_and_empty_dataset(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(DataConfig(source="file", train_path=str(tmp_path / "nope.jsonl")), tok)
    path = write_jsonl(tmp_path / "long.jsonl", [{"problem": "1+1" * 50, "answer": "2"}])
    with pytest.raises(ValueError, match="no usable prompts"):
        PromptDataset(DataConfig(source="file", train_path=str(path), template="{problem}=", max_prompt_len=20), tok)


def test_long_prompts_dropped_and_counted(tok, tmp_path):
    records = [{"problem": "1" * n, "answer": "1"} for n in (5, 9, 10, 11, 30)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    ds = PromptDataset(DataConfig(source="file", train_path=str(path), template="{problem}=", max_prompt_len=10), tok)
    assert len(ds) == 2  # "1"*n + "=" is n+1 tokens: 6 and 10 fit, 11, 12 and 31 do not
    assert ds.metrics()["data/num_dropped_too_long"] == 3


def test_shuffle_is_a_permutation_per_epoch_and_deterministic(tok):
    ds = PromptDataset(synthetic_cfg(seed=7), tok)
    epoch0 = [p.id for p in ds.next_batch(10)]
    epoch1 = [p.id for p in ds.next_batch(10)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"synthetic-{i}" for i in range(10))
    assert epoch0 != epoch1 and ds.epoch == 1
    again = PromptDataset(synthetic_cfg(seed=7), tok)
    assert [p.id for p in again.next_batch(20)] == epoch0 + epoch1
    other = PromptDataset(synthetic_cfg(seed=8), tok)
    assert [p.id for p in other.next_batch(10)] != epoch0
    unshuffled = PromptDataset(synthetic_cfg(shuffle=False), tok)
    assert [p.id for p in unshuffled.next_batch(12)] == [f"synthetic-{i}" for i in list(range(10)) + [0, 1]]


def test_resume_from_cursor_gives_identical_sequence(tok):
    ds = PromptDataset(synthetic_cfg(seed=3), tok)
    ds.next_batch(7)
    state = ds.state_dict()
    assert state["epoch"] == 0 and state["index"] == 7
    expected = [p.id for p in ds.next_batch(25)]  # crosses two epoch boundaries
    resumed = PromptDataset(synthetic_cfg(seed=3), tok)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (run state file)
    assert [p.id for p in resumed.next_batch(25)] == expected
    with pytest.raises(ValueError, match="resume state"):
        PromptDataset(synthetic_cfg(seed=3, num_problems=11), tok).load_state_dict(state)


def test_mixed_files_with_different_layouts(tok, tmp_path):
    dapo = write_jsonl(tmp_path / "dapo.jsonl", [
        {"prompt": [{"role": "user", "content": "1+2"}], "reward_model": {"ground_truth": "3"}}])
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "2*3", "solution": "so \\boxed{6}"}])
    cfg = DataConfig(source="file", train_path=str(dapo), extra_train_paths=[str(math)], template="{problem}=",
                     shuffle=False)
    ds = PromptDataset(cfg, tok)
    assert [(p.id, p.problem, p.answer) for p in ds.next_batch(2)] == [("dapo.jsonl:1", "1+2", "3"),
                                                                      ("math.jsonl:1", "2*3", "6")]


# ---- issue 17: invalid UTF-8 names file:line; oversized lines are counted without being read whole
def _file_cfg(path, **kw):
    return DataConfig(source="file", train_path=str(path), template="{problem}=", **kw)


def test_invalid_utf8_names_file_and_line_or_is_counted(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "2+\xff2", "answer": "4"}\n'
                     b'{"problem": "3+1", "answer": "4"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid UTF-8 at byte \d+ .*data.skip_malformed"):
        PromptDataset(_file_cfg(path), tok)
    ds = PromptDataset(_file_cfg(path, skip_malformed=True), tok)
    assert len(ds) == 2 and ds.metrics()["data/num_malformed"] == 1
    as_json = tmp_path / "train.json"
    as_json.write_bytes(b'[\n{"problem": "1+1", "answer": "2"},\n{"problem": "\xc3", "answer": "4"}\n]\n')
    with pytest.raises(ValueError, match=rf"{as_json}:3: invalid UTF-8"):
        PromptDataset(_file_cfg(as_json), tok)


def test_oversized_lines_are_counted_without_reading_them_whole(tok, tmp_path):
    import tracemalloc

    path = tmp_path / "train.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
        f.write(json.dumps({"problem": "9" * (10 << 20), "answer": "1"}) + "\n")  # a 10 MB line
        f.write(json.dumps({"problem": "2+2", "answer": "4"}) + "\n")
    tracemalloc.start()
    try:
        ds = PromptDataset(_file_cfg(path, max_record_bytes=1 << 16), tok)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [p.answer for p in ds.prompts] == ["2", "4"]
    assert ds.metrics()["data/num_dropped_oversized"] == 1 and ds.metrics()["data/num_malformed"] == 0
    assert peak < 4 << 20, f"peak {peak} bytes: the 10 MB line was held in memory"
    line = ds.summary()
    assert line.startswith("data: 2 prompts; dropped 0 longer") and "1 lines over data.max_record_bytes=65536" in line


def test_a_line_of_exactly_the_limit_is_kept(tok, tmp_path):
    record = json.dumps({"problem": "1+1", "answer": "2"})
    path = write_jsonl(tmp_path / "train.jsonl", [record, record])
    ds = PromptDataset(_file_cfg(path, max_record_bytes=len(record) + 1, shuffle=False), tok)  # + the newline
    assert len(ds) == 2
    # one byte short of the record: every line is oversized, nothing usable is left
    with pytest.raises(ValueError, match="2 lines over data.max_record_bytes"):
        PromptDataset(_file_cfg(path, max_record_bytes=len(record) - 1), tok)

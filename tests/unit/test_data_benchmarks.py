"""Benchmark loaders on small fixture files written in each benchmark's published schema."""
import json

import pytest

from megatron_rence.config import BenchmarkConfig
from megatron_rence.data.benchmarks import detect_format, load_benchmark


def write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


AIME_H4 = [{"id": 60, "problem": "Find $x$.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}]
AIME_MAXWELL = [{"ID": "2024-I-1", "Problem": "Find $y$.", "Solution": "...", "Answer": 204}]
AIME25_OPENCOMPASS = [{"question": "Find $z$.", "answer": "70"}]
AMC = [{"id": 0, "problem": "How many?", "answer": 27.0, "url": "u"},
       {"id": 1, "problem": "What ratio?", "answer": 0.5, "url": "u"}]
MATH500 = [{"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "We get $\\boxed{\\frac34}$.",
            "answer": "\\frac34", "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"}]
MINERVA = [{"problem": "Compute the mass.", "solution": "Thus $m=\\boxed{3.5e6}$ kg.", "idx": 3, "type": "Physics"}]
OLYMPIAD = [
    {"id": 1606, "question": "Find all $n$.", "final_answer": ["$2$", "$3$"], "is_multiple_answer": True,
     "image_1": None, "modality": "Text-only", "language": "English"},
    {"id": 1607, "question": "See figure.", "final_answer": ["$5$"], "image_1": "<img>",
     "modality": "Multimodal", "language": "English"},
    {"id": 1608, "question": "Compute $a$.", "final_answer": ["$\\frac{\\sqrt{3}}{2}$"], "image_1": None,
     "modality": "Text-only", "language": "English"},
]
GSM8K = [{"question": "Tom has 3 apples...", "answer": "He has 3+4=<<3+4=7>>7\n#### 1,007"}]


@pytest.mark.parametrize("records,fmt,suffix,expected", [
    (AIME_H4, "aime", ".jsonl", [("60", "Find $x$.", "204")]),
    (AIME_MAXWELL, "aime", ".parquet", [("2024-I-1", "Find $y$.", "204")]),
    (AIME25_OPENCOMPASS, "aime", ".jsonl", [("bench-0", "Find $z$.", "70")]),
    (AMC, "amc", ".parquet", [("0", "How many?", "27"), ("1", "What ratio?", "0.5")]),
    (MATH500, "math500", ".jsonl", [("test/algebra/1.json", "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "\\frac34")]),
    (MINERVA, "minerva", ".json", [("3", "Compute the mass.", "3.5e6")]),
    (OLYMPIAD, "olympiadbench", ".jsonl", [("1606", "Find all $n$.", "2, 3"),
                                           ("1608", "Compute $a$.", "\\frac{\\sqrt{3}}{2}")]),
    (GSM8K, "gsm8k", ".jsonl", [("bench-0", "Tom has 3 apples...", "1007")]),
])
def test_formats_auto_and_explicit(tmp_path, records, fmt, suffix, expected):
    path = write(tmp_path / f"data{suffix}", records)
    for requested in ("auto", fmt):
        loaded, info = load_benchmark(BenchmarkConfig(name="bench", path=path, format=requested))
        assert [(r["id"], r["problem"], r["answer"]) for r in loaded] == expected
        assert info["format"] == fmt
    assert info["num_skipped_images"] == (1 if fmt == "olympiadbench" else 0)


def test_detect_format_unknown_names_fields():
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format({"text": "x"})


def test_errors_name_file_and_line(tmp_path):
    path = write(tmp_path / "aime.jsonl", AIME_H4 + [{"problem": "no answer here"}])
    with pytest.raises(ValueError) as info:
        load_benchmark(BenchmarkConfig(name="aime24", path=path, format="aime"))
    assert f"{path}:2: " in str(info.value) and "answer" in str(info.value) and "aime24" in str(info.value)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(AIME_H4[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=f"{bad_json}:2: invalid JSON"):
        load_benchmark(BenchmarkConfig(name="x", path=str(bad_json)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_benchmark(BenchmarkConfig(name="x", path=str(tmp_path / "missing.jsonl")))
    no_box = write(tmp_path / "minerva.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match="minerva.jsonl:1: no \\\\boxed"):
        load_benchmark(BenchmarkConfig(name="m", path=no_box, format="minerva"))
    with pytest.raises(ValueError, match="unknown format"):
        load_benchmark(BenchmarkConfig(name="m", path=no_box, format="mmlu"))

"""The synthetic demo tokenizer, tokenizer-directory loading, the synthetic task and prompt templates."""
import pytest

from megatron_rence.config import ModelConfig, SyntheticTaskConfig
from megatron_rence.data.synthetic import evaluate_expression, generate_problems
from megatron_rence.data.templates import check_template, encode_prompt, render_prompt
from megatron_rence.data.tokenizer import build_synthetic_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(tokenizer="synthetic"))


def test_synthetic_tokenizer_is_small_and_char_level(tok):
    assert len(tok) == 31
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.bos_token_id == 2
    ids = tok.encode("12+3=15", add_special_tokens=True)
    assert len(ids) == 7  # one token per character, nothing added
    assert tok.decode(ids) == "12+3=15"
    assert tok.decode(tok.encode("7 * 8 - 1\n")) == "7 * 8 - 1\n"
    boxed = tok.encode("\\boxed{42}")
    assert len(boxed) == 4 and tok.decode(boxed) == "\\boxed{42}"
    assert tok.encode("x") == [tok.unk_token_id]


def test_synthetic_tokenizer_is_deterministic_and_chat_template(tok):
    assert build_synthetic_tokenizer().get_vocab() == tok.get_vocab()
    text = tok.apply_chat_template([{"role": "user", "content": "3+5"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>3+5<|assistant|>"
    ids = tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(tok.encode("<|assistant|>8<eos>"), skip_special_tokens=True) == "8"


def test_load_tokenizer_from_directory(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "tok")))
    assert loaded.encode("3+5=8") == tok.encode("3+5=8")
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id


def test_load_tokenizer_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_tok"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "no_such_tok")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "empty")))


def test_evaluate_expression_precedence():
    assert evaluate_expression([3, 5, 2], ["+", "*"]) == 13
    assert evaluate_expression([3, 5, 2], ["*", "-"]) == 13
    assert evaluate_expression([2, 3, 4, 5], ["-", "*", "+"]) == -5
    assert evaluate_expression([7, 9], ["-"]) == -2


def test_generate_problems_deterministic_and_correct():
    cfg = SyntheticTaskConfig(num_terms=3, min_value=0, max_value=9, operators="+-*", num_problems=200, seed=3)
    a, b = generate_problems(cfg), generate_problems(cfg)
    assert a == b and len(a) == 200
    assert generate_problems(SyntheticTaskConfig(num_terms=3, operators="+-*", num_problems=200, seed=4)) != a
    for record in a:
        # independent check with Python's own arithmetic on the digits-and-operators string
        assert int(record["answer"]) == eval(record["problem"], {"__builtins__": {}})  # noqa: S307 (test only)
        assert all(ch in "0123456789+-*" for ch in record["problem"])


@pytest.mark.parametrize("field,value", [("operators", "+/"), ("operators", ""), ("num_terms", 1),
                                         ("max_value", -1), ("num_problems", 0)])
def test_generate_problems_rejects_bad_config(field, value):
    cfg = SyntheticTaskConfig(**{field: value})
    with pytest.raises(ValueError, match="data.synthetic"):
        generate_problems(cfg)


def test_templates(tok):
    assert render_prompt("3+5", tok, "{problem}=") == "3+5="
    assert render_prompt("3+5", tok, "Q: {problem}\n{instruction}", "box it") == "Q: 3+5\nbox it"
    assert render_prompt("3+5", tok, "chat", "") == "<|user|>3+5<|assistant|>"
    assert render_prompt("3+5", tok, "chat", "go") == "<|user|>3+5\n\ngo<|assistant|>"
    assert render_prompt("3+5", tok, "{problem} \\boxed{{}}") == "3+5 \\boxed{}"
    assert encode_prompt("3+5=", tok, "{problem}=") == tok.encode("3+5=")


@pytest.mark.parametrize("template,needle", [("{question}=", "question"), ("{problem} {0}", "0"),
                                             ("{problem", "invalid"), ("no placeholder", "no {problem}")])
def test_bad_templates_name_data_template(template, needle):
    with pytest.raises(ValueError, match="data.template") as info:
        check_template(template)
    assert needle in str(info.value)


def test_chat_template_missing(tok):
    tok2 = build_synthetic_tokenizer()
    tok2.chat_template = None
    with pytest.raises(ValueError, match="data.template"):
        render_prompt("1+1", tok2, "chat")

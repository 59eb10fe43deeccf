"""Tokenizers: the synthetic demo tokenizer built in code, or a tokenizer directory loaded offline.

The synthetic tokenizer is character level with a tiny vocabulary (31 tokens), so that a randomly
initialised model reaches the demo task's answers by chance::

    <pad> <eos> <bos> <unk> <|system|> <|user|> <|assistant|> \\boxed{      (special / added tokens)
    0-9  + - * / = ( ) , . { } space newline                         (one token per character)

Any other character encodes as ``<unk>``. The chat template renders
``<|user|>TEXT<|assistant|>`` (assistant turns end with ``<eos>``).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
BOXED_TOKEN = "\\boxed{"
CHARACTERS = list("0123456789") + list("+-*/=(),.{}") + [" ", "\n"]

SYNTHETIC_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<eos>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer (see the module docstring); deterministic ids, no files or downloads."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [BOXED_TOKEN] + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Registering the multi-character tokens as added tokens keeps them whole before the per-char split.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(BOXED_TOKEN, special=False, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
    )
    tokenizer.chat_template = SYNTHETIC_CHAT_TEMPLATE
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    return tokenizer


def load_tokenizer(model_cfg) -> PreTrainedTokenizerFast:
    """`model_cfg.tokenizer`: "synthetic" or a local directory with tokenizer files (never downloads).

    The result always has `pad_token_id` and `eos_token_id` set (pad falls back to eos).
    """
    name = model_cfg.tokenizer
    if name == "synthetic":
        return build_synthetic_tokenizer()
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model.tokenizer: tokenizer directory not found: {path} "
                                "(use 'synthetic' for the demo tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model.tokenizer: no loadable tokenizer in {path}: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model.tokenizer: tokenizer in {path} has no eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""Prompt rendering: the tokenizer's chat template, or a format string with {problem} and {instruction}.

`data.template: chat` renders one user turn ``problem + "\\n\\n" + instruction`` with the tokenizer's chat
template and the generation prompt. Any other value is a Python format string, e.g.
``"{problem}="`` (the CPU demo) or ``"Question: {problem}\\n{instruction}\\nAnswer:"``; literal braces
are doubled (``\\\\boxed{{}}``). Its only placeholders are {problem} (required) and {instruction}.
"""
from __future__ import annotations

import string

PLACEHOLDERS = ("problem", "instruction")


def check_template(template: str) -> None:
    """Raise ValueError naming data.template when `template` is not "chat" or a valid format string."""
    if template == "chat":
        return
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"data.template: invalid format string {template!r}: {exc} "
                         "(write literal braces as {{ and }})") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        raise ValueError(f"data.template: unknown placeholder(s) {unknown} in {template!r}; "
                         f"allowed: {{problem}}, {{instruction}} (write literal braces as {{{{ and }}}})")
    if "problem" not in fields:
        raise ValueError(f"data.template: {template!r} has no {{problem}} placeholder")


def render_prompt(problem: str, tokenizer, template: str, instruction: str = "") -> str:
    """The prompt text for one problem (before tokenization)."""
    check_template(template)
    if template != "chat":
        return template.format(problem=problem, instruction=instruction)
    if not tokenizer.chat_template:
        raise ValueError("data.template: 'chat' needs a tokenizer with a chat template; "
                         "this tokenizer has none (use a format string such as '{problem}=')")
    content = f"{problem}\n\n{instruction}" if instruction else problem
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(text: str, tokenizer, template: str) -> list[int]:
    """Token ids of a rendered prompt. Chat templates carry their own special tokens (BOS included);
    format-string prompts get the tokenizer's usual special tokens (e.g. Llama's BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=template != "chat"))

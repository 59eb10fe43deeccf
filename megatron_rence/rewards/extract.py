"""Final-answer extraction from model outputs: the last \\boxed{...} / \\fbox{...}, then configurable fallbacks.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and finally \\boxed{\\{1, 2\\}}")
    '\\\\{1, 2\\\\}'
    >>> extract_answer("The answer is 42.", ["answer_is"])
    '42'
    >>> extract_answer("3 + 4 = 7", ["last_number"])
    '7'
    >>> answer_and_source("3 + 4 = 7", ["last_number"]), answer_and_source(r"so \\boxed{7}", [])
    (('7', 'last_number'), ('7', 'boxed'))

`reward.fallbacks: []` is the strict setting: only a boxed answer counts. Whichever is set, the metrics
report the share of graded answers that came from a fallback (`reward/fallback_frac`).
"""
from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")

FALLBACKS = ("last_number", "answer_is")


def _braced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at `text[open_pos] == "{"`, or None when it never closes.

    Backslash-escaped braces (``\\{``, ``\\}``) do not count towards the nesting.
    """
    assert text[open_pos] == "{"
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces allowed).

    ``\\boxed 5`` (no braces) gives the following token. An unclosed last box (a truncated output)
    falls back to the previous complete one. None when there is no complete box.
    """
    for match in reversed(list(_BOX_START.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _braced(text, pos)
        elif pos > match.end():
            content = re.match(r"[^\s$]*", text[pos:]).group(0) or None
        else:
            content = None
        if content is not None:
            return content.strip()
    return None


def answer_is(text: str) -> str | None:
    """The phrase after the last "answer is" ("The final answer is $7$." -> "7"), stripped of $ and spaces."""
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().strip("$").strip()
    boxed = last_boxed(answer)
    return boxed if boxed is not None else (answer or None)


def last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, "1,000" -> "1000", simple fractions "3/4")."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


_FALLBACK_FUNCTIONS = {"last_number": last_number, "answer_is": answer_is}


def answer_and_source(text: str, fallbacks=("last_number",)) -> tuple[str | None, str | None]:
    """(answer, where it came from: "boxed" or the fallback's name), or (None, None) when nothing is found."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    for name in fallbacks:
        if name not in _FALLBACK_FUNCTIONS:
            raise ValueError(f"reward.fallbacks: unknown fallback {name!r}; known: {list(_FALLBACK_FUNCTIONS)}")
        found = _FALLBACK_FUNCTIONS[name](text)
        if found is not None:
            return found, name
    return None, None


def extract_answer(text: str, fallbacks=("last_number",)) -> str | None:
    """The last boxed answer, else the first fallback (in the given order) that finds something."""
    return answer_and_source(text, fallbacks)[0]

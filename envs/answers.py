"""Pulling a numeric answer out of a model's free-form reply, and grading it.

Tolerant by design (small models rarely follow a format exactly). In order of preference:
the last `\\boxed{...}`, the last `#### N`, the last "answer is N" / "answer: N", and finally
the last number anywhere in the text. Thousands separators and a leading `$` are accepted.
"""

from __future__ import annotations

import math
import re

# 1,234,567 (commas every three digits) or plain 1234 / 12.5; optional sign.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_BARE_RE = re.compile(r"\s*\$?\s*(" + _NUMBER + r")\s*\.?\s*")
# "3 + 7 = 10", "12 - 3 * 2 = 6.": numbers joined by + - * (or x, ×), then "=" and one number.
_EQUATION_RE = re.compile(
    r"\s*" + _NUMBER + r"(?:\s*[-+*x×]\s*" + _NUMBER + r")+\s*=\s*" + _NUMBER + r"\s*\.?\s*"
)


def parse_number(text: str) -> float | None:
    """'1,234' -> 1234.0, '-3.5' -> -3.5; None if `text` is not one number."""
    match = _BARE_RE.fullmatch(text)
    return float(match.group(1).replace(",", "")) if match else None


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, with nested braces matched."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> float | None:
    """The number the reply gives as its answer, or None if there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        numbers = _NUMBER_RE.findall(boxed)
        return float(numbers[-1].replace(",", "")) if len(numbers) == 1 else None
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        matches = pattern.findall(text)
        if matches:
            return float(matches[-1].replace(",", ""))
    numbers = _NUMBER_RE.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def has_answer_marker(text: str) -> bool:
    """True if the reply marks its answer explicitly (boxed, ####, or 'the answer is N')."""
    boxed = _last_boxed(text)
    if boxed is not None and len(_NUMBER_RE.findall(boxed)) == 1:
        return True
    return bool(_HASHES_RE.search(text) or _ANSWER_IS_RE.search(text))


def is_bare_number(text: str) -> bool:
    """True if the reply is just a number (optionally with a trailing period)."""
    return parse_number(text) is not None


def is_equation(text: str) -> bool:
    """True if the reply is one equation that ends in its result ("3 + 7 = 10")."""
    return _EQUATION_RE.fullmatch(text) is not None


def check_number(response: str, answer: str) -> float:
    """1.0 if the reply's extracted answer equals the reference number `answer`, else 0.0."""
    expected = parse_number(answer)
    if expected is None:
        raise ValueError(f"reference answer {answer!r} is not a number")
    got = extract_answer(response)
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9))


def answer_marker_format(response: str) -> float:
    """Format check for word problems: 1.0 if the answer is marked explicitly."""
    return float(has_answer_marker(response))


def bare_number_format(response: str) -> float:
    """Format check for arithmetic: 1.0 if the reply is just the number."""
    return float(is_bare_number(response))


def equation_format(response: str) -> float:
    """Format check for arithmetic: 1.0 if the reply is the equation with its result."""
    return float(is_equation(response))

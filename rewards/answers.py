"""Final-answer extraction and equivalence for accuracy rewards.

Extraction paths (each returns the *last* occurrence in the text):
- ``boxed``: ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces;
- ``answer_tag``: ``<answer>...</answer>`` (DOTALL, so it may span lines);
- ``phrase``: "The answer is X" / "The final answer is: X" (X runs to the end of its sentence or line);
- ``hash``: GSM8K's ``#### X``.

Equivalence: both sides are normalised (LaTeX spacing, ``$`` delimiters, dollar and percent signs,
thousands separators, ``\\text{}``, ``\\dfrac``); numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``,
trailing ``.0``) compare exactly as fractions; anything else goes to ``math_verify`` when it is
importable, or falls back to comparing the normalised strings.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "EXTRACTORS",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "gold_answer",
    "normalize_answer",
    "parse_number",
]

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_PHRASE_RE = re.compile(
    r"\b(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(.+?)(?=\.\s|\.?\s*$|\n|$)",
    re.IGNORECASE | re.DOTALL,
)
_HASH_RE = re.compile(r"####\s*(.+?)\s*(?:\n|$)")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?(?:/\d+)?", re.IGNORECASE)
_LEADING_NUMBER_RE = re.compile(r"^[+-]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FRAC_RE = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    found = None
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    matches = pattern.findall(text)
    return matches[-1].strip() if matches else None


EXTRACTORS = {
    "boxed": extract_boxed,
    "answer_tag": functools.partial(_last, _TAG_RE),
    "phrase": functools.partial(_last, _PHRASE_RE),
    "hash": functools.partial(_last, _HASH_RE),
}


def extract_answer(text: str, order: Sequence[str] = ("boxed", "answer_tag", "phrase", "hash")) -> str | None:
    """The final answer in ``text``, from the first extraction path in ``order`` that finds one."""
    for name in order:
        if name not in EXTRACTORS:
            raise ValueError(f"unknown answer extraction path {name!r}; expected one of {sorted(EXTRACTORS)}")
        found = EXTRACTORS[name](text)
        if found:
            return found
    return None


def gold_answer(raw: Any) -> str | None:
    """Reference answer from a dataset cell: numbers as text; ``#### X`` or ``\\boxed{X}`` solutions reduced to X."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    if "####" in text:
        return _last(_HASH_RE, text)
    boxed = extract_boxed(text)
    return boxed if boxed is not None else text


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no LaTeX spacing, delimiters, currency/percent signs or digit commas."""
    s = answer.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle)", "", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    s = re.sub(r"^\*\*(.*)\*\*$", r"\1", s).strip()
    return s


def parse_number(answer: str) -> Fraction | None:
    """Exact value of a numeric answer (integer, decimal, ``a/b``, ``\\frac{a}{b}``), else None."""
    s = normalize_answer(answer).replace(" ", "")
    m = _FRAC_RE.match(s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return -(num / den) if m.group(1) else num / den
    if _NUMBER_RE.fullmatch(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _leading_number(answer: str) -> Fraction | None:
    """The number an answer starts with ("42 apples" -> 42), if any."""
    m = _LEADING_NUMBER_RE.match(normalize_answer(answer))
    return parse_number(m.group(0)) if m else None


@functools.cache
def _math_verify() -> Any | None:
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def _verify_symbolic(pred: str, gold: str) -> bool | None:
    """math_verify's equivalence; None when math_verify is not importable."""
    mv = _math_verify()
    if mv is None:
        return None
    # math_verify times out with signal.alarm, which only works in the main thread
    main = threading.current_thread() is threading.main_thread()
    kw: dict[str, Any] = {} if main else {"parsing_timeout": None}
    if not main:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = mv.parse(f"${gold}$", **kw)
        pred_parsed = mv.parse(f"${pred}$", **kw)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, **({} if main else {"timeout_seconds": None})))
    except Exception:  # math_verify raises on malformed LaTeX; that is a mismatch, not a crash
        return False


def answers_match(pred: str | None, gold: str | None, *, use_math_verify: bool = True) -> bool:
    """Whether the predicted answer equals the gold answer (see the module docstring for the rules)."""
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p:
        return False
    if p.replace(" ", "").lower() == g.replace(" ", "").lower():  # also multiple choice "b" vs "B"
        return True
    gold_num = parse_number(g)
    if gold_num is not None:
        pred_num = parse_number(p)
        if pred_num is None:
            pred_num = _leading_number(p)
        if pred_num is not None:
            return pred_num == gold_num
    if use_math_verify:
        verdict = _verify_symbolic(p, g)
        if verdict is not None:
            return verdict
    return False

"""Format rewards: regular expressions over the completion text.

Every pattern is compiled with ``re.DOTALL`` so that ``.`` crosses newlines: reasoning spans many
lines, and a pattern without DOTALL silently scores every multi-line completion as malformed
(``docs/concepts.md`` §8).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from ._text import completion_text

__all__ = [
    "RegexFormat",
    "answer_phrase_format",
    "answer_tag_format",
    "boxed_format",
    "think_answer_format",
]

Mode = Literal["fullmatch", "match", "search"]
_FLAG_NAMES = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "VERBOSE": re.VERBOSE, "ASCII": re.ASCII}


class RegexFormat:
    """Reward ``reward`` when the completion text matches ``pattern``, else ``penalty``.

    Args:
        pattern: a regular expression; compiled with ``re.DOTALL`` plus ``flags``.
        mode: ``fullmatch`` (whole text, after stripping surrounding whitespace when ``strip``),
            ``match`` (anchored at the start) or ``search`` (anywhere).
        flags: extra flags, as ``re`` flags or names (``"IGNORECASE"``, ``"MULTILINE"``, ...), so
            they can be written in YAML.
        reward: value for a match.
        penalty: value for no match (and for an empty completion).
        strip: strip surrounding whitespace before matching.
        name: the name shown in logs (``__name__``).
    """

    def __init__(
        self,
        pattern: str,
        *,
        mode: Mode = "fullmatch",
        flags: int | Sequence[str] = 0,
        reward: float = 1.0,
        penalty: float = 0.0,
        strip: bool = True,
        name: str = "regex_format",
    ) -> None:
        if mode not in ("fullmatch", "match", "search"):
            raise ValueError(f"mode must be 'fullmatch', 'match' or 'search', got {mode!r}")
        if not isinstance(flags, int):
            unknown = [f for f in flags if f.upper() not in _FLAG_NAMES]
            if unknown:
                raise ValueError(f"unknown regex flags {unknown}; expected some of {sorted(_FLAG_NAMES)}")
            value = 0
            for f in flags:
                value |= _FLAG_NAMES[f.upper()]
            flags = value
        try:
            self._regex = re.compile(pattern, re.DOTALL | flags)
        except re.error as e:
            raise ValueError(f"{name}: invalid regular expression {pattern!r}: {e}") from e
        self.pattern = pattern
        self.mode = mode
        self.reward = float(reward)
        self.penalty = float(penalty)
        self.strip = strip
        self.__name__ = name

    def matches(self, text: str) -> bool:
        """Whether ``text`` has the format."""
        if self.strip:
            text = text.strip()
        return getattr(self._regex, self.mode)(text) is not None

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> list[float]:
        """Score each completion: ``reward`` if it has the format, else ``penalty``."""
        return [self.reward if self.matches(completion_text(c)) else self.penalty for c in completions or []]

    def __repr__(self) -> str:
        return f"RegexFormat(name={self.__name__!r}, pattern={self.pattern!r}, mode={self.mode!r})"


#: ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else (R1 / d1 format).
think_answer_format = RegexFormat(
    r"<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>",
    mode="fullmatch",
    name="think_answer_format",
)
#: An ``<answer>...</answer>`` block anywhere.
answer_tag_format = RegexFormat(r"<answer>.*?</answer>", mode="search", name="answer_tag_format")
#: A non-empty ``\boxed{...}`` anywhere.
boxed_format = RegexFormat(r"\\boxed\s*\{\s*[^\s}]", mode="search", name="boxed_format")
#: Ends with "The answer is N." (the built-in arithmetic task's format).
answer_phrase_format = RegexFormat(
    r"(?:^|.*\s)(?:the\s+)?(?:final\s+)?answer\s+is:?\s*[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?\.?",
    mode="fullmatch",
    flags=re.IGNORECASE,
    name="answer_phrase_format",
)

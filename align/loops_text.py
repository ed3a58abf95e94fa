"""Loop detection on text, independent of any tokenizer (``docs/concepts.md`` §6, "Text path").

Two rules, whose covered characters are united:

* **Units** (:func:`_unit_loops`). The text is cut into units: lines, and lines cut into sentences. Each
  unit is normalised (:func:`normalise_unit`): lower case, a leading list marker ("1.", "-", "**2.**",
  "(a)") and LaTeX commands dropped, ordinal and transition words ("first", "second", "next", "finally",
  ...) dropped, structural labels ("row", "column", "2x2 box", "top-left", "step", ...) replaced by one
  symbol and a number right after a label ("Step 3", "Row 2") dropped; every other number is content.
  Two units *match* when their numbers are the same sequence and their word sets overlap enough: Jaccard
  ``>= number_sim`` when the numbers hold ``>= 3`` digits (the same values re-printed under other words),
  else ``>= word_sim``. A *copy* is a chain of matching pairs ``(i, j)``, ``(i + 1, j + 1)``, ... (one
  unit may be skipped on one side: a typo line, a missing header) whose later side weighs
  ``>= min_block_words`` (a unit weighs its words plus its digits). A unit with ``>= k_min - 1`` copies
  of it is looped, and so are those copies; the looped units must weigh ``>= min_loop_words`` in all.
  This finds long units, near copies, a few copies of a long block with other lines between them, and a
  list re-printed under new labels, while a template line that recurs between different content (a
  search over candidate equations) forms no copy heavy enough.
* **Words** (:func:`text_word_ids` + :func:`align.loops.loop_coverage`): the text as a sequence of words,
  numbers and punctuation runs, equal strings given equal ids, scanned with the periodic rule of the
  token-id path ("we, we, we, ...", or a short line three times in a row), counting words instead of tokens.

Everything counts words and characters, not tokens, so the result does not depend on a tokenizer. Python
per text with numpy inside (units per text are few); the word scan runs on the whole batch at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from align.loops import LoopParams, loop_coverage

__all__ = ["TextLoopParams", "TextLoopReport", "detect_text_loops", "normalise_unit", "split_units",
           "text_word_ids"]

_LINE = re.compile(r"[^\n]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_MARKER = re.compile(  # a list marker at the start: "-", "1.", "2)", "**3.**", "(a)", "4, " before a word
    r"^\s*(?:[-*+•>#]+\s*)?(?:\*\*)?(?:\(?\d{1,3}[.):](?:\*\*)?:?(?:\s+|$)|\(?[a-z][.)](?:\s+|$)|\d{1,3},\s+(?=[a-z]))?")
_LATEX = re.compile(r"\\[a-zA-Z]+")
_GRID = re.compile(r"\b\d+\s*[x×]\s*\d+\b")
_LABEL_NUMBER = re.compile(r"\b(row|column|col|box|cell|step|case|part|stage|item|attempt|option)\s+\d{1,2}\b")
_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_TOKEN = re.compile(r"\w+|[^\w\s]+")
ORDINALS = frozenset({
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
    "twelfth", "last", "firstly", "secondly", "thirdly", "next", "then", "finally", "lastly", "now", "after",
    "afterwards", "also", "again", "another", "additionally", "however",
})
LABELS = frozenset({
    "row", "rows", "column", "columns", "col", "cols", "box", "boxes", "cell", "cells", "step", "steps", "case",
    "cases", "part", "parts", "stage", "item", "attempt", "approach", "option", "top", "bottom", "left", "right",
    "upper", "lower", "middle", "center", "centre", "corner",
})
LABEL = "#"


@dataclass(frozen=True)
class TextLoopParams:
    """Settings of :func:`detect_text_loops` (validated on construction).

    Attributes:
        k_min: fewest copies of a unit (itself included) that make a loop.
        min_block_words: least weight (words plus digits) of the later side of a copy; short template
            lines that recur between different content never reach it.
        min_loop_words: least total weight of the looped units.
        word_sim: Jaccard overlap of the word sets two units need when they hold fewer than 3 digits.
        number_sim: the overlap they need when they hold the same numbers with at least 3 digits.
        words: also scan the word sequence for short periodic loops (the periodic rule of
            :func:`align.loops.detect_loops`, counting words and punctuation marks instead of tokens).
        word_min_span: least number of words and punctuation marks such a periodic loop covers
            (``min_span`` of the periodic rule; a unit still needs ``k_min`` copies in a row). 18 catches three
            copies of a six-word line such as ``17 + 9 = 27.``, which no other rule here sees.
    """

    k_min: int = 3
    min_block_words: int = 24
    min_loop_words: int = 48
    word_sim: float = 0.75
    number_sim: float = 0.5
    words: bool = True
    word_min_span: int = 18

    def __post_init__(self) -> None:
        if not isinstance(self.k_min, int) or self.k_min < 2:
            raise ValueError(f"k_min must be an int >= 2, got {self.k_min!r}")
        for name in ("min_block_words", "min_loop_words", "word_min_span"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("word_sim", "number_sim"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TextLoopReport:
    """Loops found in one text: ``fraction`` = looped characters / non-space characters.

    ``groups`` lists, for each group of copies, the character spans ``(start, end)`` of its units;
    ``word_spans`` the spans of short periodic loops found on the word sequence.
    """

    fraction: float
    groups: tuple[tuple[tuple[int, int], ...], ...]
    word_spans: tuple[tuple[int, int], ...]
    n_chars: int
    n_covered: int

    @property
    def has_loop(self) -> bool:
        """Whether any loop was found."""
        return self.n_covered > 0


def split_units(text: str) -> list[tuple[int, int]]:
    """Character spans of the units of ``text``: its lines, each cut after ``.``, ``!`` or ``?``."""
    spans = []
    for line in _LINE.finditer(text):
        start = line.start()
        for cut in _SENTENCE_END.finditer(line.group()):
            spans.append((start, line.start() + cut.start()))
            start = line.start() + cut.end()
        spans.append((start, line.end()))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def normalise_unit(unit: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(numbers, words)`` of a unit after normalisation (module docstring); labels become ``"#"``."""
    s = _MARKER.sub("", unit.lower(), count=1)
    s = _LABEL_NUMBER.sub(r"\1", _GRID.sub(" row ", _LATEX.sub(" ", s)))
    numbers: list[str] = []
    words: list[str] = []
    for tok in _WORD.findall(s):
        if tok[0].isdigit():
            numbers.append(tok)
        elif tok not in ORDINALS:
            words.append(LABEL if tok in LABELS else tok)
    return tuple(numbers), tuple(words)


def _similarity(units: list[tuple[tuple[str, ...], tuple[str, ...]]], prm: TextLoopParams) -> np.ndarray:
    """``S[i, j]``: units i and j match (same numbers, enough word overlap); the diagonal is False."""
    n = len(units)
    S = np.zeros((n, n), dtype=bool)
    by_numbers: dict[tuple[str, ...], list[int]] = {}
    for i, (nums, _) in enumerate(units):
        by_numbers.setdefault(nums, []).append(i)
    for nums, idx in by_numbers.items():
        if len(idx) < 2:
            continue
        need = prm.number_sim if sum(len(x) for x in nums) >= 3 else prm.word_sim
        sets = [set(units[i][1]) for i in idx]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                u, v = sets[a], sets[b]
                union = len(u | v)
                if (len(u & v) / union if union else 1.0) >= need:
                    S[idx[a], idx[b]] = S[idx[b], idx[a]] = True
    return S


def _runs(m: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool array as inclusive (first, last)."""
    d = np.diff(np.concatenate(([0], m.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), (np.flatnonzero(d == -1) - 1).tolist()))


def _chains(S: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weight of the heaviest chain of matching pairs through each pair ``(i, j)``, ``i > j``.

    A chain is a sequence of matching pairs ``(i, j)`` in which each next pair is ``(i + 1, j + 1)``, or
    skips one unit on one side (``(i + 2, j + 1)``, ``(i + 1, j + 2)``): the later copy of a block, unit by
    unit, with at most single insertions or deletions (a typo line, a missing header). Its weight sums
    ``w`` over the later copy. Two dynamic programmes (forward, backward) over the rows of ``S``.
    """
    n = len(w)
    M = np.tril(S, k=-1)
    fwd = np.zeros((n + 2, n + 2))
    bwd = np.zeros((n + 4, n + 4))
    for i in range(n):  # fwd[i + 2, j + 2]: best chain ending at (i, j)
        prev = np.maximum.reduce([fwd[i + 1, 1:n + 1], fwd[i, 1:n + 1], fwd[i + 1, 0:n]])
        fwd[i + 2, 2:] = np.where(M[i], w[i] + prev, 0.0)
    for i in range(n - 1, -1, -1):  # bwd[i, j]: best chain starting at (i, j)
        nxt = np.maximum.reduce([bwd[i + 1, 1:n + 1], bwd[i + 2, 1:n + 1], bwd[i + 1, 2:n + 2]])
        bwd[i, :n] = np.where(M[i], w[i] + nxt, 0.0)
    return np.where(M, fwd[2:, 2:] + bwd[:n, :n] - w[:, None], 0.0)


def _unit_loops(text: str, prm: TextLoopParams) -> list[tuple[tuple[int, int], ...]]:
    """Looped units (module docstring) grouped by the copies that link them, as character spans."""
    spans = split_units(text)
    units = [normalise_unit(text[a:b]) for a, b in spans]
    keep = [i for i, (nums, words) in enumerate(units) if nums or len(words) >= 2]
    spans, units = [spans[i] for i in keep], [units[i] for i in keep]
    n = len(units)
    if n < prm.k_min:
        return []
    S = _similarity(units, prm)
    w = np.array([len(words) + sum(len(x.replace(".", "")) for x in nums) for nums, words in units], dtype=float)
    linked = _chains(S, w) >= prm.min_block_words
    linked |= linked.T
    hub = linked.sum(axis=1) >= prm.k_min - 1  # a unit with k_min - 1 copies of it
    looped = hub | linked[:, hub].any(axis=1)  # ... and those copies
    if w[looped].sum() < prm.min_loop_words:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in np.argwhere(linked & looped[:, None] & looped[None, :]).tolist():
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in np.flatnonzero(looped).tolist():
        groups.setdefault(find(i), []).append(i)
    return [tuple(spans[i] for i in g) for g in groups.values() if looped[g[0]]]


def text_word_ids(texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Each text as ids of its words, numbers and punctuation marks (equal strings, equal ids) and spans."""
    vocab: dict[str, int] = {}
    ids, spans = [], []
    for text in texts:
        toks = list(_TOKEN.finditer(text.lower()))
        ids.append([vocab.setdefault(t.group(), len(vocab)) for t in toks])
        spans.append([t.span() for t in toks])
    return ids, spans


def detect_text_loops(texts: Sequence[str], params: TextLoopParams | None = None,
                      word_params: LoopParams | None = None) -> list[TextLoopReport]:
    """Find loops in each text (module docstring); ``word_params`` sets the word-sequence scan (default: the
    periodic rule of :class:`align.loops.LoopParams` with ``k_min`` and ``min_span = word_min_span`` from ``params``,
    no copy rule)."""
    prm = params or TextLoopParams()
    texts = [t or "" for t in texts]
    word_spans: list[list[tuple[int, int]]] = [[] for _ in texts]
    if prm.words and texts:
        ids, tok_spans = text_word_ids(texts)
        wp = word_params or LoopParams(k_min=prm.k_min, min_span=prm.word_min_span, copy_min_span=None)
        cov = loop_coverage(ids, **asdict(wp)).covered
        for b, (row, sp) in enumerate(zip(cov.tolist(), tok_spans)):
            for first, last in _runs(np.array(row[: len(sp)], dtype=bool)):
                word_spans[b].append((sp[first][0], sp[last][1]))
    reports = []
    for text, wspans in zip(texts, word_spans):
        groups = _unit_loops(text, prm)
        mask = np.zeros(len(text), dtype=bool)
        for a, b in [s for g in groups for s in g] + wspans:
            mask[a:b] = True
        solid = np.array([not c.isspace() for c in text], dtype=bool)
        n_chars, n_cov = int(solid.sum()), int((mask & solid).sum())
        reports.append(TextLoopReport(n_cov / n_chars if n_chars else 0.0, tuple(groups), tuple(wspans),
                                      n_chars, n_cov))
    return reports

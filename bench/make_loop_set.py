"""Build the labelled loop-detection sets: synthetic (bench/data/loops_eval.jsonl) and real (loops_real.jsonl).

    python bench/make_loop_set.py                 # seed 0, 680 rows -> bench/data/loops_eval.jsonl
    python bench/make_loop_set.py --seed 1 --out /tmp/loops_dev.jsonl   # a dev split for tuning
    python bench/make_loop_set.py --real D1_GIT_DIR   # the real set from a git snapshot of dllm-reasoning/d1,
                                                      # with the labels of bench/data/loops_real_labels.tsv

The real set (:func:`sample_real`, :func:`write_real`; provenance and labelling rules in
``bench/data/README.md``) samples LLaDA-8B-Instruct evaluation generations published with d1 and joins
them with the hand labels. The rest of this docstring is about the synthetic set.

Each row is one completion: ``text``, ``label`` (1 = degenerate repetition loop), ``kind``,
``gen_length`` (the decoding budget in tokens) and ``ended`` (False when the text was cut at the
budget: no EOS follows). Token ids come from :func:`tokenize`, a deterministic regex pre-tokenizer
in the style of byte-level BPE tokenizers (words carry their leading space, digits in groups of up to
three, punctuation runs of up to three characters, whitespace runs), with ids assigned by
:func:`build_vocab` over the set.

Negatives are ordinary answers, many of them full of legitimate repetition: prose, worked maths
(some with repeated sums such as ``6 + 6 + 6``), numbered and bulleted lists, markdown tables,
code, enumerations and refrains. Positives are completions that fall into a loop, as masked
diffusion models do: a word, phrase, sentence or answer repeated until the budget runs out, a loop
with occasional substitutions (sampling noise), a burst of repetition that the text later escapes
(16-64 tokens, i.e. half a 32-token block to two blocks), structured lines repeated to the limit,
and loops whose unit carries an incrementing counter.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import regex

TOKEN_RE = regex.compile(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]{1,3}[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into token strings; concatenating them gives ``text`` back."""
    pieces = TOKEN_RE.findall(text)
    if "".join(pieces) != text:
        raise ValueError(f"tokenizer is not lossless on {text[:60]!r}")
    return pieces


def build_vocab(texts: list[str]) -> dict[str, int]:
    """Ids for every token string in ``texts`` (sorted order, from 2; 0 = pad, 1 = EOS)."""
    return {tok: i + 2 for i, tok in enumerate(sorted({t for s in texts for t in tokenize(s)}))}


PAD_ID, EOS_ID = 0, 1

TOPICS = {
    "photosynthesis": [
        "Plants capture light with chlorophyll, mostly in the leaves.",
        "The light reactions split water and release oxygen as a by-product.",
        "Energy from light is stored in ATP and NADPH for the next stage.",
        "In the Calvin cycle, carbon dioxide is fixed into three-carbon sugars.",
        "Stomata open to let carbon dioxide in, but they also let water escape.",
        "On hot days many plants close their stomata, which slows growth.",
        "C4 and CAM plants use extra steps to save water in dry climates.",
        "Without photosynthesis there would be almost no free oxygen in the air.",
    ],
    "interest": [
        "Compound interest means you earn interest on earlier interest as well.",
        "With a 5% annual rate, $1,000 grows to about $1,628 after ten years.",
        "Simple interest, by contrast, is always computed on the original principal.",
        "The more often interest compounds, the faster the balance grows.",
        "The rule of 72 gives a quick estimate of the doubling time.",
        "Divide 72 by the rate in percent: at 6% money doubles in about 12 years.",
        "Fees and inflation reduce the real return, so check both.",
        "Starting early matters more than the exact rate for long horizons.",
    ],
    "volcanoes": [
        "A volcano forms where molten rock reaches the surface.",
        "Most volcanoes sit near the edges of tectonic plates.",
        "Magma that is rich in silica is thick and traps gas, so eruptions are explosive.",
        "Basaltic magma is runny, which is why Hawaiian lava flows so far.",
        "Ash clouds can ground flights hundreds of kilometres away.",
        "Scientists watch for small earthquakes and swelling of the ground.",
        "Volcanic soils are often very fertile, so people farm on the slopes.",
        "Some eruptions have cooled the whole planet for a year or two.",
    ],
    "sleep": [
        "Adults need roughly seven to nine hours of sleep each night.",
        "Sleep runs in cycles of about ninety minutes.",
        "Deep sleep helps the body repair tissue and store memories.",
        "REM sleep is when most vivid dreams happen.", "Caffeine can stay in the body for six hours or more.",
        "A regular wake-up time is one of the best habits you can build.",
        "Bright screens late at night delay the release of melatonin.",
        "Short naps of twenty minutes can restore alertness without grogginess.",
    ],
    "recursion": [
        "A recursive function solves a problem by calling itself on a smaller input.",
        "Every recursion needs a base case, or it never stops.",
        "The factorial of n is n times the factorial of n minus one.",
        "Each call adds a frame to the call stack, so deep recursion can overflow it.",
        "Memoisation stores results so the same subproblem is not solved twice.",
        "Many tree algorithms are easiest to write recursively.",
        "Tail calls can be turned into loops by some compilers.",
        "When in doubt, trace the calls by hand for a small input.",
    ],
    "bees": [
        "Honeybees live in colonies of tens of thousands of workers.",
        "A worker bee does different jobs as she ages, from cleaning to foraging.",
        "Foragers tell others where food is with the waggle dance.",
        "Bees turn nectar into honey by evaporating most of its water.",
        "The queen can lay more than a thousand eggs a day in summer.",
        "Many crops, such as almonds and apples, depend on bee pollination.",
        "Pesticides, parasites and habitat loss all threaten bee populations.",
        "Planting flowers that bloom at different times helps local bees.",
    ],
    "bridges": [
        "A beam bridge is the simplest design: a deck resting on supports.",
        "Arch bridges push their load outward into the abutments.",
        "Suspension bridges hang the deck from cables slung between towers.",
        "Engineers must plan for wind, traffic, temperature and earthquakes.",
        "Steel expands in summer, so long bridges have expansion joints.",
        "The Tacoma Narrows collapse taught engineers about aerodynamic flutter.",
        "Inspections look for corrosion, cracks and worn bearings.",
        "Modern bridges are often monitored with sensors in real time.",
    ],
    "vaccines": [
        "A vaccine trains the immune system to recognise a pathogen.",
        "Some vaccines use weakened viruses, others use only a protein.",
        "mRNA vaccines give cells instructions to make a harmless spike protein.",
        "Memory cells let the body respond faster the next time.",
        "Herd immunity protects people who cannot be vaccinated.",
        "Side effects such as a sore arm usually pass within a day or two.",
        "Booster doses top up protection that fades over time.",
        "Clinical trials run in phases before a vaccine is approved.",
    ],
}
TIPS = [
    "Read the question twice before you start.", "Write down what you know and what you need.",
    "Draw a diagram if the problem has shapes or distances.", "Check your units at every step.",
    "Estimate the answer first so you can spot mistakes.", "Break the problem into smaller parts.",
    "Keep your work neat so you can retrace it.", "Plug your answer back in to verify it.",
    "Take a short break if you get stuck.", "Ask yourself whether the result is reasonable.",
    "Preheat the oven to 180 degrees.", "Whisk the eggs and sugar until pale.",
    "Fold in the flour gently.", "Bake for 25 minutes, then let it cool.",
    "Back up your files before upgrading.", "Use a password manager for every account.",
    "Turn on two-factor authentication.", "Keep your operating system up to date.",
]
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemal", "Lena"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]
WORDS = ["network", "the", "and", "model", "answer", "is", "data", "very", "value", "step", "result", "of"]


def _sentences(rng: random.Random, n: int) -> list[str]:
    topic = rng.choice(sorted(TOPICS))
    return rng.sample(TOPICS[topic], min(n, len(TOPICS[topic])))


def gen_prose(rng: random.Random) -> str:
    intro = rng.choice(["", "Sure! ", "Good question. ", "Here is a short explanation.\n\n"])
    paras = [" ".join(_sentences(rng, rng.randint(2, 5))) for _ in range(rng.randint(1, 3))]
    return intro + "\n\n".join(paras)


def gen_math(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
    lines = [
        f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack.",
        f"The packs hold {b} × {c} = {b * c} {item}.",
        f"So {name} now has {a} + {b * c} = {a + b * c} {item}.",
    ]
    total = a + b * c
    if rng.random() < 0.5:
        d = rng.randint(1, total - 1)
        lines.append(f"{name} gives away {d} {item}, leaving {total} - {d} = {total - d} {item}.")
        total -= d
    end = rng.choice([f"The answer is {total}.", f"The answer is \\boxed{{{total}}}.", f"#### {total}"])
    return "\n".join(lines) + "\n" + end


def gen_sum(rng: random.Random) -> str:
    n, k = rng.randint(2, 9), rng.randint(3, 8)
    sep = rng.choice([" + ", "+"])
    terms = sep.join([str(n)] * k)
    head = rng.choice([
        f"Multiplication is repeated addition, so {k} × {n} means adding {n} {k} times:",
        f"Each of the {k} boxes holds {n} pens. Adding them up:",
        "Count the groups one by one:",
    ])
    tail = rng.choice(["", f" So there are {n * k} in total.", f"\nThe answer is {n * k}."])
    if rng.random() < 0.3:
        return f"{head} {' × '.join(['2'] * k)} = {2 ** k}, which is 2 to the power {k}.{tail}"
    return f"{head} {terms} = {n * k}.{tail}"


def gen_numbered(rng: random.Random) -> str:
    items = rng.sample(TIPS, rng.randint(4, 10))
    style = rng.choice(["{i}. {t}", "Step {i}: {t}", "{i}) {t}", "**{i}.** {t}"])
    head = rng.choice(["Here are some tips:\n\n", "Follow these steps:\n", ""])
    return head + "\n".join(style.format(i=i + 1, t=t) for i, t in enumerate(items))


def gen_bullets(rng: random.Random) -> str:
    keys = rng.sample(["Pros", "Cons", "Cost", "Speed", "Safety", "Notes", "Risk", "Effort"], rng.randint(3, 6))
    lines = [f"- **{k}:** {rng.choice(TIPS)}" for k in keys]
    return "Summary:\n" + "\n".join(lines) + "\n\n" + " ".join(_sentences(rng, 2))


def gen_table(rng: random.Random) -> str:
    ncol, nrow = rng.randint(3, 8), rng.randint(2, 8)
    head = ["Name"] + [f"Q{i + 1}" for i in range(ncol - 1)]
    sep = rng.choice(["---", ":---", "---:", ":-:"])
    fill = rng.choice(["num", "num", "check", "zero"])

    def cell() -> str:
        if fill == "check":
            return rng.choice(["✓", "✓", "✗"])
        if fill == "zero":
            return rng.choice(["0", "0", "0", str(rng.randint(1, 9))])
        return str(rng.randint(0, 99))

    rows = ["| " + " | ".join(head) + " |", "|" + "|".join([f" {sep} "] * ncol) + "|"]
    rows += ["| " + " | ".join([rng.choice(NAMES)] + [cell() for _ in range(ncol - 1)]) + " |" for _ in range(nrow)]
    return rng.choice(["", "Here is the table:\n\n"]) + "\n".join(rows)


CODE = [
    "def factorial(n):\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n",
    "grid = [[0] * {n} for _ in range({m})]\nfor i in range({m}):\n    for j in range({n}):\n"
    "        grid[i][j] = i * j\n",
    "weights = [0.0, 0.0, 0.0, 0.0]\nbias = 0.0\nfor x, y in data:\n"
    "    pred = sum(w * v for w, v in zip(weights, x)) + bias\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "print(\"=\" * 40)\nprint(\"Report\")\nprint(\"=\" * 40)\n",
    "identity = [\n    [1, 0, 0],\n    [0, 1, 0],\n    [0, 0, 1],\n]\n",
    "def test_add():\n    assert add(1, 2) == 3\n    assert add(0, 0) == 0\n    assert add(-1, 1) == 0\n"
    "    assert add(2, 2) == 4\n",
    "if score >= 90:\n    grade = \"A\"\nelif score >= 80:\n    grade = \"B\"\nelif score >= 70:\n"
    "    grade = \"C\"\nelse:\n    grade = \"F\"\n",
    "config = {\n    \"lr\": 0.001,\n    \"batch_size\": {n}{m},\n    \"epochs\": {m},\n"
    "    \"dropout\": 0.1,\n}\n",
    "for (int i = 0; i < n; i++) {\n    for (int j = 0; j < n; j++) {\n        if (a[i][j] > 0) {\n"
    "            count++;\n        }\n    }\n}\n",
    "# ----------------------------------------\n# Helpers\n# ----------------------------------------\n"
    "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
    "<ul>\n  <li>Home</li>\n  <li>About</li>\n  <li>Blog</li>\n  <li>Contact</li>\n</ul>\n",
    "SELECT name, COUNT(*) AS n\nFROM orders\nWHERE status = 'paid'\nGROUP BY name\nORDER BY n DESC;\n",
]

def gen_code(rng: random.Random) -> str:
    blocks = rng.sample(CODE, rng.randint(1, 3))
    body = "\n".join(b.replace("{n}", str(rng.randint(2, 9))).replace("{m}", str(rng.randint(2, 9))) for b in blocks)
    head = rng.choice(["", "Here is the code:\n\n"])
    return head + "```python\n" + body + "```\n" + rng.choice(["", "This runs in linear time."])


ENUMS = [
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday",
    "one, two, three, four, five, six, seven, eight, nine, ten",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
    "0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
    "A, B, C, D, E, F, G, H",
    "red, orange, yellow, green, blue, indigo and violet",
    "January, February, March, April, May and June",
    "2, 4, 6, 8, 10, 12, 14, 16, 18, 20",
]
REFRAINS = [
    "Row, row, row your boat, gently down the stream.",
    "Ha ha ha, that is a good one!",
    "No, no, no, that is not what I meant.",
    "It was very, very cold that night.",
    "Tick tock, tick tock, went the old clock.",
    "Knock knock. Who's there? Lettuce. Lettuce who? Lettuce in, it's cold out here!",
    "The population grew to 1,000,000,000 by the early 1800s.",
    "Wait... wait... wait for it!",
    "Title\n=====\n\nSection\n-------\n",
]


def gen_enum(rng: random.Random) -> str:
    parts = [rng.choice([
        f"The sequence is {rng.choice(ENUMS)}.", f"In order: {rng.choice(ENUMS)}.", rng.choice(REFRAINS),
    ]) for _ in range(rng.randint(1, 3))]
    return " ".join(parts + _sentences(rng, rng.randint(1, 3)))


def gen_song(rng: random.Random) -> str:
    chorus = rng.choice(REFRAINS[:5]) + "\n" + rng.choice(TOPICS["sleep"])
    verses = [" ".join(_sentences(rng, 2)) for _ in range(2)]
    return f"{verses[0]}\n\n{chorus}\n\n{verses[1]}\n\n{chorus}"


NEGATIVE: dict[str, Callable[[random.Random], str]] = {
    "prose": gen_prose, "math": gen_math, "repeated_sum": gen_sum, "numbered_list": gen_numbered,
    "bullets": gen_bullets, "table": gen_table, "code": gen_code, "enumeration": gen_enum, "refrain": gen_song,
}


def _compose(rng: random.Random, gen: Callable[[random.Random], str]) -> str:
    """A whole answer: the main part, often with surrounding explanation or a second part."""
    parts = [gen(rng)]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        extra = rng.choice([gen_prose, gen_prose, gen, gen_math, gen_code, gen_numbered])(rng)
        parts.insert(rng.randint(0, len(parts)), extra)
    return "\n\n".join(parts)


def _prefix(rng: random.Random) -> str:
    """Text before a loop, drawn like the negatives (so it holds legitimate repetition too)."""
    return _compose(rng, NEGATIVE[rng.choice(sorted(NEGATIVE))])


def _cut_prefix(text: str, rng: random.Random, budget: int, lo: float, hi: float, loop_len: int) -> str:
    """The first ``uniform(lo, hi) * budget`` tokens of ``text``, leaving ``loop_len`` tokens of the budget."""
    n = min(int(budget * rng.uniform(lo, hi)), budget - loop_len)
    return "".join(tokenize(text)[: max(0, n)])


def _min_loop(unit: str) -> int:
    """Fewest tokens of a loop that runs to the budget: three copies, and at least 16 tokens."""
    return max(3 * len(tokenize(unit)), 16)


def pos_loop(rng: random.Random, budget: int, kind: str) -> tuple[str, int, int]:
    """A loop that runs past the budget; returns (text, loop start in tokens, period in tokens)."""
    pre = _prefix(rng)
    if kind == "loop_token":
        words = [t for t in tokenize(pre) if t[:1] == " " and t[1:].isalpha()] or [" the"]
        unit = rng.choice([" " + rng.choice(WORDS), rng.choice(words)])
    elif kind == "loop_phrase" and rng.random() < 0.5:
        unit = " " + " ".join(rng.sample(WORDS, rng.randint(2, 4))) + rng.choice(["", ",", "."])
    elif kind == "loop_phrase":
        words = rng.choice(_sentences(rng, 3)).split()
        i = rng.randrange(max(1, len(words) - 4))
        unit = " " + " ".join(words[i : i + rng.randint(2, 4)])
    elif kind == "loop_sentence":
        unit = " " + rng.choice(_sentences(rng, 3))
    elif kind == "loop_answer":
        unit = rng.choice([" The answer is {n}.", " So the total is {n}.", "\n#### {n}"]).format(n=rng.randint(2, 999))
    elif kind == "loop_lines":
        unit = rng.choice(["| 0 | 0 | 0 |\n", "- " + rng.choice(TIPS) + "\n", "    x = x + 1\n", "print(result)\n"])
    else:
        raise ValueError(kind)
    pre = _cut_prefix(pre, rng, budget, 0.05, 0.8, _min_loop(unit)) + ("\n" if kind == "loop_lines" else "")
    return pre + unit * budget, len(tokenize(pre)), len(tokenize(unit))


def pos_noisy(rng: random.Random, budget: int) -> tuple[str, int, int]:
    """A sentence loop in which sampling noise swaps one word in about a quarter of the copies."""
    words = rng.choice(_sentences(rng, 3)).split()
    pre = _cut_prefix(_prefix(rng), rng, budget, 0.05, 0.5, _min_loop(" " + " ".join(words)))
    copies = []
    for _ in range(budget // 4):
        w = list(words)
        if rng.random() < 0.25:
            w[rng.randrange(len(w))] = rng.choice(WORDS)
        copies.append(" " + " ".join(w))
    return pre + "".join(copies), len(tokenize(pre)), len(tokenize(" " + " ".join(words)))


def pos_burst(rng: random.Random, budget: int) -> tuple[str, int, int]:
    """A burst of 16-64 repeated tokens inside otherwise normal text."""
    unit = tokenize(" " + rng.choice(WORDS)) if rng.random() < 0.5 else tokenize(" " + " ".join(rng.sample(WORDS, 2)))
    n = rng.randint(16, 64)
    pre = _cut_prefix(_prefix(rng), rng, budget, 0.1, 0.5, n)
    burst = "".join((unit * n)[:n])
    return pre + burst + " " + " ".join(_sentences(rng, 4)), len(tokenize(pre)), len(unit)


def pos_counter(rng: random.Random, budget: int) -> tuple[str, int, int]:
    """A loop whose unit carries an incrementing counter ("Step 7: ... Step 8: ...")."""
    tip, i = rng.choice(TIPS), rng.randint(1, 5)
    pre = _cut_prefix(_prefix(rng), rng, budget, 0.05, 0.5, _min_loop(f"\nStep {i}: {tip}"))
    steps = "".join(f"\nStep {i + j}: {tip}" for j in range(budget // 4))
    return pre + steps, len(tokenize(pre)), len(tokenize(f"\nStep {i}: {tip}"))


POSITIVE = [
    "loop_token", "loop_phrase", "loop_sentence", "loop_answer", "loop_lines", "loop_noisy", "burst", "loop_counter",
]


def generate(seed: int, n_per_kind: int = 40, budgets: tuple[int, ...] = (128, 256, 256, 512)) -> list[dict]:
    """The labelled rows for ``seed`` (``n_per_kind`` rows for each negative and positive kind)."""
    rng = random.Random(seed)
    rows = []
    for kind, gen in NEGATIVE.items():
        for _ in range(n_per_kind):
            budget = rng.choice(budgets)
            toks = tokenize(_compose(rng, gen))
            ended = len(toks) <= budget
            text = "".join(toks[:budget])
            rows.append({"kind": kind, "label": 0, "gen_length": budget, "ended": ended, "text": text})
    for kind in POSITIVE:
        for _ in range(n_per_kind):
            budget = rng.choice(budgets)
            if kind == "loop_noisy":
                text, start, period = pos_noisy(rng, budget)
            elif kind == "burst":
                text, start, period = pos_burst(rng, budget)
            elif kind == "loop_counter":
                text, start, period = pos_counter(rng, budget)
            else:
                text, start, period = pos_loop(rng, budget, kind)
            toks = tokenize(text)
            rows.append({
                "kind": kind, "label": 1, "gen_length": budget, "ended": len(toks) <= budget,
                "loop_start": start, "loop_period": period, "text": "".join(toks[:budget]),
            })
    rng.shuffle(rows)
    return [{"id": f"s{seed}-{i:04d}", **row} for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------
# The real set: LLaDA-8B-Instruct evaluation generations published with d1 (bench/data/README.md)

D1_REPO = "dllm-reasoning/d1"
D1_FILE_RE = regex.compile(r"eval/eval_baselines/([a-z0-9]+)_instruct_(\d+)_\d+_\d+_generations\.json")
STOP_RE = regex.compile(r"<\|(?:eot_id|endoftext)\|>")
TASKS = ("gsm8k", "math500", "countdown", "sudoku")
LENGTHS = (128, 256, 512)


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def read_d1(git_dir: Path) -> tuple[str, dict[tuple[str, int], list[dict]]]:
    """Every generation in d1's ``eval/eval_baselines`` at the snapshot's HEAD, by (task, gen_length)."""
    commit = _git(git_dir, "rev-parse", "HEAD").strip()
    cells: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(_git(git_dir, "ls-tree", "-r", "--name-only", commit, "eval/eval_baselines").split()):
        m = D1_FILE_RE.fullmatch(path)
        if not m:
            continue
        data = json.loads(_git(git_dir, "show", f"{commit}:{path}"))
        for i, g in enumerate(data["generations"]):
            raw = g["generations"]
            stop = STOP_RE.search(raw)
            cells.setdefault((m.group(1), int(m.group(2))), []).append({
                "question": g["question"], "ground_truth": str(g.get("ground_truth", "")),
                "text": raw[: stop.start()] if stop else raw, "ended": stop is not None,
                "source": {"repo": D1_REPO, "commit": commit, "path": path, "index": i},
                "model": "LLaDA-8B-Instruct", "block_length": data.get("block_length"),
                "diffusion_steps": data.get("diffusion_steps"),
            })
    return commit, cells


def sample_real(git_dir: Path, seed: int = 0, n_dev: int = 30, n_test: int = 20) -> list[dict]:
    """``n_dev + n_test`` generations per (task, gen_length), questions disjoint across all of them.

    For each task the questions present at every length are shuffled with ``seed``; the first ``n_dev``
    are read at 128 tokens, the next ``n_dev`` at 256, the next at 512 (the dev split); then ``n_test``
    more at each length in the same way (the test split).
    """
    _, cells = read_d1(git_dir)
    rng = random.Random(seed)
    rows = []
    for task in TASKS:
        by_len = {n: {g["question"]: g for g in cells[(task, n)]} for n in LENGTHS}
        common = sorted(set.intersection(*(set(b) for b in by_len.values())))
        rng.shuffle(common)
        for split, first, size in (("dev", 0, n_dev), ("test", len(LENGTHS) * n_dev, n_test)):
            for j, n in enumerate(LENGTHS):
                for k, q in enumerate(common[first + j * size : first + (j + 1) * size]):
                    rid = f"{task}-{n}-{k:02d}" if split == "dev" else f"{task}-{n}-t{k:02d}"
                    rows.append({"id": rid, "task": task, "gen_length": n, "split": split, **by_len[n][q]})
    return rows


LABEL_FIELDS = ("label", "confidence", "kind", "note")


def read_labels(path: Path) -> dict[str, dict]:
    """Hand labels: a TSV of id, label (0/1), confidence, kind, note; '#' lines are comments."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rid, label, conf, kind, *note = line.split("\t")
        out[rid] = {"label": int(label), "confidence": conf, "kind": kind, "note": "\t".join(note)}
    return out


def write_real(git_dir: Path, out: Path, labels: Path, seed: int = 0) -> None:
    rows = sample_real(git_dir, seed)
    lab = read_labels(labels) if labels.exists() else {}
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, **lab.get(r["id"], dict.fromkeys(LABEL_FIELDS))}, ensure_ascii=False) + "\n")
    n_lab = sum(r["id"] in lab for r in rows)
    print(f"wrote {len(rows)} real generations ({n_lab} labelled, "
          f"{sum(lab[r['id']]['label'] for r in rows if r['id'] in lab)} loops) to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-per-kind", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--real", type=Path, default=None, metavar="D1_GIT_DIR",
                    help="build the real set from a git snapshot of dllm-reasoning/d1 instead")
    ap.add_argument("--labels", type=Path, default=Path(__file__).parent / "data" / "loops_real_labels.tsv")
    args = ap.parse_args()
    if args.real is not None:
        write_real(args.real, args.out or Path(__file__).parent / "data" / "loops_real.jsonl", args.labels,
                   seed=args.seed)
        return
    args.out = args.out or Path(__file__).parent / "data" / "loops_eval.jsonl"
    rows = generate(args.seed, args.n_per_kind)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows ({sum(r['label'] for r in rows)} loops) to {args.out}")


if __name__ == "__main__":
    main()

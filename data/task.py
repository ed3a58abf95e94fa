"""Built-in reasoning task: multi-step arithmetic word problems.

Each problem is a short story of one to three operations on a count of objects; the completion is a
worked solution that ends with ``The answer is N.``::

    prompt:     Mia has 7 shells. She finds 5 more. Then she gives 3 to Leo. How many shells does Mia have now?
    completion: 7 + 5 = 12. 12 - 3 = 9. The answer is 9.
    answer:     9

Generation is deterministic given ``seed`` (an explicit ``random.Random``), and the held-out split never
repeats a training prompt. The task is the quickstart's: small enough that a tiny diffusion model learns
it on a CPU in minutes, hard enough that sampling mistakes show up in the accuracy.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

NAMES = [
    ("Tom", "He", "him"), ("Ann", "She", "her"), ("Ben", "He", "him"), ("Lily", "She", "her"),
    ("Sam", "He", "him"), ("Mia", "She", "her"), ("Max", "He", "him"), ("Zoe", "She", "her"),
    ("Leo", "He", "him"), ("Eva", "She", "her"),
]
ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles", "cookies", "stickers"]

ANSWER_RE = re.compile(r"The answer is\s*(-?\d+)", re.IGNORECASE)


class TaskConfigError(ValueError):
    """Raised for impossible task settings."""


@dataclass(frozen=True)
class ArithmeticTaskSpec:
    """Difficulty settings of the arithmetic task.

    Attributes:
        min_ops: fewest operations per problem (>= 1).
        max_ops: most operations per problem.
        max_start: largest starting count.
        max_operand: largest number added or removed.
        max_value: no intermediate value exceeds this.
        allow_multiply: include "doubles"/"triples" steps.
        loop_fraction: share of *training* solutions replaced by a degenerate one that falls into a repetition
            loop (a step repeated ``loop_repeats`` times, no final answer), the way diffusion models loop; a
            testbed for loop penalties and the decode-time loop guard. The held-out split is never changed.
        loop_repeats: copies of the repeated step in such a solution.
    """

    min_ops: int = 1
    max_ops: int = 3
    max_start: int = 20
    max_operand: int = 9
    max_value: int = 60
    allow_multiply: bool = True
    loop_fraction: float = 0.0
    loop_repeats: int = 6

    def validate(self) -> None:
        """Raise :class:`TaskConfigError` on impossible settings."""
        if self.min_ops < 1 or self.max_ops < self.min_ops:
            raise TaskConfigError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if self.max_start < 1 or self.max_operand < 1:
            raise TaskConfigError("max_start and max_operand must be >= 1")
        if self.max_value < self.max_start:
            raise TaskConfigError(f"max_value ({self.max_value}) must be >= max_start ({self.max_start})")
        if not 0.0 <= self.loop_fraction < 1.0:
            raise TaskConfigError(f"loop_fraction must be in [0, 1), got {self.loop_fraction}")
        if self.loop_repeats < 2:
            raise TaskConfigError(f"loop_repeats must be >= 2, got {self.loop_repeats}")


def _make_problem(rng: random.Random, spec: ArithmeticTaskSpec) -> dict[str, str | int]:
    name, pron, obj = rng.choice(NAMES)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    item = rng.choice(ITEMS)
    value = rng.randint(2, spec.max_start)
    sentences = [f"{name} has {value} {item}."]
    steps: list[str] = []
    n_ops = rng.randint(spec.min_ops, spec.max_ops)
    for i in range(n_ops):
        then = "Then " + pron.lower() if i > 0 else pron
        choices = ["add", "sub"]
        if spec.allow_multiply and value * 2 <= spec.max_value:
            choices.append("mul")
        op = rng.choice(choices)
        if op == "sub" and value < 2:
            op = "add"
        if op == "add" and value + 1 > spec.max_value:
            op = "sub"
        if op == "add":
            n = rng.randint(1, min(spec.max_operand, spec.max_value - value))
            verb = rng.choice([f"{then} buys {n} more.", f"{then} finds {n} more.", f"{then} gets {n} more."])
            if rng.random() < 0.3:
                verb = f"{friend} gives {obj} {n} more."
            sentences.append(verb)
            steps.append(f"{value} + {n} = {value + n}.")
            value += n
        elif op == "sub":
            n = rng.randint(1, min(spec.max_operand, value - 1))
            verb = rng.choice([f"{then} gives {n} to {friend}.", f"{then} loses {n}.", f"{then} sells {n}."])
            sentences.append(verb)
            steps.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            k = 3 if value * 3 <= spec.max_value and rng.random() < 0.4 else 2
            word = {2: "doubles", 3: "triples"}[k]
            sentences.append(f"Then the number of {item} {word}." if i > 0 else f"The number of {item} {word}.")
            steps.append(f"{value} * {k} = {value * k}.")
            value *= k
    sentences.append(f"How many {item} does {name} have now?")
    return {
        "prompt": " ".join(sentences),
        "completion": " ".join([*steps, f"The answer is {value}."]),
        "answer": str(value),
    }


def generate_problems(n: int, *, seed: int, spec: ArithmeticTaskSpec | None = None,
                      exclude: set[str] | None = None) -> list[dict[str, str | int]]:
    """Generate ``n`` distinct problems with an explicit RNG seeded by ``seed``.

    Args:
        n: number of problems.
        seed: seed of the generator; the same seed gives the same problems.
        spec: difficulty settings (default :class:`ArithmeticTaskSpec`).
        exclude: prompts that must not appear (used to keep the held-out split disjoint).

    Raises:
        TaskConfigError: if ``n`` distinct problems cannot be found (settings too narrow).
    """
    spec = spec or ArithmeticTaskSpec()
    spec.validate()
    if n < 0:
        raise TaskConfigError(f"number of problems must be >= 0, got {n}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str | int]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise TaskConfigError(f"could only build {len(out)} distinct problems of {n}; widen the task settings")
        prob = _make_problem(rng, spec)
        if prob["prompt"] in seen:
            continue
        seen.add(str(prob["prompt"]))
        out.append(prob)
    return out


def arithmetic_dataset(num_train: int = 20000, num_test: int = 500, *, seed: int = 0,
                       spec: ArithmeticTaskSpec | None = None) -> DatasetDict:
    """Train and held-out splits of the arithmetic task as a ``datasets.DatasetDict``.

    Columns: ``prompt``, ``completion``, ``answer``. The test split is drawn first, from its own stream, so it
    depends only on ``seed`` and ``spec`` (a larger ``num_test`` extends it); the train split excludes every
    test prompt, and a larger ``num_train`` extends the same sequence. Runs that share a seed (pre-training
    and SFT of the quickstart) therefore never train on the held-out problems.
    """
    test = generate_problems(num_test, seed=seed + 1_000_003, spec=spec)
    train = generate_problems(num_train, seed=seed, spec=spec, exclude={str(p["prompt"]) for p in test})
    spec = spec or ArithmeticTaskSpec()
    if spec.loop_fraction > 0:
        rng = random.Random(seed + 2_000_003)  # own stream: the problems are the same with and without loops
        for p in train:
            if rng.random() < spec.loop_fraction:
                p["completion"] = looping_solution(str(p["completion"]), rng, spec.loop_repeats)
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def looping_solution(completion: str, rng: random.Random, repeats: int) -> str:
    """A degenerate version of a worked solution: the steps up to a random one, then that step ``repeats``
    more times, and no final answer (``7 + 5 = 12. 12 - 3 = 9. 12 - 3 = 9. 12 - 3 = 9. ...``)."""
    steps = [s.strip() + "." for s in completion.split(".") if "=" in s]
    if not steps:
        return completion
    j = rng.randrange(len(steps))
    return " ".join(steps[: j + 1] + [steps[j]] * repeats)


def extract_answer(text: str) -> str | None:
    """The integer after the last ``The answer is`` in ``text`` (as the accuracy rewards read it), or ``None``."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def is_correct(completion: str, answer: str | int) -> bool:
    """Whether ``completion`` states ``answer`` as its final answer."""
    got = extract_answer(completion)
    return got is not None and int(got) == int(answer)


def pretraining_texts(problems: list[dict[str, str | int]]) -> list[str]:
    """Plain-text documents (problem followed by its solution, no chat template) for pre-training."""
    return [f"{p['prompt']} {p['completion']}" for p in problems]


def corpus_for_tokenizer(spec: ArithmeticTaskSpec | None = None) -> list[str]:
    """Texts covering every word the task can produce (used to build the embedded tokenizer)."""
    texts = generate_problems(3000, seed=12345, spec=spec)
    words = [f"{n} {p} {o}" for n, p, o in NAMES] + ITEMS + ["doubles triples Then then"]
    return [f"{t['prompt']} {t['completion']}" for t in texts] + words

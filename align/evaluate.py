"""Held-out evaluation: sample completions with the rollout engine and score the final answers.

Reports accuracy, mean completion length (tokens up to the end of the answer, i.e. before the first
EOS / end-of-turn), the loop rate (share of completions with a repetition loop before the first stop, found
by the detector of ``loop_penalty`` with ``eval.loop_detection``: by default the text path,
:func:`align.loops_text.detect_text_loops`; each sample records the text path's and the token-id path's
fractions) and keeps each completion for the run report.

The same code path serves the run pipeline (:func:`align.pipeline.recipe.run_eval`) and ``dlm-align eval``
(:mod:`align.cli.eval`): held-out rows become prompts and answers with :func:`eval_problems`, completions are
scored by a :class:`Checker` (by default the one the pipeline uses, ``math_accuracy``'s extraction and matching),
and under ``torchrun`` :func:`evaluate_sharded` splits the problems into contiguous, batch-aligned shards and
gathers the records on every rank, so that each batch, and so each greedy completion, is the one a single process
decodes. :func:`wilson_interval` gives the 95% interval of an accuracy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from align.config import EvalConfig
from align.data.collator import left_pad
from align.data.formatting import ColumnNames, add_system_prompt, encode_prompt
from align.rewards.countdown import CountdownChecker

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        accuracy: share of problems whose final answer is correct.
        mean_completion_length: mean number of completion tokens before the first stop token.
        num_problems: problems scored.
        nfe: model forward calls spent by the sampler.
        loop_rate: share of completions with at least one loop.
        mean_loop_fraction: mean share of a completion covered by loops (characters on the text path, tokens on
            the token-id path).
        samples: per-problem records (prompt, completion, answer, predicted, correct, length, loop_fraction,
            loop_fraction_text, loop_fraction_ids).
        seconds: wall-clock seconds spent in the sampler (the slowest rank's under :func:`evaluate_sharded`).
        generated_tokens: completion tokens before the first stop, summed over the problems.
    """

    accuracy: float
    mean_completion_length: float
    num_problems: int
    nfe: int
    loop_rate: float = 0.0
    mean_loop_fraction: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens (before the first stop) per second of sampling."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, float | int]:
        """The scalar fields, for ``report.json``."""
        return {"accuracy": self.accuracy, "mean_completion_length": self.mean_completion_length,
                "num_problems": self.num_problems, "nfe": self.nfe, "loop_rate": self.loop_rate,
                "mean_loop_fraction": self.mean_loop_fraction}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and end-of-turn ids of ``tokenizer`` (those present)."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, prompts: list[Any], answers: list[str], cfg: EvalConfig, *,
             use_chat_template: bool = True, seed: int = 0, desc: str = "eval", checker: Checker | None = None
             ) -> EvalResult:
    """Generate one completion per prompt and score it against ``answers``.

    Args:
        model: a denoiser exposing ``hidden_states``/``head``/``mask_token_id``.
        tokenizer: its tokenizer.
        prompts: prompt strings or chat message lists.
        answers: reference final answers (strings).
        cfg: sampler settings and batch size.
        seed: seed of the sampler's generator (only used at temperature > 0 or random remasking).
        checker: scores a completion against its reference; default :func:`default_checker` (the extraction and
            matching of the accuracy rewards).
    """
    from align.sampling import completion_lengths, generate

    check = checker or default_checker()

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    guard_cfg = cfg.loop_guard_config()
    detector = cfg.loop_detector(pad_ids=tuple(stops))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[dict[str, Any]] = []
    nfe, seconds = 0, 0.0
    for s in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[s:s + cfg.batch_size]
        rows = [encode_prompt(tokenizer, p, use_chat_template=use_chat_template) for p in chunk]
        ids, att = left_pad(rows, tokenizer.pad_token_id)
        _synchronize(device)
        t0 = time.perf_counter()
        out = generate(model, ids.to(device), attention_mask=att.to(device), **cfg.generate_kwargs(),
                       generator=gen, on_commit=guard_cfg.build(stops))
        _synchronize(device)
        seconds += time.perf_counter() - t0
        nfe += int(out.nfe)
        comp = out.sequences[:, ids.shape[1]:].cpu()
        lengths = completion_lengths(comp, stops)[0]
        # loops in the completion a reader gets: the tokens before the first stop (what follows is never shown);
        # both detectors are recorded, loop_rate counts eval.loop_detection's source (the text path by default)
        kept = [comp[i, : lengths[i]].tolist() for i in range(len(comp))]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]
        by_source = {src: detector.fractions(texts, kept, source=src) for src in ("text", "ids")}
        chosen = ([max(t, i) for t, i in zip(by_source["text"], by_source["ids"])] if detector.source == "both"
                  else by_source["ids" if detector.source == "ids" else "text"])
        for i, p in enumerate(chunk):
            text = texts[i]
            ans = answers[s + i]
            # By default the same extraction and matching as the accuracy rewards, so eval and RL agree.
            pred, correct = check(text, ans)
            samples.append({"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": text,
                            "answer": str(ans), "predicted": pred, "correct": correct, "length": int(lengths[i]),
                            "loop_fraction": float(chosen[i]), "loop_fraction_text": float(by_source["text"][i]),
                            "loop_fraction_ids": float(by_source["ids"][i])})
    if was_training:
        model.train()
    return _result(samples, nfe, seconds)


def _result(samples: list[dict[str, Any]], nfe: int, seconds: float) -> EvalResult:
    """The scores of per-problem records."""
    n = len(samples)
    return EvalResult(accuracy=sum(r["correct"] for r in samples) / max(n, 1),
                      mean_completion_length=sum(r["length"] for r in samples) / max(n, 1),
                      num_problems=n, nfe=nfe, samples=samples,
                      loop_rate=sum(r["loop_fraction"] > 0 for r in samples) / max(n, 1),
                      mean_loop_fraction=sum(r["loop_fraction"] for r in samples) / max(n, 1),
                      seconds=seconds, generated_tokens=sum(r["length"] for r in samples))


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Problems: held-out rows as prompts and reference answers
# ---------------------------------------------------------------------------------------------------------------

def eval_problem(row: Mapping[str, Any], names: ColumnNames, where: str, system_prompt: str | None = None
                 ) -> tuple[Any, str]:
    """The prompt (as the GRPO stage reads it, with ``system_prompt`` in front) and the reference answer of a row."""
    from align.data.loading import check_answer, rl_prompt

    prompt = add_system_prompt(rl_prompt(row, names, where), system_prompt, where)
    return prompt, check_answer(row, names, where)


def eval_problems(rows: Sequence[Mapping[str, Any]], names: ColumnNames, num_problems: int | None, *,
                  system_prompt: str | None = None, source: str = "held-out") -> tuple[list[Any], list[str]]:
    """Prompts and answers of the first ``num_problems`` rows (all when None), as :func:`eval_problem` reads them.

    A split with fewer rows is evaluated whole, with a warning."""
    n = len(rows) if num_problems is None else min(num_problems, len(rows))
    if num_problems is not None and n < num_problems:
        logger.warning("%s split has %d rows; evaluating %d instead of %d", source, len(rows), n, num_problems)
    prompts, answers = [], []
    for i in range(n):
        prompt, answer = eval_problem(rows[i], names, f"{source} row {i}", system_prompt)
        prompts.append(prompt)
        answers.append(answer)
    return prompts, answers


def few_shot_prompt(prompt: Any, shots: Sequence[tuple[str, str]], *, use_chat_template: bool = True) -> Any:
    """``prompt`` preceded by worked examples ``(question, solution)``.

    With the chat template the examples are earlier turns (a user message and the assistant's solution each, after
    any system message of ``prompt``); without it they are ``Question: ...\\nAnswer: ...`` paragraphs in front of
    the prompt's text."""
    if not shots:
        return prompt
    if use_chat_template:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        head = [m for m in msgs[:1] if m.get("role") == "system"]
        turns = [t for q, a in shots for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return [*head, *turns, *msgs[len(head):]]
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    examples = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in shots)
    return f"{examples}\n\nQuestion: {text}\nAnswer:"


# ---------------------------------------------------------------------------------------------------------------
# Checkers: is a completion's answer right?
# ---------------------------------------------------------------------------------------------------------------

#: ``checker(completion_text, reference) -> (predicted answer or None, correct)``.
Checker = Callable[[str, str], tuple[str | None, bool]]


class AnswerChecker:
    """The extraction paths and matching of an accuracy reward (:class:`align.rewards.AnswerAccuracy`):
    the final answer is extracted (paths tried in ``order``) and compared with the reference's final answer
    (``#### X`` and ``\\boxed{X}`` solutions reduced to X); non-numeric answers go to math-verify when
    ``use_math_verify``."""

    def __init__(self, order: Sequence[str] = ("boxed", "answer_tag", "phrase", "hash"), *,
                 use_math_verify: bool = True, name: str = "math_accuracy") -> None:
        self.order = tuple(order)
        self.use_math_verify = use_math_verify
        self.name = name

    def __call__(self, text: str, reference: str) -> tuple[str | None, bool]:
        from align.rewards.answers import answers_match, extract_answer, gold_answer

        pred = extract_answer(text, self.order)
        return pred, answers_match(pred, gold_answer(reference), use_math_verify=self.use_math_verify)


class MathVerifyChecker:
    """math-verify end to end: the completion and the reference's final answer are both parsed by
    ``math_verify.parse`` (LaTeX and plain expressions, its own answer extraction) and compared by
    ``math_verify.verify``."""

    name = "math_verify"

    def __init__(self) -> None:
        try:
            import math_verify
        except ImportError as err:
            raise ValueError("checker 'math_verify' needs the math-verify package (pip install math-verify)") from err
        self._mv = math_verify

    def __call__(self, text: str, reference: str) -> tuple[str | None, bool]:
        from align.rewards.answers import gold_answer

        gold = gold_answer(reference)
        if gold is None:
            return None, False
        try:
            g, p = self._mv.parse(f"${gold}$"), self._mv.parse(text)
            ok = bool(g and p and self._mv.verify(g, p))
        except Exception:  # malformed LaTeX is a wrong answer, not a crash
            return None, False
        return (str(p[-1]) if p else None), ok


class RewardChecker:
    """Any reward of :mod:`align.rewards` (a registered name or ``package.module:callable``) as a checker: called
    with one completion and the reference as its ``answer`` column; the completion counts as correct when the
    reward is at least ``correct_at``."""

    def __init__(self, name: str, correct_at: float = 1.0) -> None:
        from align.rewards.registry import resolve_reward

        self.reward = resolve_reward(name)
        self.name = name
        self.correct_at = correct_at

    def __call__(self, text: str, reference: str) -> tuple[str | None, bool]:
        score = self.reward(prompts=[""], completions=[text], completion_ids=None, answer=[reference])[0]
        return None, score is not None and float(score) >= self.correct_at


#: checkers by name, besides any reward name of :mod:`align.rewards` (``dlm-align eval --checker``).
CHECKERS: dict[str, Callable[[], Checker]] = {
    "math_accuracy": lambda: AnswerChecker(name="math_accuracy"),
    "task_accuracy": lambda: AnswerChecker(("phrase", "answer_tag", "boxed", "hash"), name="task_accuracy"),
    "hash": lambda: AnswerChecker(("hash", "boxed", "answer_tag", "phrase"), name="hash"),
    "math_verify": MathVerifyChecker,
    "countdown": CountdownChecker,
}


def default_checker() -> Checker:
    """The checker of the run pipeline's evaluation: ``math_accuracy``'s paths (``\\boxed{}``, ``<answer>``,
    "The answer is", ``#### X``) and matching (exact for numbers, math-verify for other answers)."""
    return CHECKERS["math_accuracy"]()


def build_checker(name: str) -> Checker:
    """The checker called ``name``: one of :data:`CHECKERS`, else a reward of :mod:`align.rewards` by registered
    name or import path (:class:`RewardChecker`).

    Raises:
        ValueError: an unknown name (the message lists the checkers).
    """
    if name in CHECKERS:
        return CHECKERS[name]()
    from align.rewards.registry import RewardSpecError

    try:
        return RewardChecker(name)
    except RewardSpecError as err:
        raise ValueError(f"unknown checker {name!r}: {', '.join(CHECKERS)}, or a reward of align.rewards by name or "
                         f"package.module:callable ({err})") from err


# ---------------------------------------------------------------------------------------------------------------
# Statistics and distributed evaluation
# ---------------------------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for the default ``z``); ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def shard_bounds(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous share of ``n`` problems, cut at multiples of ``batch_size``:
    whole batches are dealt out as evenly as possible (the earlier ranks take one more when they do not divide),
    so every batch holds the problems it holds in a single process."""
    batches = math.ceil(n / batch_size) if n else 0
    per, extra = divmod(batches, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(n, first * batch_size), min(n, last * batch_size)


def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_sharded(model: torch.nn.Module, tokenizer: Any, prompts: list[Any], answers: list[str],
                     cfg: EvalConfig, **kwargs: Any) -> EvalResult:
    """:func:`evaluate` with the problems split over the ranks of an initialised process group.

    Each rank decodes its :func:`shard_bounds` share; the records are gathered on every rank
    (``all_gather_object``) and put back in problem order, so every rank returns the whole result. The batches are
    those of a single process, so greedy completions are the same; at ``temperature > 0`` each rank's generator
    starts from ``seed`` at its first batch, so sampled completions differ from a single process's. ``nfe`` is the
    sum over ranks, ``seconds`` the slowest rank's. Without a process group (or with one rank) this is
    :func:`evaluate`.
    """
    rank, world = _dist_world()
    if world == 1:
        return evaluate(model, tokenizer, prompts, answers, cfg, **kwargs)
    import torch.distributed as dist

    start, end = shard_bounds(len(prompts), cfg.batch_size, rank, world)
    part = evaluate(model, tokenizer, prompts[start:end], answers[start:end], cfg, **kwargs)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (start, part.samples, part.nfe, part.seconds))
    samples = [r for _, rows, _, _ in sorted(gathered, key=lambda g: g[0]) for r in rows]
    return _result(samples, sum(g[2] for g in gathered), max(g[3] for g in gathered))

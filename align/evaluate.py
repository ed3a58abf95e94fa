"""Held-out evaluation: sample completions with the rollout engine and score the final answers.

Reports accuracy, mean completion length (tokens up to the end of the answer, i.e. before the first
EOS / end-of-turn), the loop rate (share of completions with a repetition loop before the first stop, found
by the detector of ``loop_penalty`` with ``eval.loop_detection``: by default the text path,
:func:`align.loops_text.detect_text_loops`; each sample records the text path's and the token-id path's
fractions) and keeps each completion for the run report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from align.config import EvalConfig
from align.data.collator import left_pad
from align.data.formatting import encode_prompt

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
    """

    accuracy: float
    mean_completion_length: float
    num_problems: int
    nfe: int
    loop_rate: float = 0.0
    mean_loop_fraction: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

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
             use_chat_template: bool = True, seed: int = 0, desc: str = "eval") -> EvalResult:
    """Generate one completion per prompt and score it against ``answers``.

    Args:
        model: a denoiser exposing ``hidden_states``/``head``/``mask_token_id``.
        tokenizer: its tokenizer.
        prompts: prompt strings or chat message lists.
        answers: reference final answers (strings).
        cfg: sampler settings and batch size.
        seed: seed of the sampler's generator (only used at temperature > 0 or random remasking).
    """
    from align.rewards.answers import answers_match, extract_answer, gold_answer
    from align.sampling import completion_lengths, generate

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
    nfe = 0
    for s in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[s:s + cfg.batch_size]
        rows = [encode_prompt(tokenizer, p, use_chat_template=use_chat_template) for p in chunk]
        ids, att = left_pad(rows, tokenizer.pad_token_id)
        out = generate(model, ids.to(device), attention_mask=att.to(device), **cfg.generate_kwargs(),
                       generator=gen, on_commit=guard_cfg.build(stops))
        nfe += int(out.nfe)
        comp = out.sequences[:, ids.shape[1]:].cpu()
        lengths = completion_lengths(comp, stops)[0]
        # loops in the completion a reader gets: the tokens before the first stop (what follows is never shown);
        # both detectors are recorded, loop_rate counts eval.loop_detection's source (the text path by default)
        kept = [comp[i, : lengths[i]].tolist() for i in range(len(comp))]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]
        by_source = {src: detector.fractions(texts, kept, source=src) for src in ("text", "ids")}
        chosen = detector.fractions(texts, kept) if detector.source == "both" else by_source[
            "ids" if detector.source == "ids" else "text"]
        for i, p in enumerate(chunk):
            text = texts[i]
            pred = extract_answer(text)
            ans = answers[s + i]
            # The same extraction and matching as the accuracy rewards, so eval and RL agree.
            correct = answers_match(pred, gold_answer(ans))
            samples.append({"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": text,
                            "answer": str(ans), "predicted": pred, "correct": correct, "length": int(lengths[i]),
                            "loop_fraction": float(chosen[i]), "loop_fraction_text": float(by_source["text"][i]),
                            "loop_fraction_ids": float(by_source["ids"][i])})
    if was_training:
        model.train()
    n = len(samples)
    return EvalResult(accuracy=sum(r["correct"] for r in samples) / max(n, 1),
                      mean_completion_length=sum(r["length"] for r in samples) / max(n, 1),
                      num_problems=n, nfe=nfe, samples=samples,
                      loop_rate=sum(r["loop_fraction"] > 0 for r in samples) / max(n, 1),
                      mean_loop_fraction=sum(r["loop_fraction"] for r in samples) / max(n, 1))

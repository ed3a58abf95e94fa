"""Evaluation's loop rate: the detector of ``loop_penalty`` with ``eval.loop_detection`` (the text path by default)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from align.build import build_tokenizer
from align.config.sections import EvalConfig
from align.evaluate import evaluate

COMPLETIONS = [
    "15 * 2 = 30. 30 + 6 = 30. 30 + 6 = 30. 30 + 6 = 30.",  # three copies of a six-word line
    "15 * 2 = 30. 30 + 6 = 36. The answer is 36.",
]


@pytest.fixture()
def fixed_generations(monkeypatch):
    """``generate`` replaced by one that returns COMPLETIONS (EOS-terminated) after each prompt."""
    tok = build_tokenizer("builtin:arithmetic")
    rows = [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    width = max(map(len, rows)) + 1
    rows = [r + [tok.eos_token_id] * (width - len(r)) for r in rows]  # EOS-padded, as the sampler ends them

    def fake_generate(model, ids, attention_mask=None, **kw):
        comp = torch.tensor([rows[i % len(rows)] for i in range(ids.shape[0])])
        return SimpleNamespace(sequences=torch.cat([ids, comp], dim=1), nfe=1)

    import align.sampling

    monkeypatch.setattr(align.sampling, "generate", fake_generate)
    return tok


def _run(tok, **loop_detection):
    cfg = EvalConfig(num_problems=2, batch_size=2, loop_detection=loop_detection)
    return evaluate(torch.nn.Linear(1, 1), tok, ["What is 15 * 2 + 6?"] * 2, ["36", "36"], cfg,
                    use_chat_template=False)


def test_loop_rate_uses_the_text_path_and_records_both(fixed_generations) -> None:
    res = _run(fixed_generations)
    looped, clean = res.samples
    assert [s["completion"] for s in res.samples] == COMPLETIONS
    assert looped["loop_fraction"] == looped["loop_fraction_text"] > 0.5
    assert clean["loop_fraction"] == clean["loop_fraction_text"] == clean["loop_fraction_ids"] == 0.0
    assert res.loop_rate == 0.5 and res.accuracy == 0.5


def test_loop_detection_source_ids_counts_the_token_path(fixed_generations) -> None:
    text_path = _run(fixed_generations)
    ids_path = _run(fixed_generations, source="ids", min_span=40)  # no loop of 40 tokens here
    assert ids_path.loop_rate == 0.0
    assert [s["loop_fraction_text"] for s in ids_path.samples] == [s["loop_fraction_text"] for s in text_path.samples]
    shorter = _run(fixed_generations, source="text", word_min_span=22)  # the periodic run covers 21 words, marks
    assert shorter.loop_rate == 0.0

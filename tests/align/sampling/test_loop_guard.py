"""Decode-time loop guard: Remask penalties in the sampler, the guard hook, its settings."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from align.config import ConfigError, load_config
from align.rewards import detect_loops
from align.sampling import Remask, SamplingConfigError, generate
from align.sampling.loop_guard import LoopGuard, LoopGuardConfig, LoopGuardConfigError

V = 64
MASK, EOS = V - 1, V - 2
DETECT = {"min_span": 6, "k_min": 3}


class LoopingModel(nn.Module):
    """Wants ``10, 11, 10, 11, ...`` (logit ``hi``) at every generated position, with a distinct second choice
    ``20 + i`` (logit ``lo``): greedy decoding loops unless the first choice is pushed below the second."""

    shift_logits = False
    supports_kv_context = False

    def __init__(self, prompt_length: int, gen_length: int, hi: float = 10.0, lo: float = 8.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=V, eos_token_id=EOS)
        self.mask_token_id = MASK
        self.table = torch.zeros(prompt_length + gen_length, V)
        for i in range(gen_length):
            self.table[prompt_length + i, 10 + i % 2] = hi - 0.01 * i   # confidences fall left to right
            self.table[prompt_length + i, 20 + i] = lo

    def hidden_states(self, ids, attention_mask=None, position_ids=None):
        return torch.arange(ids.shape[1]).expand_as(ids)[..., None].float()

    def head(self, h):
        return self.table[h[..., 0].long()]


def run(guard=None, **kw):
    m = LoopingModel(prompt_length=2, gen_length=16)
    return generate(m, torch.tensor([[1, 2], [3, 4]]), gen_length=16, block_length=16, steps=16, on_commit=guard,
                    **kw)


def test_without_guard_the_model_loops() -> None:
    out = run()
    assert out.completion_ids[0].tolist() == [10, 11] * 8
    assert all(r.has_loop for r in detect_loops(out.completion_ids, **DETECT))


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_guard_breaks_the_loop_and_reports_it(threshold) -> None:
    guard = LoopGuard(stop_ids=[EOS], penalty=5.0, **DETECT)
    out = run(guard, threshold=threshold)
    reports = detect_loops(out.completion_ids, **DETECT)
    assert not any(r.has_loop for r in reports)
    assert guard.stats["rows"] == 2 and guard.stats["remasked"] >= 2
    # the rejected loop token was replaced by the position's second choice
    row = out.completion_ids[0].tolist()
    assert any(tok == 20 + i for i, tok in enumerate(row))
    assert (out.commit_step >= 0).all()  # every position decoded


def test_guard_without_penalty_only_remasks() -> None:
    # λ = 0: the same token wins again, so the guard gives up after max_remasks and the loop stays
    guard = LoopGuard(stop_ids=[EOS], penalty=0.0, max_remasks=1, **DETECT)
    out = run(guard)
    assert out.completion_ids[0].tolist() == [10, 11] * 8
    assert guard.stats["remasked"] >= 1


def test_remask_penalty_steers_the_position_away() -> None:
    def hook(state):
        if state.step == 0:
            return Remask(state.committed.clone(), penalty=100.0)
        return None

    out = run(hook)
    first = (out.commit_step[0] >= 0).nonzero()  # sanity: all decoded
    assert first.numel() == 16
    # position 0 was committed at step 0 with token 10, remasked with λ=100: its second choice wins
    assert out.completion_ids[0, 0].item() == 20

    def negative(state):
        return Remask(state.committed.clone(), penalty=-1.0)

    with pytest.raises(SamplingConfigError, match="penalty"):
        run(negative)


def test_loop_guard_config_validation() -> None:
    assert LoopGuardConfig.from_dict({}).build([EOS]) is None
    assert isinstance(LoopGuardConfig.from_dict({"enabled": True}).build([EOS]), LoopGuard)
    for bad, match in [({"penalty": -1}, "penalty"), ({"max_remasks": 0}, "max_remasks"),
                       ({"detection": {"p_max": 0}}, "p_max"), ({"detection": {"nope": 1}}, "nope"),
                       ({"enabled": "yes"}, "enabled"), ({"strength": 1}, "strength"),
                       ({"detection": {"copy_gap": -1}}, "copy_gap"), ({"detection": {"copy_min_span": 1}},
                                                                        "copy_min_span")]:
        with pytest.raises(LoopGuardConfigError, match=match):
            LoopGuardConfig.from_dict(bad, "eval.loop_guard")
    guard = LoopGuardConfig.from_dict({"enabled": True, "detection": {"copy_min_span": None}}).build([EOS])
    assert guard.detection == {"copy_min_span": None}


def test_guard_remasks_the_third_copy_of_a_long_block() -> None:
    # a 40-token block (longer than p_max = 32) decoded twice, then a third copy committed in this step
    P, block = 2, list(range(100, 140))
    seq = torch.tensor([[1, 2, *block, 3, *block, 4, *block]])
    committed = torch.zeros(1, seq.shape[1] - P, dtype=torch.bool)
    committed[0, 82:] = True  # the third copy
    state = SimpleNamespace(sequences=seq, prompt_length=P, committed=committed, mask_id=MASK)
    remask = LoopGuard(stop_ids=[EOS])(state)
    assert remask is not None and bool(remask.positions[0, 82:].all()) and not bool(remask.positions[0, :82].any())
    assert LoopGuard(stop_ids=[EOS], copy_min_span=None)(state) is None  # the periodic rule alone misses it


def test_recipe_rejects_bad_loop_guard(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: builtin:quickstart-base}\ndata: {task: arithmetic}\nstages: [sft]\n"
                    "eval: {loop_guard: {enabled: true, penalty: -2}}\n")
    with pytest.raises(ConfigError, match=r"eval\.loop_guard\.penalty"):
        load_config(path)
    path.write_text("model: {path: builtin:quickstart-base}\ndata: {task: arithmetic}\nstages: [grpo]\n"
                    "grpo: {loop_guard: {enabled: true, max_remasks: 0}}\n")
    with pytest.raises(ConfigError, match=r"grpo\.loop_guard\.max_remasks"):
        load_config(path)

"""align.sampling.generate: exactness against the reference, schedules, threshold, caches, EOS, hooks."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" runs in the interpreter here

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from align.models import LLaDAModelLM
from align.sampling import SamplingConfigError, generate
from align.sampling.forward import BlockForward
from align.sampling.reference import get_num_transfer_tokens, reference_generate

V = 64
MASK, EOS, EOT = V - 1, V - 2, V - 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(make_tiny_llada) -> LLaDAModelLM:
    return make_tiny_llada(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, init_std=0.4)


@pytest.fixture(scope="module")
def ragged() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 6, 3 and 5, left padded with EOS."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V - 3, (3, 6), generator=g)
    att = torch.ones(3, 6, dtype=torch.long)
    att[1, :3] = 0
    att[2, :1] = 0
    ids[att == 0] = EOS
    return ids, att


def ref(model, ids, att, **kw):
    return reference_generate(model, ids, att, mask_id=MASK, eos_token_id=EOS, eot_token_id=EOT, **kw)


def check_bookkeeping(out, block_length: int) -> None:
    """Every generated position committed exactly once, at a step in [0, nfe), blocks in order."""
    cs = out.commit_step
    assert (cs >= 0).all() and (cs < out.nfe).all()
    assert not (out.completion_ids == MASK).any()
    blocks = cs.view(cs.shape[0], -1, block_length)  # EOS filling may close several blocks in one step
    assert (blocks[:, 1:].min(dim=2).values >= blocks[:, :-1].max(dim=2).values).all()


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize(("gen_length", "block_length", "steps"), [(16, 16, 16), (16, 8, 4), (12, 4, 12), (8, 8, 3),
                                                                   (8, 4, 16)])
def test_exact_mode_matches_reference(model, ragged, gen_length, block_length, steps) -> None:
    ids, att = ragged
    kw = dict(gen_length=gen_length, block_length=block_length, steps=steps)
    out = generate(model, ids, attention_mask=att, **kw)
    assert torch.equal(out.sequences, ref(model, ids, att, **kw))
    assert out.nfe == min(steps, gen_length)  # steps that would commit nothing are skipped
    check_bookkeeping(out, block_length)


def test_schedule_counts_match_reference(model, ragged) -> None:
    ids, att = ragged
    out = generate(model, ids, attention_mask=att, gen_length=12, block_length=6, steps=8)
    per_block = 4
    expected = get_num_transfer_tokens(torch.ones(1, 6, dtype=torch.bool), per_block)[0]  # [2, 2, 1, 1]
    for s in range(out.nfe):
        counts = (out.commit_step == s).sum(dim=1)
        assert (counts == expected[s % per_block]).all()


def test_unpadded_batch_and_cfg_match_reference(model, ragged) -> None:
    ids, att = ragged
    kw = dict(gen_length=8, block_length=4, steps=8, cfg_scale=1.5)
    out = generate(model, ids, attention_mask=att, **kw)
    assert torch.equal(out.sequences, ref(model, ids, att, **kw))
    assert out.nfe == 8  # conditional and unconditional rows share one call per step
    unguided = generate(model, ids, attention_mask=att, **{**kw, "cfg_scale": 0.0})
    assert not torch.equal(out.sequences, unguided.sequences)
    ids2 = ids[:1]
    assert torch.equal(generate(model, ids2, **kw).sequences, ref(model, ids2, None, **kw))


def test_triton_backend_matches_torch_backend(model, ragged) -> None:
    ids, att = ragged
    kw = dict(gen_length=8, block_length=4, steps=4, remasking="margin")
    a = generate(model, ids, attention_mask=att, backend="torch", **kw)
    b = generate(model, ids, attention_mask=att, backend="triton", **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)


def test_left_padding_does_not_change_a_row(model, ragged) -> None:
    ids, att = ragged
    kw = dict(gen_length=8, block_length=8, steps=8)
    batched = generate(model, ids, attention_mask=att, **kw).completion_ids[1]
    alone = generate(model, ids[1:2, 3:], **kw).completion_ids[0]
    assert torch.equal(batched, alone)


# ------------------------------------------------------------------ remasking scores
def first_step_scores(model, ids, att, gen_length, block_length, kind):
    x = torch.cat([ids, torch.full((ids.shape[0], gen_length), MASK)], dim=1)
    a = torch.cat([att, torch.ones(ids.shape[0], gen_length, dtype=att.dtype)], dim=1)
    p = torch.softmax(model(x, attention_mask=a).logits[:, ids.shape[1]: ids.shape[1] + block_length], dim=-1)
    if kind == "low_confidence":
        return p.max(-1).values
    if kind == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return (p * p.log()).sum(-1)


@pytest.mark.parametrize("kind", ["low_confidence", "margin", "entropy"])
def test_first_commit_is_the_best_scored_position(model, ragged, kind) -> None:
    ids, att = ragged
    out = generate(model, ids, attention_mask=att, gen_length=8, block_length=4, steps=8, remasking=kind)
    scores = first_step_scores(model, ids, att, 8, 4, kind)
    first = (out.commit_step[:, :4] == 0).int().argmax(dim=1)
    assert torch.equal(first, scores.argmax(dim=1))
    check_bookkeeping(out, 4)


def test_random_remasking_is_seeded(model, ragged) -> None:
    ids, att = ragged
    kw = dict(attention_mask=att, gen_length=8, block_length=8, steps=8, remasking="random")
    orders = [generate(model, ids, generator=torch.Generator().manual_seed(s), **kw).commit_step for s in (0, 0, 1)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    conf_order = generate(model, ids, attention_mask=att, gen_length=8, block_length=8, steps=8).commit_step
    assert not torch.equal(orders[0], conf_order)


# ------------------------------------------------------------------ temperature, samples, reproducibility
def test_sampling_is_reproducible_and_num_generations_repeats_rows(model, ragged) -> None:
    ids, att = ragged
    kw = dict(gen_length=8, block_length=4, steps=8, temperature=1.0)
    a = generate(model, ids, attention_mask=att, num_generations=2, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, ids.repeat_interleave(2, 0), attention_mask=att.repeat_interleave(2, 0),
                 generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, ids, attention_mask=att, num_generations=2, generator=torch.Generator().manual_seed(1), **kw)
    assert a.sequences.shape == (6, 14)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])  # samples of one prompt differ
    greedy = generate(model, ids, attention_mask=att, num_generations=3, gen_length=8, block_length=4, steps=8)
    assert torch.equal(greedy.sequences[0], greedy.sequences[2])
    assert generate(model, ids, attention_mask=att, **kw).sequences.shape == (3, 14)  # generator=None works


# ------------------------------------------------------------------ threshold
def test_threshold_extremes(model, ragged) -> None:
    ids, att = ragged
    kw = dict(attention_mask=att, gen_length=12, block_length=4)
    never = generate(model, ids, steps=3, threshold=1.0, **kw)  # no p exceeds 1: one token per step
    assert never.nfe == 12
    assert torch.equal(never.sequences, generate(model, ids, steps=12, **kw).sequences)
    always = generate(model, ids, steps=3, threshold=-1.0, **kw)  # everything passes: one step per block
    assert always.nfe == 3
    assert torch.equal(always.sequences, generate(model, ids, steps=3, **kw).sequences)
    check_bookkeeping(always, 4)


# ------------------------------------------------------------------ caches
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg", [False, True])
def test_cached_step_with_fresh_cache_equals_exact_forward(model, ragged, cache, cfg) -> None:
    ids, att = ragged
    x = torch.cat([ids, torch.randint(0, V - 3, (3, 12), generator=torch.Generator().manual_seed(1))], dim=1)
    x[:, 10:] = MASK
    a = torch.cat([att, torch.ones(3, 12, dtype=att.dtype)], dim=1)
    rows = torch.arange(3)
    exact = BlockForward(model, None, a, 6, MASK, cfg=cfg)(x, 10, 14, refresh=True, rows=rows)
    fwd = BlockForward(model, cache, a, 6, MASK, cfg=cfg)
    torch.testing.assert_close(fwd(x, 10, 14, refresh=True, rows=rows), exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fwd(x, 10, 14, refresh=False, rows=rows), exact, rtol=1e-4, atol=1e-5)
    sub = torch.tensor([0, 2])  # a subset of the cached rows
    sub_rows = torch.cat([sub, sub + 3]) if cfg else sub
    torch.testing.assert_close(fwd(x, 10, 14, refresh=False, rows=sub), exact[sub_rows], rtol=1e-4, atol=1e-5)


class CountingModel(nn.Module):
    """Wraps a model and records the query length of every network call."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.config, self.lengths = base, base.config, []
        self.mask_token_id, self.head = base.mask_token_id, base.head

    def hidden_states(self, ids, *args, **kwargs):
        self.lengths.append(ids.shape[1])
        return self.base.hidden_states(ids, *args, **kwargs)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_modes(model, ragged, cache) -> None:
    ids, att = ragged
    kw = dict(attention_mask=att, gen_length=12, block_length=4)
    counting = CountingModel(model)
    out = generate(counting, ids, steps=12, cache=cache, **kw)
    check_bookkeeping(out, 4)
    assert out.nfe == 12
    T = 6 + 12
    queried = [T - bs if cache == "prefix" else 4 for bs in (6, 10, 14)]  # after each block's full pass
    assert counting.lengths == [n for q in queried for n in (T, q, q, q)]
    # one step per block uses only fresh full passes: identical to exact mode and the reference
    one_step = generate(model, ids, steps=3, cache=cache, **kw)
    assert torch.equal(one_step.sequences, ref(model, ids, att, steps=3, gen_length=12, block_length=4))
    both = generate(model, ids, steps=12, cache=cache, threshold=0.5, cfg_scale=1.0, **kw)
    check_bookkeeping(both, 4)


class ShiftedModel(CountingModel):
    """Dream-style view of a model: the hidden state at i is the base model's at i + 1."""

    shift_logits = True

    def hidden_states(self, ids, *args, return_kv=False, **kwargs):
        out = self.base.hidden_states(ids, *args, return_kv=return_kv, **kwargs)
        h = out[0] if return_kv else out
        h = torch.cat([h[:, 1:], h[:, :1]], dim=1)
        return (h, out[1]) if return_kv else h


@pytest.mark.parametrize(("cache", "steps"), [(None, 8), ("prefix", 2), ("dual", 2)])
def test_shifted_logit_models_read_one_position_left(model, ragged, cache, steps) -> None:
    ids, att = ragged
    # with caches, one step per block (fresh full passes only) keeps the comparison exact
    kw = dict(attention_mask=att, gen_length=8, block_length=4, steps=steps, cache=cache)
    assert torch.equal(generate(ShiftedModel(model), ids, **kw).sequences, generate(model, ids, **kw).sequences)


# ------------------------------------------------------------------ EOS handling, early exit, hooks
class ScriptedModel(nn.Module):
    """A denoiser with known logits: row ``b`` (keyed by its first prompt token) wants ``script[b][i]`` at
    generated position ``i`` with logit ``strength[i]`` (others 0), so confidences fall left to right."""

    shift_logits = False
    supports_kv_context = False

    def __init__(self, scripts: dict[int, list[int]], prompt_length: int, strength=None) -> None:
        super().__init__()
        L = len(next(iter(scripts.values())))
        self.config = SimpleNamespace(vocab_size=V, eos_token_id=EOS)
        self.mask_token_id = MASK
        strength = strength if strength is not None else [10.0 - 0.1 * i for i in range(L)]
        self.table = torch.zeros(V, prompt_length + L, V)
        for key, script in scripts.items():
            for i, tok in enumerate(script):
                self.table[key, prompt_length + i, tok] = strength[i]
        self.batch_sizes: list[int] = []

    def hidden_states(self, ids, attention_mask=None, position_ids=None):
        self.batch_sizes.append(ids.shape[0])
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return torch.stack([ids[:, :1].expand_as(ids), pos], dim=-1).float()

    def head(self, h):
        return self.table[h[..., 0].long(), h[..., 1].long()]

    def forward(self, x, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.hidden_states(x)))


def script(eos_at: int, length: int = 16, stop: int = EOS) -> list[int]:
    return [stop if i == eos_at else 10 + i for i in range(length)]


@pytest.fixture()
def scripted() -> tuple[ScriptedModel, torch.Tensor]:
    m = ScriptedModel({1: script(3), 2: script(9), 3: script(5, stop=EOT)}, prompt_length=2)
    return m, torch.tensor([[1, 7], [2, 7], [3, 7]])


def test_eos_stop_policy_fills_and_exits_early(scripted) -> None:
    m, ids = scripted
    kw = dict(gen_length=16, block_length=8, steps=16, eot_token_id=EOT)
    out = generate(m, ids, eos_policy="stop", **kw)
    assert out.nfe == 10  # the last row finishes at step 9 (its EOS at position 9)
    assert m.batch_sizes == [3, 3, 3, 3, 2, 2, 1, 1, 1, 1]  # finished rows leave the batch
    assert out.completion_lengths.tolist() == [3, 9, 5] and out.finished.all()
    gen = out.completion_ids
    assert (gen[0, 3:] == EOS).all() and (gen[1, 9:] == EOS).all()
    assert gen[2, 5] == EOT and (gen[2, 6:] == EOS).all()
    assert gen[0, :3].tolist() == [10, 11, 12]
    assert (out.commit_step[0, 4:] == 3).all() and out.commit_step[0, :4].tolist() == [0, 1, 2, 3]
    check_bookkeeping(out, 8)

    full = generate(m, ids, eos_policy="none", **kw)
    assert full.nfe == 16 and full.completion_ids[0, 4] == 14  # decoded past EOS, as the reference does
    assert full.completion_lengths.tolist() == [3, 9, 5]
    assert torch.equal(full.sequences, reference_generate(m, ids, None, steps=16, gen_length=16, block_length=8,
                                                          mask_id=MASK, eos_token_id=EOS, eot_token_id=EOT))


def test_logits_eos_inf_never_commits_eos(scripted) -> None:
    m, ids = scripted
    kw = dict(gen_length=16, block_length=8, steps=16, logits_eos_inf=True)
    out = generate(m, ids, **kw)
    assert not (out.completion_ids == EOS).any() and out.completion_ids[0, 3] == 0
    assert torch.equal(out.sequences, reference_generate(m, ids, None, steps=16, gen_length=16, block_length=8,
                                                         mask_id=MASK, eos_token_id=EOS, logits_eos_inf=True))


@pytest.mark.parametrize("temperature", [0.0, 0.01])
def test_confidence_eos_eot_inf_quirk(scripted, temperature) -> None:
    m, ids = scripted
    kw = dict(gen_length=16, block_length=8, steps=16, temperature=temperature, confidence_eos_eot_inf=True)
    out = generate(m, ids, eot_token_id=EOT, generator=torch.Generator().manual_seed(0), **kw)
    # EOS/EOT positions get zero confidence, so they are committed last in their block ...
    assert out.commit_step[2, 5] == 7  # EOT: at every temperature
    eos_step = out.commit_step[0, 3].item()
    assert eos_step == (7 if temperature == 0 else 3)  # ... but EOS only at T = 0 (the reference's quirk)
    expected = reference_generate(m, ids, None, steps=16, gen_length=16, block_length=8, mask_id=MASK,
                                  eos_token_id=EOS, eot_token_id=EOT, temperature=temperature,
                                  confidence_eos_eot_inf=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, expected)


def test_mask_token_is_never_committed() -> None:
    m = ScriptedModel({1: [MASK] * 8}, prompt_length=2)  # the model "predicts" the mask token everywhere
    out = generate(m, torch.tensor([[1, 7]]), gen_length=8, block_length=4, steps=8)
    assert not (out.completion_ids == MASK).any() and out.nfe == 8


def test_threshold_commits_confident_positions_together() -> None:
    strength = [10.0] * 4 + [1.0] * 4  # p ≈ 0.997 for the first four positions, ≈ 0.04 after
    m = ScriptedModel({1: script(99, 8)}, prompt_length=2, strength=strength)
    out = generate(m, torch.tensor([[1, 7]]), gen_length=8, block_length=8, steps=8, threshold=0.9)
    assert out.commit_step[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4] and out.nfe == 5


def test_on_commit_hook_can_remask_the_current_block(model, ragged) -> None:
    ids, att = ragged
    seen = []

    def guard(state):
        seen.append((state.step, state.block, int(state.committed.sum())))
        if state.step == 0:
            return state.committed.clone()  # undo everything committed in the first step
        return None

    out = generate(model, ids, attention_mask=att, gen_length=8, block_length=4, steps=8, on_commit=guard)
    assert [s[0] for s in seen] == list(range(8)) and seen[0][2] == 3
    assert (out.commit_step != 0).all()  # step 0's commits were undone and redone later
    check_bookkeeping(out, 4)

    def bad(state):
        remask = torch.zeros_like(state.committed)
        remask[:, -1] = True
        return remask

    with pytest.raises(SamplingConfigError, match="outside the current block"):
        generate(model, ids, attention_mask=att, gen_length=8, block_length=4, steps=8, on_commit=bad)


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gen_length": 10, "block_length": 4}, "multiple of block_length"),
        ({"steps": 3, "gen_length": 8, "block_length": 4}, "multiple of the number of blocks"),
        ({"remasking": "lowest"}, "remasking"),
        ({"cache": "full"}, "cache"),
        ({"temperature": -0.5}, "temperature"),
        ({"eos_policy": "truncate"}, "eos_policy"),
        ({"num_generations": 0}, "num_generations"),
        ({"mask_id": V + 5}, "mask_id"),
        ({"attention_mask": torch.tensor([[1, 1, 0]])}, "left padded"),
    ],
)
def test_bad_arguments_raise(model, kwargs, match) -> None:
    base = dict(gen_length=8, block_length=4, steps=4)
    base.update(kwargs)
    with pytest.raises(SamplingConfigError, match=match):
        generate(model, torch.tensor([[1, 2, 3]]), **base)


def test_cache_needs_kv_context_support(scripted) -> None:
    m, ids = scripted
    with pytest.raises(SamplingConfigError, match="KV-context"):
        generate(m, ids, gen_length=16, block_length=8, steps=16, cache="prefix")

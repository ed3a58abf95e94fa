"""SPG's block-wise mask plans (``estimator: block``, align/likelihood/blocks.py; docs/concepts.md §2.8)."""

import itertools
import math

import pytest
import torch

from align.likelihood import (
    InvalidSettingError,
    check_estimator_args,
    draw_block_masks,
    draw_masks,
    score_plan,
)


def _batch():
    """Two sequences after a 3-token prompt: responses of 7 and 4 tokens (the second right padded)."""
    ids = torch.arange(2 * 10).view(2, 10) % 7 + 1
    resp = torch.zeros(2, 10, dtype=torch.bool)
    resp[0, 3:] = True
    resp[1, 3:7] = True
    att = torch.ones(2, 10, dtype=torch.bool)
    att[1, 7:] = False
    return ids, resp, att


def _response_blocks(resp_row, c):
    """Block index of each response position (None off the response), by plain counting."""
    out, rank = [], 0
    for is_resp in resp_row.tolist():
        out.append(rank // c if is_resp else None)
        rank += bool(is_resp)
    return out


def test_earlier_blocks_clean_later_blocks_masked_and_the_chosen_block_partly():
    ids, resp, att = _batch()
    c, n = 2, 3
    plan = draw_block_masks(ids, resp, attention_mask=att, generator=7, block_length=c, num_samples=n,
                            p_mask_prompt=0.0)
    assert plan.estimator == "block" and plan.num_rows == 2 * n
    for r in range(plan.num_rows):
        b = int(plan.row_seq[r])
        blocks = _response_blocks(resp[b], c)
        masked = plan.masked[r].tolist()
        assert not any(m for m, blk in zip(masked, blocks) if blk is None)   # prompt (p = 0) and padding clean
        chosen = min(blk for m, blk in zip(masked, blocks) if m)
        in_block = [m for m, blk in zip(masked, blocks) if blk == chosen]
        assert 1 <= sum(in_block) <= len(in_block)                           # l ∈ {1 … c_k}
        assert all(m for m, blk in zip(masked, blocks) if blk is not None and blk > chosen)
        assert not any(m for m, blk in zip(masked, blocks) if blk is not None and blk < chosen)


def test_rows_of_a_sequence_take_different_blocks_and_cycle_when_there_are_more_rows():
    ids, resp, att = _batch()                 # 7 tokens -> 4 blocks of 2; 4 tokens -> 2 blocks
    for seed in range(5):
        plan = draw_block_masks(ids, resp, attention_mask=att, generator=seed, block_length=2, num_samples=4,
                                p_mask_prompt=0.0)
        first = []
        for r in range(plan.num_rows):
            blocks = _response_blocks(resp[int(plan.row_seq[r])], 2)
            first.append(min(blk for m, blk in zip(plan.masked[r].tolist(), blocks) if m))
        assert sorted(first[:4]) == [0, 1, 2, 3]          # four rows, four blocks: each block once
        assert first[4:6] != first[4:5] * 2 and first[4:6] == first[6:8]   # two blocks, visited in the same order twice


def test_masked_mean_coefficients_are_length_over_rows_times_masked_count():
    ids, resp, att = _batch()
    n = 2
    plan = draw_block_masks(ids, resp, attention_mask=att, generator=3, block_length=3, num_samples=n)
    for r in range(plan.num_rows):
        b = int(plan.row_seq[r])
        L = int(resp[b].sum())
        on_y = plan.masked[r] & resp[b]
        m = int(on_y.sum())
        assert torch.allclose(plan.coef[r][on_y], torch.full((m,), L / (n * m)))   # SPG: L · mean, / n
        assert plan.coef[r][~on_y].abs().sum() == 0        # prompt noise is context, never scored
        assert math.isclose(plan.t[r].item(), m / L, rel_tol=1e-6)


def test_the_count_in_the_chosen_block_is_uniform_on_its_range():
    ids = torch.zeros(1, 9, dtype=torch.long)
    resp = torch.ones(1, 9, dtype=torch.bool)
    resp[0, 0] = False                                      # one prompt token, 8 response tokens: blocks of 4
    many = 8000
    for t_min, t_max, support in ((0.0, 1.0, [1, 2, 3, 4]), (0.5, 1.0, [2, 3, 4]), (0.0, 0.5, [1, 2])):
        plan = draw_block_masks(ids.repeat(many, 1), resp.repeat(many, 1), generator=11, block_length=4,
                                num_samples=1, t_min=t_min, t_max=t_max, p_mask_prompt=0.0)
        first_block = plan.masked[:, 1:5]
        chose_first = first_block.any(1)                 # earlier blocks are clean: only when block 0 is chosen
        assert plan.masked[chose_first, 5:].all()         # and then the later block is fully masked
        counts = first_block[chose_first].sum(1)
        freq = torch.bincount(counts, minlength=5).float() / counts.numel()
        assert sorted(set(counts.tolist())) == support
        for l in support:
            assert abs(freq[l].item() - 1 / len(support)) < 0.04, (t_min, t_max, freq)


def test_block_elbo_coefficients_are_unbiased_at_every_position():
    ids = torch.zeros(1, 6, dtype=torch.long)
    resp = torch.tensor([[False, True, True, True, True, True]])   # 5 tokens, blocks of 2: sizes 2, 2, 1
    many = 20000
    plan = draw_block_masks(ids.repeat(many, 1), resp.repeat(many, 1), generator=5, block_length=2,
                            num_samples=2, weighting="block_elbo", p_mask_prompt=0.0)
    per_position = plan.coef.view(many, 2, 6).sum(1)             # Σ_r coef[r, i] of each sequence
    mean = per_position.mean(0)
    assert mean[0] == 0
    assert torch.allclose(mean[1:], torch.ones(5), atol=0.03)     # E[Σ_r coef[r, i]] = 1


def test_block_elbo_matches_the_blockwise_elbo_by_enumeration():
    # a toy score that depends on the context: v(i, z) = −(1 + 0.1·i + 0.2·(masked response tokens of z))
    L, c = 5, 2
    blocks = [list(range(k, min(k + c, L))) for k in range(0, L, c)]
    K = len(blocks)

    def v(i, n_masked):
        return -(1 + 0.1 * i + 0.2 * n_masked)

    exact = 0.0     # Σ_k (1/K) Σ_l (1/c_k) (1/C(c_k, l)) Σ_{|S| = l} (K·c_k/l) Σ_{i ∈ S} v(i, z)
    for k, blk in enumerate(blocks):
        later = sum(len(b) for b in blocks[k + 1:])
        for l in range(1, len(blk) + 1):
            subsets = list(itertools.combinations(blk, l))
            for S in subsets:
                exact += (1 / K) * (1 / len(blk)) * (1 / len(subsets)) * (K * len(blk) / l) * \
                    sum(v(i, l + later) for i in S)
    many = 20000
    ids = torch.zeros(many, L + 1, dtype=torch.long)
    resp = torch.ones(many, L + 1, dtype=torch.bool)
    resp[:, 0] = False
    plan = draw_block_masks(ids, resp, generator=9, block_length=c, num_samples=2, weighting="block_elbo",
                            p_mask_prompt=0.0)
    n_masked = (plan.masked & resp.repeat_interleave(2, 0)).sum(1, keepdim=True).double()
    i = torch.arange(-1, L).double()[None]                       # response index of each position
    values = -(1 + 0.1 * i + 0.2 * n_masked)
    estimate = (plan.coef.double() * values).view(many, 2, L + 1).sum((1, 2))
    se = estimate.std().item() / math.sqrt(many)
    assert abs(estimate.mean().item() - exact) < 4 * se + 1e-9, (estimate.mean().item(), exact, se)


def test_prompt_noise_masks_only_real_prompt_tokens():
    ids, resp, att = _batch()
    plan = draw_block_masks(ids.repeat(500, 1), resp.repeat(500, 1), attention_mask=att.repeat(500, 1),
                            generator=2, block_length=2, num_samples=1, p_mask_prompt=0.5)
    prompt = (att & ~resp).repeat(500, 1)
    assert not (plan.masked & ~att.repeat(500, 1)).any()                  # padding is never masked
    share = plan.masked[prompt].float().mean().item()
    assert abs(share - 0.5) < 0.05


def test_same_generator_same_plan_and_draw_masks_dispatches():
    ids, resp, att = _batch()
    a = draw_block_masks(ids, resp, attention_mask=att, generator=4, block_length=3)
    g = torch.Generator().manual_seed(4)
    b = draw_masks(ids, resp, estimator="block", attention_mask=att, generator=g, block_length=3)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.coef, b.coef)
    others = [draw_block_masks(ids, resp, attention_mask=att, generator=s, block_length=3).masked for s in range(5, 9)]
    assert any(not torch.equal(a.masked, o) for o in others)


def test_scored_block_plan_is_differentiable(make_tiny_llada):
    model = make_tiny_llada(vocab_size=32, init_std=0.2)
    ids, resp, att = _batch()
    plan = draw_block_masks(ids, resp, attention_mask=att, generator=1, block_length=2)
    est = score_plan(model, plan)
    assert torch.isfinite(est.seq_logp).all() and (est.seq_logp < 0).all()
    est.seq_logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("args,match", [
    ({"block_length": 0}, "block_length"),
    ({"num_samples": 0}, "num_samples"),
    ({"t_min": 0.6, "t_max": 0.4}, "t_min"),
    ({"p_mask_prompt": 1.0}, "p_mask_prompt"),
    ({"weighting": "mean"}, "weighting"),
    ({"views": 2}, "unknown setting"),
])
def test_bad_settings_are_rejected(args, match):
    with pytest.raises(InvalidSettingError, match=match):
        check_estimator_args("block", args)
    check_estimator_args("block", {"block_length": 4, "num_samples": 3, "weighting": "block_elbo"})

"""Forward process and SFT loss (algorithms.md section 1)."""

import math

import pytest
import torch

from align.masking import MaskedBatch, MaskingError, forward_process, sample_p_mask, sft_loss


def test_masks_only_in_response_and_reproducible():
    ids = torch.arange(2 * 40).reshape(2, 40) + 10
    resp = torch.zeros(2, 40, dtype=torch.bool)
    resp[0, 15:] = True
    resp[1, 30:] = True
    a = forward_process(ids, resp, 3, generator=torch.Generator().manual_seed(1))
    b = forward_process(ids, resp, 3, generator=torch.Generator().manual_seed(1))
    c = forward_process(ids, resp, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.noisy_ids, b.noisy_ids)
    assert not torch.equal(a.masked, c.masked)
    assert not (a.masked & ~resp).any()
    assert torch.equal(a.noisy_ids[a.masked], torch.full((int(a.masked.sum()),), 3))
    assert torch.equal(a.noisy_ids[~a.masked], ids[~a.masked])


def test_mask_rate_follows_p_mask():
    ids = torch.zeros(4000, 64, dtype=torch.long)
    resp = torch.ones_like(ids, dtype=torch.bool)
    b = forward_process(ids, resp, 1, generator=torch.Generator().manual_seed(0), t_min=0.3, t_max=0.3 + 1e-6)
    assert torch.allclose(b.p_mask, torch.full((4000,), (1 - 1e-3) * 0.3 + 1e-3), atol=1e-5)
    assert abs(b.masked.float().mean().item() - b.p_mask[0].item()) < 0.005


def test_p_mask_range_and_errors():
    p = sample_p_mask(10000, generator=torch.Generator().manual_seed(0), eps=0.1)
    assert p.min() >= 0.1 and p.max() <= 1.0
    with pytest.raises(MaskingError):
        sample_p_mask(3, generator=torch.Generator(), t_min=0.5, t_max=0.5)
    with pytest.raises(MaskingError):
        forward_process(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool), 1,
                        generator=torch.Generator())


def _fixed_batch():
    # Row 0: response at positions 1..3 (L_0 = 3), masked at 1 and 3, p_mask 0.5.
    # Row 1: response at positions 2..3 (L_1 = 2), masked at 2, p_mask 0.25.
    masked = torch.tensor([[False, True, False, True], [False, False, True, False]])
    resp = torch.tensor([[False, True, True, True], [False, False, True, True]])
    batch = MaskedBatch(noisy_ids=torch.zeros(2, 4, dtype=torch.long), masked=masked,
                        p_mask=torch.tensor([0.5, 0.25]))
    nll = torch.tensor([1.0, 2.0, 3.0])  # row-major: (0,1), (0,3), (1,2)
    return nll, batch, resp


def test_sft_loss_sequence_by_hand():
    nll, batch, resp = _fixed_batch()
    # (1/B) Σ_b (1/L_b) Σ nll / p_mask_b = ½[(1/3)(1/0.5 + 2/0.5) + (1/2)(3/0.25)] = ½[2 + 6] = 4
    assert math.isclose(sft_loss(nll, batch, resp, "sequence").item(), 4.0, rel_tol=1e-6)


def test_sft_loss_token_and_masked_by_hand():
    nll, batch, resp = _fixed_batch()
    # token: (2 + 4 + 12) / (3 + 2) = 3.6 ; masked: (1 + 2 + 3) / 3 = 2
    assert math.isclose(sft_loss(nll, batch, resp, "token").item(), 3.6, rel_tol=1e-6)
    assert math.isclose(sft_loss(nll, batch, resp, "masked").item(), 2.0, rel_tol=1e-6)
    with pytest.raises(MaskingError):
        sft_loss(nll, batch, resp, "bogus")

"""Fused sampling step: Triton kernel (interpreter, fp32) against its torch twin, and sampling statistics."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this module

import pytest
import torch

from align.kernels import sampling_step as ss
from align.kernels.sampling_step import (
    TritonUnavailableError,
    sample_step,
    sample_step_torch,
    sample_step_triton,
)

NEG_INF = float("-inf")
ALPHA = 1e-3  # significance level of the distribution tests (fixed seeds: the outcome is deterministic)


pytestmark = pytest.mark.usefixtures("one_thread")


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value, ``P(χ²_{k−1} ≥ stat)`` via the regularised gamma."""
    n = counts.sum()
    expected = n * probs
    assert (expected >= 5).all(), "test design: every bin needs an expected count of at least 5"
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def binned(tokens: torch.Tensor, p: torch.Tensor, bins: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    return (torch.stack([counts[b].sum() for b in bins]), torch.stack([p[b].sum() for b in bins]))


def awkward_logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 4
    if v > 1:
        z[0, v // 2] = NEG_INF  # a -inf entry
    if v > 2:
        z[1, : v - 2] = NEG_INF  # mostly -inf
    if n > 2 and v > 3:
        z[2, 1] = z[2, 3] = z[2].max() + 1.0  # exact tie for the maximum: lowest index wins
    if n > 3:
        z[3] = 0.0  # uniform row: all tied
    return z


# ---------------------------------------------------------------- T = 0: kernel == twin
@pytest.mark.parametrize(
    ("v", "block_v", "block_n"),
    # vocab not a power of two, smaller and larger than the tile; row tiles that do not divide N
    [(7, 4, 1), (7, 32, 4), (33, 16, 2), (100, 32, 8), (130, 64, 1), (1, 2, 4), (2, 2, 1), (300, None, None)],
)
@pytest.mark.parametrize("confidence", ["prob", "margin", "entropy"])
def test_triton_equals_torch_at_t0(v: int, block_v: int | None, block_n: int | None, confidence: str) -> None:
    z = awkward_logits(5, v, seed=v)
    a = sample_step_torch(z, confidence=confidence)
    b = sample_step_triton(z, confidence=confidence, block_v=block_v, block_n=block_n)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(b.confidence, a.confidence, rtol=1e-5, atol=1e-6)


def test_twin_confidences_match_their_definitions() -> None:
    z = awkward_logits(6, 50, seed=3)
    p = torch.softmax(z, dim=-1)
    out = sample_step_torch(z, confidence="prob")
    assert torch.equal(out.tokens, z.argmax(-1))
    assert out.tokens[2] == 1 and out.tokens[3] == 0  # ties go to the lowest index
    torch.testing.assert_close(out.confidence, p.gather(-1, out.tokens[:, None]).squeeze(-1))
    top = p.topk(2, dim=-1).values
    torch.testing.assert_close(sample_step_torch(z, confidence="margin").confidence, top[:, 0] - top[:, 1])
    neg_entropy = torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(sample_step_torch(z, confidence="entropy").confidence, neg_entropy)
    assert torch.isfinite(sample_step_triton(z, confidence="entropy", block_v=16).confidence).all()


def test_leading_dims_and_low_precision_inputs() -> None:
    z = torch.randn(2, 3, 40)
    out = sample_step(z.to(torch.bfloat16), backend="torch")
    assert out.tokens.shape == (2, 3) and out.tokens.dtype == torch.long
    assert out.confidence.shape == (2, 3) and out.confidence.dtype == torch.float32
    assert torch.equal(out.tokens, z.to(torch.bfloat16).float().argmax(-1))
    tri = sample_step(z, backend="triton", temperature=0.0)
    assert torch.equal(tri.tokens, z.argmax(-1))


def test_sampled_confidence_is_probability_of_the_sampled_token() -> None:
    z = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(z, dim=-1)
    for out in (
        sample_step_torch(z, temperature=1.3, generator=torch.Generator().manual_seed(1)),
        sample_step_triton(z, temperature=1.3, seed=11, block_v=8, block_n=16),
    ):
        assert not torch.equal(out.tokens, z.argmax(-1))  # it does sample
        torch.testing.assert_close(out.confidence, p.gather(-1, out.tokens[:, None]).squeeze(-1))


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_excluded_token_is_never_chosen_but_counts_in_confidence(temperature: float) -> None:
    z = torch.randn(50, 12, generator=torch.Generator().manual_seed(4))
    z[:, 5] += 6.0  # the excluded column would win almost always
    p = torch.softmax(z, dim=-1)
    for out in (
        sample_step_torch(z, temperature=temperature, exclude_token=5, generator=torch.Generator().manual_seed(0)),
        sample_step_triton(z, temperature=temperature, exclude_token=5, seed=3, block_v=4, block_n=8),
    ):
        assert not (out.tokens == 5).any()
        torch.testing.assert_close(out.confidence, p.gather(-1, out.tokens[:, None]).squeeze(-1))
    if temperature == 0:
        expected = torch.where(torch.arange(12) == 5, float("-inf"), z).argmax(-1)
        assert torch.equal(sample_step_torch(z, exclude_token=5).tokens, expected)
        assert torch.equal(sample_step_triton(z, exclude_token=5, block_v=4).tokens, expected)


# ---------------------------------------------------------------- T > 0: distribution tests
# Logits with a low-probability tail and a −inf entry: at T = 0.8 the tokens 6 and 7 together have
# probability ~5.7e-5 (200k draws: ~11 expected), token 4 ~3.2e-4 and token 5 ~1.7e-4.
TAIL_LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.4, -4.0, -4.5, -5.5, -7.0, NEG_INF])
TAIL_T = 0.8


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_samples_follow_softmax_over_temperature(backend: str) -> None:
    n = 200_000
    z = TAIL_LOGITS.repeat(n, 1)
    if backend == "torch":
        out = sample_step_torch(z, temperature=TAIL_T, generator=torch.Generator().manual_seed(1234))
    else:  # fp32 interpreter; 2 column tiles per row, large row tiles to keep the interpreter quick
        out = sample_step_triton(z, temperature=TAIL_T, seed=2024, block_v=8, block_n=4096)
    p = torch.softmax(TAIL_LOGITS.double() / TAIL_T, dim=0)
    assert int((out.tokens == 8).sum()) == 0  # a −inf logit is never sampled
    bins = [[0], [1], [2], [3], [4], [5], [6, 7]]
    counts, probs = binned(out.tokens, p, bins)
    assert probs[-1] < 1e-4  # the tail bin is genuinely rare
    assert chi_square_pvalue(counts, probs) > ALPHA


def test_distribution_test_detects_a_wrong_temperature() -> None:
    """The chi-square check above has power: samples at T = 1 fail it against softmax(z / 0.8)."""
    n = 200_000
    out = sample_step_torch(TAIL_LOGITS.repeat(n, 1), temperature=1.0, generator=torch.Generator().manual_seed(7))
    p = torch.softmax(TAIL_LOGITS.double() / TAIL_T, dim=0)
    counts, probs = binned(out.tokens, p, [[0], [1], [2], [3], [4], [5], [6, 7]])
    assert chi_square_pvalue(counts, probs) < ALPHA


def test_noise_is_reproducible_and_seeded() -> None:
    z = torch.zeros(300, 6)
    a = sample_step_torch(z, temperature=1.0, generator=torch.Generator().manual_seed(5)).tokens
    b = sample_step_torch(z, temperature=1.0, generator=torch.Generator().manual_seed(5)).tokens
    c = sample_step_torch(z, temperature=1.0, generator=torch.Generator().manual_seed(6)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    zt = torch.zeros(40, 6)
    t1 = sample_step_triton(zt, temperature=1.0, seed=9).tokens
    t2 = sample_step_triton(zt, temperature=1.0, seed=9).tokens
    t3 = sample_step_triton(zt, temperature=1.0, generator=torch.Generator().manual_seed(9)).tokens
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)


# ---------------------------------------------------------------- dispatch and errors
def test_auto_backend_uses_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(ss, "sample_step_triton", fail)
    z = torch.randn(4, 10)
    assert torch.equal(sample_step(z, backend="auto").tokens, z.argmax(-1))


def test_explicit_triton_without_gpu_or_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TritonUnavailableError, match="backend='torch'"):
        sample_step(torch.randn(2, 5), backend="triton")
    monkeypatch.setattr(ss, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TritonUnavailableError, match="not installed"):
        sample_step(torch.randn(2, 5), backend="triton")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"temperature": -1.0}, ValueError),
        ({"confidence": "max"}, ValueError),
        ({"backend": "cuda"}, ValueError),
        ({"exclude_token": 5}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        sample_step(torch.randn(2, 5), **kwargs)
    with pytest.raises(TypeError):
        sample_step(torch.zeros(2, 5, dtype=torch.long))

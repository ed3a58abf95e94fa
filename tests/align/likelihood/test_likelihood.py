"""Tests of the sequence-likelihood estimators (align.likelihood) against exact enumeration."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from align.kernels.logprob import head_log_probs, linear_log_probs, selective_log_softmax
from align.likelihood import (
    EmptyResponseError,
    InvalidSettingError,
    ShapeMismatchError,
    UnknownEstimatorError,
    check_estimator_args,
    coupled,
    draw_coupled_masks,
    draw_elbo_masks,
    draw_masks,
    draw_one_step_masks,
    draw_trace_masks,
    elbo,
    exact_elbo,
    exact_masked_sums,
    join_prompt_completion,
    one_step,
    score_plan,
    trace,
)
from align.likelihood.exact import (
    coupled_expectation,
    elbo_from_masked_sums,
    elbo_mask_weight,
    quadrature_expectation,
)
from align.likelihood.masks import gauss_legendre_01
from align.models import LLaDAModelLM
from align.rng import make_generator

VOCAB = 32


@pytest.fixture(scope="module")
def model(make_tiny_llada) -> LLaDAModelLM:
    """Tiny LLaDA with a wide init so log-probabilities depend on the context (masks matter)."""
    return make_tiny_llada(vocab_size=VOCAB, init_std=0.2)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (n,), generator=torch.Generator().manual_seed(seed))


def _copies(prompt: torch.Tensor, response: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` copies of one (prompt, response) pair: input_ids and response_mask."""
    ids = torch.cat([prompt, response]).expand(B, -1).clone()
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, prompt.numel():] = True
    return ids, resp


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged batch: left-padded prompts (3, 2), responses (4, 6) right-padded with attention 0."""
    p0, p1, r0, r1 = _tokens(3, seed), _tokens(2, seed + 1), _tokens(4, seed + 2), _tokens(6, seed + 3)
    ids = torch.zeros(2, 9, dtype=torch.long)
    attn = torch.zeros(2, 9, dtype=torch.bool)
    resp = torch.zeros(2, 9, dtype=torch.bool)
    ids[0, 0:3], ids[0, 3:7] = p0, r0
    attn[0, 0:7], resp[0, 3:7] = True, True
    ids[1, 1:3], ids[1, 3:9] = p1, r1
    attn[1, 1:9], resp[1, 3:9] = True, True
    return ids, attn, resp


# ---------------------------------------------------------------- exact ELBO


def test_exact_weight_forms_agree():
    # t-integral B(k, L−k+1) and l-sampled (1/L)(1/C(L,k))(L/k) are the same weight; a constant log f = c
    # gives B = L·c, i.e. Σ_k C(L,k)·k·w_k = L
    for L in range(1, 12):
        ws = [elbo_mask_weight(k, L, "t") for k in range(L + 1)]
        for k in range(1, L + 1):
            assert ws[k] == pytest.approx(elbo_mask_weight(k, L, "l"), rel=1e-12)
        assert sum(math.comb(L, k) * k * ws[k] for k in range(L + 1)) == pytest.approx(L, rel=1e-12)


def test_exact_elbo_equals_t_integral(model):
    prompt, response = _tokens(3, 1), _tokens(5, 2)
    with torch.no_grad():
        S = exact_masked_sums(model, prompt, response).numpy()
        exact = exact_elbo(model, prompt, response).item()
    L = 5
    x, w = gauss_legendre_01(20)    # ∫_0^1 (1/t) Σ_k S_k t^k (1−t)^(L−k) dt, polynomial of degree L−1
    integral = sum(np.sum(w * S[k] * x ** (k - 1) * (1 - x) ** (L - k)) for k in range(1, L + 1))
    assert exact == pytest.approx(integral, rel=1e-9)
    one = exact_elbo(model, prompt, response[:1]).item()       # L = 1: B = log f(y_1 | x, M)
    with torch.no_grad():
        h = model.hidden_states(torch.cat([prompt, torch.tensor([model.mask_token_id])])[None])
        direct = torch.log_softmax(model.head(h[0, -1]), -1)[response[0]].item()
    assert one == pytest.approx(direct, abs=1e-5)


# ---------------------------------------------------------------- unbiasedness (z-tests)


def _z_check(values: torch.Tensor, target: float) -> None:
    v = values.double()
    se = v.std().item() / math.sqrt(v.numel())
    assert abs(v.mean().item() - target) < 4 * se + 1e-6, (v.mean().item(), target, se)


@pytest.mark.parametrize("sampler,copies", [("t", 4000), ("l_stratified", 1500)])
def test_elbo_sampler_is_unbiased(model, sampler, copies):
    prompt, response = _tokens(3, 3), _tokens(6, 4)
    with torch.no_grad():
        exact = exact_elbo(model, prompt, response).item()
        ids, resp = _copies(prompt, response, copies)
        est = elbo(model, ids, resp, generator=11, sampler=sampler, num_samples=4)
    _z_check(est.seq_logp, exact)


def test_quadrature_and_coupled_match_their_expectations(model):
    prompt, response = _tokens(3, 5), _tokens(6, 6)
    with torch.no_grad():
        S = exact_masked_sums(model, prompt, response)
        ids, resp = _copies(prompt, response, 1500)
        quad = elbo(model, ids, resp, generator=12, sampler="quadrature", num_samples=4, n_nodes=2)
        coup = coupled(model, ids, resp, generator=13)
        one = one_step(model, ids[:2], resp[:2], generator=14, p_mask_prompt=0.0)
    _z_check(quad.seq_logp, quadrature_expectation(S, n_nodes=2).item())
    _z_check(coup.seq_logp, coupled_expectation(S, 0.2, 0.8).item())
    # one_step without prompt noise is deterministic: the fully masked row, S_L
    assert torch.allclose(one.seq_logp.double(), S[-1].expand(2), atol=1e-4)


def test_ragged_batch_is_unbiased_per_sequence(model):
    ids, attn, resp = _batch()
    reps = 800
    ids_r, attn_r, resp_r = (x.repeat(reps, 1) for x in (ids, attn, resp))
    with torch.no_grad():
        est = elbo(model, ids_r, resp_r, attention_mask=attn_r, generator=21, sampler="l_stratified",
                   num_samples=2)
        for b in range(2):
            prompt = ids[b][attn[b] & ~resp[b]]
            exact = exact_elbo(model, prompt, ids[b][resp[b]]).item()
            _z_check(est.seq_logp[b::2], exact)
    assert est.token_logp[~resp_r].abs().max() == 0


# ---------------------------------------------------------------- shared masks, determinism


@pytest.mark.parametrize("estimator,settings", [("one_step", {}), ("coupled", {}),
                                                ("elbo", {"sampler": "t", "num_samples": 3}),
                                                ("elbo", {"sampler": "l_stratified", "num_samples": 3}),
                                                ("elbo", {"sampler": "quadrature", "num_samples": 3})])
def test_same_plan_gives_identical_values_and_unit_ratio(model, estimator, settings):
    ids, attn, resp = _batch()
    plan = draw_masks(ids, resp, estimator=estimator, generator=5, attention_mask=attn, **settings)
    cur = score_plan(model, plan)                      # with grad (current policy)
    with torch.no_grad():
        old = score_plan(model, plan)                  # no grad (old policy)
    assert torch.equal(cur.seq_logp.detach(), old.seq_logp)
    assert torch.equal(cur.token_logp.detach(), old.token_logp)
    ratio = torch.exp(cur.token_logp - old.token_logp)
    assert torch.equal(ratio[resp], torch.ones_like(ratio[resp]))


def test_generators_control_the_masks():
    ids, attn, resp = _batch()
    a = draw_elbo_masks(ids, resp, attention_mask=attn, generator=1, num_samples=8)
    b = draw_elbo_masks(ids, resp, attention_mask=attn, generator=torch.Generator().manual_seed(1), num_samples=8)
    c = draw_elbo_masks(ids, resp, attention_mask=attn, generator=2, num_samples=8)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.coef, b.coef)
    assert not torch.equal(a.masked, c.masked)
    g1, g2, g3 = make_generator(7, 3, 0), make_generator(7, 3, 0), make_generator(7, 3, 1)
    x1, x2, x3 = (torch.rand(16, generator=g) for g in (g1, g2, g3))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    with pytest.raises(InvalidSettingError):
        draw_elbo_masks(ids, resp, attention_mask=attn, generator=None)


@pytest.mark.parametrize("sampler", ["t", "l_stratified", "quadrature"])
def test_prompt_and_padding_never_masked(sampler):
    ids, attn, resp = _batch()
    plan = draw_elbo_masks(ids, resp, attention_mask=attn, generator=3, sampler=sampler, num_samples=64)
    rows_resp = resp.repeat_interleave(64, dim=0)
    assert not (plan.masked & ~rows_resp).any()
    assert ((plan.coef != 0) == plan.masked).all()
    cplan = draw_coupled_masks(ids, resp, attention_mask=attn, generator=3)
    assert not (cplan.masked & ~resp.repeat_interleave(3, dim=0)).any()


def test_one_step_masks_completion_and_noises_prompt(model):
    B, P, L = 400, 10, 5
    ids, resp = _copies(_tokens(P, 8), _tokens(L, 9), B)
    plan = draw_one_step_masks(ids, resp, generator=4, p_mask_prompt=0.15)
    assert plan.masked[resp].all() and torch.equal(plan.coef, resp.float())
    rate = plan.masked[~resp].double().mean().item()
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / (B * P))
    est = score_plan(model, plan)
    assert est.token_logp.shape == (B, P + L)
    assert torch.equal(est.token_logp[resp], est.position_logp[resp])
    assert est.token_logp[~resp].abs().max() == 0


def test_coupled_pair_covers_each_token_once(model):
    ids, attn, resp = _batch()
    plan = draw_coupled_masks(ids, resp, attention_mask=attn, generator=6, t_min=0.2, t_max=0.8)
    full, p1, p2 = plan.masked[0::3], plan.masked[1::3], plan.masked[2::3]
    assert torch.equal(full, resp) and torch.equal(p1 | p2, resp) and not (p1 & p2).any()
    t = plan.t[1::3]
    assert ((t >= 0.2) & (t <= 0.8)).all() and torch.allclose(plan.t[2::3], 1 - t)
    assert torch.allclose(plan.coef[1::3], p1.float() * 0.5 / t[:, None])
    assert torch.allclose(plan.coef[2::3], p2.float() * 0.5 / (1 - t[:, None]))
    est = score_plan(model, plan)
    pl = est.position_logp
    w = torch.where(p1, 1 / t[:, None], 1 / (1 - t[:, None]))
    manual = 0.5 * (pl[0::3] + w * (pl[1::3] + pl[2::3]))     # ½[log f(full) + w_k log f(pass)]
    assert torch.allclose(est.token_logp, manual * resp, atol=1e-5)


def _rollout_with_states(model, steps: int, gen_length: int = 6, block_length: int = 3):
    """Sample two completions at T = 1 and record the state the sampler saw before every step."""
    from align.sampling import generate

    prompt = torch.stack([_tokens(4, 21), _tokens(4, 22)])
    states = [None]

    def record(state):
        states.append(state.sequences.clone())          # after step s = before step s + 1

    out = generate(model, prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                   temperature=1.0, generator=torch.Generator().manual_seed(3), on_commit=record)
    states[0] = torch.cat([prompt, torch.full((2, gen_length), model.mask_token_id)], 1)
    resp = torch.zeros_like(out.sequences, dtype=torch.bool)
    resp[:, 4:] = True
    commit = torch.cat([torch.full((2, 4), -1), out.commit_step], 1)
    return out.sequences, resp, commit, states[:-1]


def test_trace_views_are_the_samplers_states(model):
    # one view per denoising step: view s masks exactly what the sampler had masked before step s and scores
    # the tokens committed at step s, so the estimate is the log-probability of the sampler's choices
    ids, resp, commit, states = _rollout_with_states(model, steps=6)
    plan = draw_trace_masks(ids, resp, commit_step=commit, num_views=6)
    mask_id = model.mask_token_id
    for b in range(2):
        for s, state in enumerate(states):
            r = b * 6 + s
            assert torch.equal(plan.masked[r], state[b] == mask_id)
            assert torch.equal(plan.coef[r] != 0, resp[b] & (commit[b] == s))
    est = score_plan(model, plan)
    with torch.no_grad():
        manual = torch.zeros(2)
        for s, state in enumerate(states):
            logp = torch.log_softmax(model(state).logits.float(), -1).gather(-1, ids[..., None])[..., 0]
            manual += (logp * (resp & (commit == s))).sum(1)
    assert torch.allclose(est.seq_logp, manual, atol=1e-5)


def test_trace_chunks_cover_each_token_once(model):
    ids, resp, commit, _ = _rollout_with_states(model, steps=6)
    for V in (1, 2, 4):
        plan = draw_trace_masks(ids, resp, commit_step=commit, num_views=V)
        scored = (plan.coef != 0).view(2, V, -1)
        assert torch.equal(scored.sum(1), resp.long()) and torch.equal(plan.coef[plan.coef != 0],
                                                                       torch.ones(int(resp.sum())))
        # a view shows every token committed before its chunk and masks the rest of the response
        first = torch.where(scored, commit[:, None, :], torch.full_like(scored, 99, dtype=torch.long)).amin(-1)
        expect = resp[:, None, :] & (commit[:, None, :] >= first[..., None])
        assert torch.equal(plan.masked.view(2, V, -1), expect)
    assert torch.equal(draw_trace_masks(ids, resp, commit_step=commit, num_views=1).masked, resp)
    est = trace(model, ids, resp, commit_step=commit, num_views=3)
    assert est.seq_logp.shape == (2,) and torch.isfinite(est.seq_logp).all()
    with pytest.raises(InvalidSettingError, match="num_views"):
        draw_trace_masks(ids, resp, commit_step=commit, num_views=0)
    with pytest.raises(ShapeMismatchError, match="commit_step"):
        draw_trace_masks(ids, resp, commit_step=commit[:, 1:], num_views=2)


def test_restricted_plan_skips_sequences_and_keeps_the_others(model):
    ids, attn, resp = _batch()
    plan = draw_coupled_masks(ids, resp, attention_mask=attn, generator=6)
    keep = torch.tensor([False, True])
    full, part = score_plan(model, plan), score_plan(model, plan.restricted_to(keep))
    assert torch.equal(part.token_logp[0], torch.zeros_like(part.token_logp[0]))
    assert torch.allclose(part.token_logp[1], full.token_logp[1], atol=1e-6)
    with pytest.raises(ShapeMismatchError):
        plan.restricted_to(torch.ones(3, dtype=torch.bool))


def test_t_sampler_draws_bernoulli_t_masks():
    # the t-sampled estimator's variance is too large for a sharp mean test; check its parts instead:
    # t ~ U(0,1), count | t ~ Binomial(L, t), coef = 1/(n·t) on the masked positions
    n, L = 4000, 6
    ids, resp = _copies(_tokens(2, 1), _tokens(L, 2), 1)
    plan = draw_elbo_masks(ids, resp, generator=10, sampler="t", num_samples=n)
    t = plan.t.double()
    assert abs(t.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    count = plan.masked.sum(dim=1).double()
    z = (count - L * t).sum() / torch.sqrt((L * t * (1 - t)).sum())
    assert abs(z.item()) < 4
    masked = plan.masked
    assert torch.allclose((plan.coef * n * t[:, None].float())[masked], torch.ones(int(masked.sum())), rtol=1e-4)


def test_l_stratified_covers_all_lengths(model):
    ids, attn, resp = _batch()               # L = 4 and 6
    plan = draw_elbo_masks(ids, resp, attention_mask=attn, generator=9, sampler="l_stratified", num_samples=12)
    counts = plan.masked.sum(dim=1).view(2, 12)
    assert sorted(counts[0].tolist()) == sorted(list(range(1, 5)) * 3)
    assert sorted(counts[1].tolist()) == sorted(list(range(1, 7)) * 2)
    L = resp.sum(1).repeat_interleave(12)
    assert torch.allclose(plan.coef.sum(1), (L / 12.0) * torch.ones(24))    # Σ_i coef = l · L/(n·l)


def test_quadrature_counts_and_weights():
    ids, attn, resp = _batch()
    plan = draw_elbo_masks(ids, resp, attention_mask=attn, generator=9, sampler="quadrature", num_samples=5,
                           n_nodes=2)
    t_nodes, w_nodes = gauss_legendre_01(2)
    draws = [3, 2]
    for r in range(10):
        b, j = divmod(r, 5)
        L = int(resp[b].sum())
        m = j % 2
        assert int(plan.masked[r].sum()) == math.ceil(t_nodes[m] * L)
        assert plan.coef[r][plan.masked[r]].unique().item() == pytest.approx(
            w_nodes[m] / (t_nodes[m] * draws[m]), rel=1e-6)


# ---------------------------------------------------------------- gradients, micro-batching, layouts


@pytest.mark.parametrize("estimator,settings", [("one_step", {}), ("coupled", {}),
                                                ("elbo", {"sampler": "l_stratified", "num_samples": 2})])
def test_gradients_are_finite_and_nonzero(model, estimator, settings):
    ids, attn, resp = _batch()
    model.zero_grad()
    plan = draw_masks(ids, resp, estimator=estimator, generator=2, attention_mask=attn, **settings)
    score_plan(model, plan).seq_logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad()


def test_micro_batching_and_chunking_match_one_batch(model):
    ids, attn, resp = _batch()
    plan = draw_elbo_masks(ids, resp, attention_mask=attn, generator=8, num_samples=5)
    with torch.no_grad():
        one = score_plan(model, plan)
        micro = score_plan(model, plan, micro_batch_size=3, chunk_size=2)
    assert torch.allclose(one.seq_logp, micro.seq_logp, atol=1e-5)
    assert torch.allclose(one.token_logp, micro.token_logp, atol=1e-5)
    assert torch.allclose(one.row_logp, micro.row_logp, atol=1e-5)


def test_linear_backend_matches_head_backend(model):
    ids, attn, resp = _batch()
    plan = draw_coupled_masks(ids, resp, attention_mask=attn, generator=8)
    grads = []
    for backend in ("head", "linear"):
        model.zero_grad()
        est = score_plan(model, plan, backend=backend)
        est.seq_logp.sum().backward()
        grads.append((est.seq_logp.detach(), model.get_output_embeddings().weight.grad.clone()))
    model.zero_grad()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)


def test_prompt_completion_layout_matches(model):
    prompt_ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), _tokens(2, 1)]), _tokens(3, 2)])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    completion_ids = torch.stack([_tokens(4, 3), _tokens(4, 4)])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ids, attn, resp = join_prompt_completion(prompt_ids, completion_ids, completion_mask, prompt_mask)
    assert torch.equal(resp[:, 3:], completion_mask) and not resp[:, :3].any()
    with torch.no_grad():
        est = one_step(model, ids, resp, attention_mask=attn, generator=0, p_mask_prompt=0.0)
    per_token = est.token_logp[:, 3:]
    assert per_token.shape == completion_ids.shape
    assert per_token[0, 3] == 0 and (per_token[completion_mask] < 0).all()


def test_all_empty_rows_still_backpropagate(model):
    ids, attn, resp = _batch()
    plan = draw_elbo_masks(ids, resp, attention_mask=attn, generator=0, sampler="t")
    plan = dataclasses.replace(plan, coef=torch.zeros_like(plan.coef))
    est = score_plan(model, plan)
    assert torch.equal(est.seq_logp.detach(), torch.zeros(2))
    est.seq_logp.sum().backward()
    model.zero_grad()


# ---------------------------------------------------------------- errors


def test_named_errors_for_bad_inputs(model):
    ids, attn, resp = _batch()
    with pytest.raises(EmptyResponseError, match="rows \\[1\\]"):
        draw_elbo_masks(ids, torch.stack([resp[0], torch.zeros_like(resp[1])]), generator=0)
    with pytest.raises(ShapeMismatchError):
        draw_elbo_masks(ids, resp[:, :-1], generator=0)
    with pytest.raises(ShapeMismatchError):
        draw_elbo_masks(ids[0], resp[0], generator=0)
    with pytest.raises(ShapeMismatchError, match="real tokens"):
        draw_elbo_masks(ids, resp, attention_mask=attn & ~resp, generator=0)
    with pytest.raises(InvalidSettingError, match="num_samples"):
        draw_elbo_masks(ids, resp, generator=0, num_samples=0)
    with pytest.raises(InvalidSettingError, match="n_nodes"):
        draw_elbo_masks(ids, resp, generator=0, sampler="quadrature", num_samples=1, n_nodes=2)
    with pytest.raises(UnknownEstimatorError, match="sampler"):
        draw_elbo_masks(ids, resp, generator=0, sampler="tokens")
    with pytest.raises(UnknownEstimatorError):
        draw_masks(ids, resp, estimator="autoregressive", generator=0)
    with pytest.raises(InvalidSettingError):
        draw_coupled_masks(ids, resp, generator=0, t_min=0.8, t_max=0.2)
    with pytest.raises(InvalidSettingError):
        score_plan(model, draw_one_step_masks(ids, resp, generator=0), micro_batch_size=0)
    with pytest.raises(EmptyResponseError):
        exact_elbo(model, ids[0, :3], ids[0, :0])


def test_check_estimator_args_validates_recipe_settings():
    check_estimator_args("elbo", {"sampler": "quadrature", "num_samples": 4, "n_nodes": 3})
    check_estimator_args("one_step", {"p_mask_prompt": 0.0})
    check_estimator_args("coupled", {})
    check_estimator_args("trace", {"num_views": 2})
    with pytest.raises(InvalidSettingError, match="num_views"):
        check_estimator_args("trace", {"num_views": 1.5})
    with pytest.raises(UnknownEstimatorError):
        check_estimator_args("diffusion", {})
    with pytest.raises(UnknownEstimatorError, match="sampler"):
        check_estimator_args("elbo", {"sampler": "s"})
    with pytest.raises(InvalidSettingError, match="num_sample"):
        check_estimator_args("elbo", {"num_sample": 4})
    with pytest.raises(InvalidSettingError, match="p_mask_prompt"):
        check_estimator_args("one_step", {"p_mask_prompt": 1.5})
    with pytest.raises(InvalidSettingError, match="num_samples"):
        check_estimator_args("elbo", {"num_samples": 2.0})
    with pytest.raises(InvalidSettingError):
        check_estimator_args("coupled", {"t_min": "low"})


# ---------------------------------------------------------------- log-prob kernels


def test_logprob_kernels_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True)
    y = torch.randint(0, 50, (37,), generator=g)
    ref = torch.log_softmax(head(h), -1).gather(-1, y[:, None]).squeeze(-1)
    assert torch.allclose(selective_log_softmax(head(h), y, chunk_size=5), ref, atol=1e-5)
    got = head_log_probs(head, h, y, chunk_size=8)
    assert torch.allclose(got, ref, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    (g_got,) = torch.autograd.grad(got.sum(), h)
    assert torch.allclose(g_ref, g_got, atol=1e-5)
    lin = linear_log_probs(h, head.weight, y, head.bias, vocab_chunk_size=7)
    assert torch.allclose(lin, ref, atol=1e-5)
    (g_lin,) = torch.autograd.grad(lin.sum(), h)
    assert torch.allclose(g_ref, g_lin, atol=1e-5)
    assert elbo_from_masked_sums(torch.zeros(4, dtype=torch.float64)).item() == 0.0

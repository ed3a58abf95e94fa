"""Mask plans for the sequence-likelihood estimators (``docs/concepts.md`` §2 and §3).

A :class:`MaskPlan` holds every random draw of an estimator and nothing that depends on a model:
which rows (views of a sequence) are evaluated, which positions of each row are replaced by the mask
token ``M``, and the coefficient of ``log f(y_i | x, z_r)_i`` in the estimate. Evaluating one plan under
several models (current / old / reference policy, adapter on / off) therefore shares the (t, mask)
draws exactly: the antithetic sharing of VRPO, and an importance ratio of exactly 1 at the first inner
iteration.

Every estimator is a weighted sum over rows ``r`` of sequence ``b``::

    B̂(y_b | x_b) = Σ_{r ∈ rows(b)} Σ_i coef[r, i] · log f_θ(y_i | x, z_r)_i

Rows of sequence ``b`` are ``b·V … b·V + V − 1`` (``V`` views per sequence). Randomness comes from an
explicit ``torch.Generator`` (or an int seed); draws are made on the generator's device and moved to
the ids' device, so a plan is the same on every device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

ESTIMATORS: tuple[str, ...] = ("one_step", "coupled", "elbo", "trace", "block")
SAMPLERS: tuple[str, ...] = ("t", "l_stratified", "quadrature")


class LikelihoodError(ValueError):
    """Base class of the likelihood estimators' input errors."""


class EmptyResponseError(LikelihoodError):
    """A sequence has no response position to score."""


class ShapeMismatchError(LikelihoodError):
    """Input tensors have inconsistent shapes or layouts."""


class InvalidSettingError(LikelihoodError):
    """An estimator setting is out of range (num_samples < 1, t_min >= t_max, missing generator …)."""


class UnknownEstimatorError(LikelihoodError):
    """An estimator or ELBO sampler name is not known."""


@dataclass(frozen=True)
class MaskPlan:
    """All random draws of one estimate, independent of the model.

    Attributes:
        estimator: ``"one_step"``, ``"coupled"``, ``"elbo/<sampler>"``, ``"trace"`` or ``"block"``.
        input_ids: ``[B, T]`` clean ids (prompt ``x`` and response ``y``).
        attention_mask: ``[B, T]`` bool, real tokens (False = padding).
        response_mask: ``[B, T]`` bool, positions of ``y``.
        row_seq: ``[R]`` sequence index ``b`` of each row.
        masked: ``[R, T]`` bool, positions replaced by ``M`` in row ``r`` (``z_r``).
        coef: ``[R, T]`` fp32, coefficient of ``log f(y_i | x, z_r)_i``; zero where the position does not count.
        t: ``[R]`` masking ratio of each row (``l/L`` for exact-count masks; 1 for the fully masked view).
        num_samples: samples per sequence ``n`` the plan was drawn with.
    """

    estimator: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    row_seq: torch.Tensor
    masked: torch.Tensor
    coef: torch.Tensor
    t: torch.Tensor
    num_samples: int

    @property
    def batch_size(self) -> int:
        """Number of sequences ``B``."""
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        """Number of rows ``R`` (forward-pass rows before empty rows are skipped)."""
        return int(self.row_seq.shape[0])

    def restricted_to(self, keep: torch.Tensor) -> MaskPlan:
        """The same plan with the coefficients of sequences outside ``keep`` (``[B]`` bool) set to zero.

        :func:`align.likelihood.score_plan` skips rows with nothing to score, so those sequences cost no forward
        pass and their estimates are 0; the draws of the kept sequences are unchanged.
        """
        keep = keep.to(device=self.coef.device, dtype=torch.bool)
        if keep.shape != (self.batch_size,):
            raise ShapeMismatchError(f"keep must be [{self.batch_size}], got {tuple(keep.shape)}")
        return replace(self, coef=self.coef * keep[self.row_seq].unsqueeze(1).to(self.coef.dtype))

    def to(self, device: torch.device | str) -> MaskPlan:
        """The same plan with every tensor on ``device``."""
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("input_ids", "attention_mask", "response_mask", "row_seq", "masked",
                                 "coef", "t")})


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(generator)
        return gen
    raise InvalidSettingError("an explicit torch.Generator or int seed is required for mask draws "
                              f"(got {type(generator).__name__}); the global RNG is never used")


def _same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ShapeMismatchError(f"{name} {tuple(x.shape)} must match {ref_name} {tuple(ref.shape)}")


def join_prompt_completion(prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                           completion_mask: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate TRL-style ``prompt_ids [B, P]`` (left padded) and ``completion_ids [B, L]``.

    Returns ``(input_ids, attention_mask, response_mask)``, each ``[B, P + L]``. Completion positions
    outside ``completion_mask`` stay visible as clean context; the estimate's ``token_logp[:, P:]`` is
    then aligned with ``completion_ids``.
    """
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ShapeMismatchError(f"prompt_ids {tuple(prompt_ids.shape)} and completion_ids "
                                 f"{tuple(completion_ids.shape)} must be [B, P] and [B, L]")
    _same_shape("completion_mask", completion_mask, "completion_ids", completion_ids)
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    _same_shape("prompt_mask", prompt_mask, "prompt_ids", prompt_ids)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.bool(), torch.ones_like(completion_mask, dtype=torch.bool)], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), completion_mask.bool()], dim=1)
    return input_ids, attention_mask, response_mask


def _validate(input_ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the layout; return ``(input_ids, attention_mask, response_mask)`` with bool masks."""
    if input_ids.dim() != 2:
        raise ShapeMismatchError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ShapeMismatchError("input_ids has an empty batch (B = 0)")
    _same_shape("response_mask", response_mask, "input_ids", input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    _same_shape("attention_mask", attention_mask, "input_ids", input_ids)
    attention_mask, response_mask = attention_mask.bool(), response_mask.bool()
    outside = (response_mask & ~attention_mask).any(dim=1)
    if outside.any():
        rows = outside.nonzero().flatten().tolist()
        raise ShapeMismatchError(f"rows {rows}: response positions must be real tokens (attention_mask = 1)")
    empty = ~response_mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise EmptyResponseError(f"rows {rows} have an empty response (response_mask is all False)")
    return input_ids, attention_mask, response_mask


def _check_num_samples(num_samples: int) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise InvalidSettingError(f"num_samples must be an int >= 1, got {num_samples!r}")


def _uniform(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device, dtype=dtype)


def _mask_exactly(resp: torch.Tensor, count: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mask exactly ``count[r]`` response positions of row ``r``, uniformly without replacement.

    Uniform fp64 scores ranked within the row (non-response positions rank last); ties have probability
    ~T²·2⁻⁵³, so every ``count``-subset is equally likely.
    """
    scores = _uniform(gen, *resp.shape, dtype=torch.float64).to(resp.device)
    scores = scores.masked_fill(~resp, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < count.unsqueeze(1)) & resp


def _plan(estimator: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
          views: int, masked: torch.Tensor, coef: torch.Tensor, t: torch.Tensor, num_samples: int) -> MaskPlan:
    B = input_ids.shape[0]
    row_seq = torch.arange(B, device=input_ids.device).repeat_interleave(views)
    return MaskPlan(estimator, input_ids, attention_mask, response_mask, row_seq, masked,
                    coef.to(torch.float32), t.to(device=input_ids.device, dtype=torch.float32), num_samples)


def draw_one_step_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *,
                        generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
                        p_mask_prompt: float = 0.15) -> MaskPlan:
    """diffu-GRPO (d1): one row per sequence, completion fully masked, prompt noised.

    Row ``z = (x̃, M…M)``: every response token is masked, each prompt token independently with probability
    ``p_mask_prompt``; ``coef = 1`` on the response, so ``token_logp[b, k] = log f_θ(y_k | x̃, M…M)_k``.
    """
    input_ids, attention_mask, resp = _validate(input_ids, response_mask, attention_mask)
    if not 0.0 <= p_mask_prompt < 1.0:
        raise InvalidSettingError(f"p_mask_prompt must be in [0, 1), got {p_mask_prompt}")
    gen = _as_generator(generator)
    prompt = attention_mask & ~resp
    u = _uniform(gen, *input_ids.shape).to(input_ids.device)
    masked = resp | (prompt & (u < p_mask_prompt))
    return _plan("one_step", input_ids, attention_mask, resp, 1, masked, resp.float(),
                 torch.ones(input_ids.shape[0]), 1)


def draw_coupled_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *,
                       generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
                       t_min: float = 0.2, t_max: float = 0.8, full_mask_view: bool = True) -> MaskPlan:
    """Coupled-GRPO (DiffuCoder): complementary masks plus the fully masked view.

    ``t ~ U(t_min, t_max)``, ``U ~ U(0,1)^T``; pass 1 masks ``U < t`` (weight ``1/t``), pass 2 the complement
    (weight ``1/(1−t)``), so every response token is scored exactly once across the pair. With
    ``full_mask_view`` a third row masks the whole response and the per-token estimate is
    ``½[log f(y_k | full mask) + w_k log f(y_k | coupled pass)]``; without it, ``w_k log f(y_k | pass)``.
    Rows per sequence: ``[full, pass 1, pass 2]`` (``[pass 1, pass 2]`` without the full view).
    """
    input_ids, attention_mask, resp = _validate(input_ids, response_mask, attention_mask)
    if not 0.0 < t_min < t_max < 1.0:
        raise InvalidSettingError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
    gen = _as_generator(generator)
    B, T = input_ids.shape
    t = (t_min + (t_max - t_min) * _uniform(gen, B)).to(input_ids.device)          # t ~ U(t_min, t_max)
    u = _uniform(gen, B, T).to(input_ids.device)
    pass1 = resp & (u < t[:, None])
    pass2 = resp & ~pass1
    half = 0.5 if full_mask_view else 1.0
    coef1 = pass1.float() * (half / t[:, None])                                     # w_k = 1/t
    coef2 = pass2.float() * (half / (1.0 - t[:, None]))                             # w_k = 1/(1−t)
    views = [(pass1, coef1, t), (pass2, coef2, 1.0 - t)]
    if full_mask_view:
        views.insert(0, (resp, resp.float() * 0.5, torch.ones_like(t)))
    masked = torch.stack([v[0] for v in views], dim=1).reshape(-1, T)
    coef = torch.stack([v[1] for v in views], dim=1).reshape(-1, T)
    t_rows = torch.stack([v[2] for v in views], dim=1).reshape(-1)
    return _plan("coupled", input_ids, attention_mask, resp, len(views), masked, coef, t_rows, 1)


def gauss_legendre_01(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes ``t_n`` and weights ``w_n`` on [0, 1] (weights sum to 1)."""
    if n_nodes < 1:
        raise InvalidSettingError(f"n_nodes must be >= 1, got {n_nodes}")
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    return (x + 1.0) / 2.0, w / 2.0


def draw_elbo_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *,
                    generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
                    sampler: str = "l_stratified", num_samples: int = 1, n_nodes: int = 2,
                    eps: float = 0.0) -> MaskPlan:
    """ELBO estimators of ``log π(y|x)`` with ``n = num_samples`` rows per sequence (``docs/concepts.md`` §2).

    * ``"t"``: ``t_j ~ U(0,1)`` (``t = (1−ε)u + ε`` if ``eps > 0``, which truncates the integral), mask each
      response token independently with probability ``t_j``, coefficient ``1/(n·t_j)`` (t-sampled ELBO).
    * ``"l_stratified"``: ``l_j = ((k − 1 + ⌊j·L/n⌋) mod L) + 1`` with offset ``k ~ U{1..L}`` (each ``l_j`` is
      marginally ``U{1..L}``, the n values spaced ``L/n`` apart), mask exactly ``l_j`` positions, coefficient
      ``L/(n·l_j)`` (l-sampled ELBO).
    * ``"quadrature"``: Gauss–Legendre nodes ``t_m`` on [0,1]; sample ``j`` uses node ``j mod n_nodes``, masks
      exactly ``⌈t_m·L⌉`` positions, coefficient ``w_m/(t_m·draws_m)`` (GDPO-style; deterministic in ``t``,
      so its mean differs slightly from the exact ELBO).

    ``L`` is each sequence's own response length (ragged batches are fine).
    """
    input_ids, attention_mask, resp = _validate(input_ids, response_mask, attention_mask)
    _check_num_samples(num_samples)
    if sampler not in SAMPLERS:
        raise UnknownEstimatorError(f"unknown ELBO sampler {sampler!r}; expected one of {SAMPLERS}")
    gen = _as_generator(generator)
    device, n = input_ids.device, num_samples
    B, T = input_ids.shape
    R = B * n
    rows_resp = resp.repeat_interleave(n, dim=0)                                # [R, T]
    L = rows_resp.sum(dim=1)                                                    # L_b of each row, long
    j = torch.arange(n, device=device).repeat(B)                                # sample index of each row

    if sampler == "t":
        if not 0.0 <= eps < 1.0:
            raise InvalidSettingError(f"eps must be in [0, 1), got {eps}")
        t = _uniform(gen, R).to(device)
        t = (1.0 - eps) * t + eps                                               # t ~ U(ε, 1)
        u = _uniform(gen, R, T).to(device)
        masked = rows_resp & (u < t[:, None])                                   # z ~ q_t(·|y)
        inv_t = torch.where(t > 0, 1.0 / t.clamp_min(1e-30), torch.zeros_like(t))
        coef = masked.float() * (inv_t / n)[:, None]                            # (1/t) Σ_{z_i=M}, mean over n
        return _plan(f"elbo/{sampler}", input_ids, attention_mask, resp, n, masked, coef, t, n)

    if sampler == "l_stratified":
        L_b = resp.sum(dim=1)
        k = (_uniform(gen, B, dtype=torch.float64).to(device) * L_b).long().clamp_max(L_b - 1) + 1  # k~U{1..L}
        l = torch.remainder(k.repeat_interleave(n) - 1 + (j * L) // n, L) + 1   # stratified l_j ∈ {1..L}
        coef_row = L.double() / (n * l.double())                                # (L/l), mean over n
    else:
        if n_nodes < 1 or n < n_nodes:
            raise InvalidSettingError(f"quadrature needs 1 <= n_nodes <= num_samples, got n_nodes={n_nodes}, "
                                      f"num_samples={n}")
        t_nodes, w_nodes = gauss_legendre_01(n_nodes)
        node = j % n_nodes
        draws = torch.tensor([n // n_nodes + (m < n % n_nodes) for m in range(n_nodes)], device=device)
        t_n = torch.as_tensor(t_nodes, device=device)[node]
        w_n = torch.as_tensor(w_nodes, device=device)[node]
        l = torch.ceil(t_n * L.double() - 1e-9).long().clamp(min=1).minimum(L)   # ⌈t_n·L⌉ tokens
        coef_row = w_n / (t_n * draws[node].double())                           # w_n / (t_n · draws)
    masked = _mask_exactly(rows_resp, l, gen)
    coef = masked.double() * coef_row[:, None]
    return _plan(f"elbo/{sampler}", input_ids, attention_mask, resp, n, masked, coef,
                 l.double() / L.double(), n)


def draw_trace_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *, commit_step: torch.Tensor,
                     generator: torch.Generator | int | None = None, attention_mask: torch.Tensor | None = None,
                     num_views: int = 4) -> MaskPlan:
    """Trajectory views (TraceRL): score each response token in the context the sampler had when it was decoded.

    The sampler records the denoising step ``s_i`` at which position ``i`` was committed
    (:attr:`align.sampling.GenerationOutput.commit_step`). The ``S_b`` steps of row ``b`` are split into
    ``V = num_views`` consecutive chunks ``[e_v, e_{v+1})`` with ``e_v = ⌊v·S_b/V⌋``; view ``v`` masks every
    response token committed at a step ``≥ e_v`` (the state of the trajectory before step ``e_v``) and scores
    the tokens committed in its chunk with coefficient 1::

        log π̂(y | x) = Σ_v Σ_{i: e_v ≤ s_i < e_{v+1}} log f_θ(y_i | x, z_{e_v})_i

    Every response token is scored exactly once. With ``V = S_b`` the views are the trajectory's own states
    and the estimate is the log-probability of the tokens the sampler committed (positions are chosen by
    confidence, so they carry no extra probability); fewer views show each token a little less context than
    the sampler had, at ``V`` rows per sequence. The plan is a function of the trajectory alone: ``generator``
    is accepted for the common interface of the estimators and draws nothing.

    Args:
        commit_step: ``[B, T]`` step at which each response position was committed (values off the response
            are ignored; ``-1`` on the response counts as the last step).
        num_views: ``V`` rows per sequence (chunks of the trajectory).
    """
    input_ids, attention_mask, resp = _validate(input_ids, response_mask, attention_mask)
    if not isinstance(num_views, int) or isinstance(num_views, bool) or num_views < 1:
        raise InvalidSettingError(f"num_views must be an int >= 1, got {num_views!r}")
    if commit_step.shape != input_ids.shape:
        raise ShapeMismatchError(f"commit_step {tuple(commit_step.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    s = commit_step.to(device=input_ids.device, dtype=torch.long)
    last = torch.where(resp, s, torch.full_like(s, -1)).amax(dim=1, keepdim=True)     # S_b − 1
    s = torch.where(resp & (s < 0), last + 1, s)                                         # never committed: last
    S = torch.where(resp, s, torch.zeros_like(s)).amax(dim=1) + 1                        # S_b steps
    v = torch.arange(num_views + 1, device=input_ids.device)
    edges = (v[None, :] * S[:, None]) // num_views                                       # e_v = ⌊v·S_b/V⌋
    start, stop = edges[:, :-1, None], edges[:, 1:, None]                                # [B, V, 1]
    si = s[:, None, :]
    masked = resp[:, None, :] & (si >= start)                                            # state before step e_v
    scored = masked & (si < stop)                                                        # tokens of chunk v
    t_rows = masked.sum(-1).double() / resp.sum(-1, keepdim=True).double()              # share of y masked
    return _plan("trace", input_ids, attention_mask, resp, num_views, masked.reshape(-1, T),
                 scored.reshape(-1, T).float(), t_rows.reshape(-1), 1)


_DRAWERS = {"one_step": draw_one_step_masks, "coupled": draw_coupled_masks, "elbo": draw_elbo_masks,
            "trace": draw_trace_masks}


def _drawer(estimator: str) -> Callable[..., MaskPlan]:
    """The drawing function of ``estimator``; the block drawer lives in :mod:`align.likelihood.blocks`, which
    builds on this module's helpers (so it is imported here, when first needed)."""
    if estimator == "block":
        from align.likelihood.blocks import draw_block_masks

        return draw_block_masks
    if estimator not in _DRAWERS:
        raise UnknownEstimatorError(f"unknown likelihood estimator {estimator!r}; expected one of {ESTIMATORS}")
    return _DRAWERS[estimator]


def draw_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *, estimator: str,
               generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
               **settings: object) -> MaskPlan:
    """Draw a plan for ``estimator`` (``"one_step"``, ``"coupled"``, ``"elbo"``, ``"trace"`` or ``"block"``).

    ``settings`` are the keyword arguments of :func:`draw_one_step_masks`, :func:`draw_coupled_masks`,
    :func:`draw_elbo_masks`, :func:`draw_trace_masks` (which needs ``commit_step``) or
    :func:`align.likelihood.blocks.draw_block_masks`; an unknown name raises ``TypeError`` like any bad keyword.
    """
    return _drawer(estimator)(input_ids, response_mask, generator=generator, attention_mask=attention_mask,
                              **settings)


_DRAW_INPUTS = ("input_ids", "response_mask", "generator", "attention_mask", "commit_step")


def check_estimator_args(estimator: str, args: Mapping[str, object]) -> None:
    """Validate an estimator name and its drawing settings (e.g. a recipe's ``estimator_args``).

    Raises :class:`UnknownEstimatorError` for an unknown estimator or sampler and
    :class:`InvalidSettingError` for an unknown key or an out-of-range value; the checks are the ones the
    draw itself makes (a dry draw on a two-token dummy sequence).
    """
    drawer = _drawer(estimator)
    allowed = [name for name in inspect.signature(drawer).parameters if name not in _DRAW_INPUTS]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise InvalidSettingError(f"unknown setting(s) {unknown} for estimator {estimator!r}; allowed: {allowed}")
    ids = torch.zeros(1, 2, dtype=torch.long)
    resp = torch.tensor([[False, True]])
    trajectory = {"commit_step": torch.tensor([[-1, 0]])} if estimator == "trace" else {}
    try:
        drawer(ids, resp, generator=0, **trajectory, **args)
    except TypeError as exc:
        raise InvalidSettingError(f"bad value in {dict(args)} for estimator {estimator!r}: {exc}") from exc

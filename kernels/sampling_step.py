"""Fused denoising sampling step: chosen token and its confidence in one pass over the vocabulary.

For each row ``z`` of a ``[N, V]`` logits tensor this computes

* the chosen token ``x0``: ``argmax_v z_v`` at temperature ``T = 0``, or the Gumbel-max sample
  ``argmax_v (z_v / T + g_v)`` with ``g_v = −log(−log U_v)``, ``U_v ~ U(0, 1)`` (``docs/concepts.md`` §5),
  which is distributed exactly as ``softmax(z / T)``;
* its confidence, always measured on the untempered distribution ``p = softmax(z)`` as in LLaDA's
  reference sampler:

  - ``"prob"``: ``p(x0) = exp(z_{x0} − lse(z))`` (low-confidence remasking),
  - ``"margin"``: ``p_top1 − p_top2`` (independent of the chosen token),
  - ``"entropy"``: negative entropy ``Σ_v p_v log p_v = Σ_v p_v (z_v − lse(z))``.

Two implementations sit behind :func:`sample_step`:

* a Triton kernel, one program per tile of ``BLOCK_N`` rows, streaming the vocabulary in tiles of
  ``BLOCK_V`` columns with an online max / log-sum-exp (plus a running second maximum and entropy
  accumulator). It never writes probabilities or noise to memory: Gumbel noise comes from Triton's
  counter-based Philox generator keyed by ``(seed, row · V + column)``;
* a torch twin that draws its Gumbel noise in float64 from a ``torch.Generator``.

At ``T = 0`` both return identical tokens (first index on ties) and confidences equal to float32
rounding. At ``T > 0`` they draw from the same distribution but not the same numbers.

Precision of the kernel's noise (fp32): 31 random bits give ``W = (k + ½)·2⁻³¹ ∈ (0, 1)``, used as
``1 − U``; the exponential variate ``E = −log U = −log1p(−W)`` is computed with a 7-term series for
``W < 0.05`` (truncation error < 1e-9, below fp32 rounding) and ``−log(1 − W)`` above (relative
error < 1e-6 from rounding ``1 − W``), and
``W`` is clamped to ``1 − 2⁻²⁴``. Hence ``g = −log E`` is resolved on its right tail (the tail that
lets unlikely tokens win) down to a per-element probability of ``2⁻³²`` (``g ≤ 22.2``) and clamped
on the left at probability ``6e-8`` (``g ≥ −2.81``), where it cannot change the argmax in practice.
"""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

import torch

__all__ = [
    "CONFIDENCE_KINDS",
    "SampleStepOutput",
    "TritonUnavailableError",
    "sample_step",
    "sample_step_torch",
    "sample_step_triton",
    "triton_available",
]

ConfidenceKind = Literal["prob", "margin", "entropy"]
CONFIDENCE_KINDS: tuple[str, ...] = ("prob", "margin", "entropy")
_CONF_CODE = {"prob": 0, "margin": 1, "entropy": 2}
# Rows of float64 noise materialised at once by the torch twin (bounds its temporary memory).
_TWIN_CHUNK_ELEMENTS = 1 << 22

try:  # triton is optional (absent on macOS / Windows installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


class TritonUnavailableError(RuntimeError):
    """Raised when the Triton backend is requested explicitly but cannot run here."""


class SampleStepOutput(NamedTuple):
    """Result of one sampling step: ``tokens`` (int64) and ``confidence`` (float32), shape ``logits.shape[:-1]``."""

    tokens: torch.Tensor
    confidence: torch.Tensor


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernel can run for tensors on ``device``.

    True when triton is importable and either the device is CUDA or ``TRITON_INTERPRET=1`` is set
    (the interpreter runs the kernel on CPU tensors, slowly; used by the tests).
    """
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return device is not None and torch.device(device).type == "cuda"


def _check_args(logits: torch.Tensor, temperature: float, confidence: str, exclude_token: int | None) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if confidence not in _CONF_CODE:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    if exclude_token is not None and not 0 <= int(exclude_token) < logits.shape[-1]:
        raise ValueError(f"exclude_token must be a column of logits [0, {logits.shape[-1]}), got {exclude_token}")


def _seed_from(generator: torch.Generator | None, seed: int | None) -> int:
    """A 62-bit kernel seed: ``seed`` if given, else one draw from ``generator`` (or fresh entropy)."""
    if seed is not None:
        return int(seed) & ((1 << 62) - 1)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device).item())


# ----------------------------------------------------------------------------------------------
# torch twin
# ----------------------------------------------------------------------------------------------
def _gumbel_float64(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Float64 Gumbel noise ``g = −log(−log U)``, ``U`` clamped into ``(0, 1)``."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator, device=generator.device)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)  # U = 0 would give g = −inf
    return u.log_().neg_().log_().neg_().to(device)


def sample_step_torch(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    confidence: ConfidenceKind = "prob",
    exclude_token: int | None = None,
) -> SampleStepOutput:
    """Torch twin of the fused kernel (see the module docstring for the maths).

    The Gumbel noise is float64 and drawn from ``generator`` (or from a generator seeded with
    ``seed``), in row chunks so that at most ``2**22`` noise values exist at once.
    """
    _check_args(logits, temperature, confidence, exclude_token)
    lead, V = logits.shape[:-1], logits.shape[-1]
    z = logits.reshape(-1, V).float()
    if temperature > 0:
        if generator is None:
            generator = torch.Generator(device=z.device if z.device.type != "mps" else "cpu")
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        rows = max(1, _TWIN_CHUNK_ELEMENTS // V)
        parts = []
        for start in range(0, z.shape[0], rows):
            z_c = z[start : start + rows]
            g = _gumbel_float64(tuple(z_c.shape), generator, z.device)
            key = z_c.double() / temperature + g  # Gumbel-max (§5): argmax(z / T + g) ~ softmax(z / T)
            if exclude_token is not None:
                key[:, exclude_token] = float("-inf")
            parts.append(torch.argmax(key, dim=-1))
        x0 = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=z.device)
    else:
        x0 = torch.argmax(z, dim=-1)
        if exclude_token is not None:
            bad = (x0 == exclude_token).nonzero().squeeze(1)
            if bad.numel():  # rare: re-run the argmax without the excluded column on those rows
                z_bad = z.index_select(0, bad)
                z_bad[:, exclude_token] = float("-inf")
                x0[bad] = torch.argmax(z_bad, dim=-1)

    lse = torch.logsumexp(z, dim=-1)
    if confidence == "prob":
        conf = torch.exp(z.gather(-1, x0[:, None]).squeeze(-1) - lse)  # p(x0) = exp(z_x0 − lse)
    elif confidence == "margin":
        k = min(2, V)
        top = torch.topk(z, k, dim=-1).values
        p1 = torch.exp(top[:, 0] - lse)
        p2 = torch.exp(top[:, 1] - lse) if k == 2 else torch.zeros_like(p1)
        conf = p1 - p2  # margin = p_top1 − p_top2
    else:
        logp = z - lse[:, None]
        # −H = Σ p log p, with 0·log 0 = 0 for −inf logits
        conf = torch.where(torch.isneginf(z), torch.zeros_like(z), logp.exp() * logp).sum(-1)
    return SampleStepOutput(x0.reshape(lead), conf.float().reshape(lead))


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
_KERNEL = None


def _build_kernel():
    """Define the Triton kernel on first use, so TRITON_INTERPRET may be set after import."""

    @triton.jit
    def _sample_step_kernel(
        logits_ptr,
        stride_row,
        tokens_ptr,
        conf_ptr,
        N,
        V,
        inv_temp,
        seed,
        exclude,
        SAMPLE: tl.constexpr,
        CONF: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # one program = BLOCK_N rows; the vocabulary is streamed in tiles of BLOCK_V columns
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_V)
        neg_inf = float("-inf")
        big = 2147483647
        # running state per row: m = max z, s = Σ exp(z − m), t = Σ exp(z − m)(z − m), m2 = 2nd max
        m = tl.full([BLOCK_N], neg_inf, tl.float32)
        m2 = tl.full([BLOCK_N], neg_inf, tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        best_key = tl.full([BLOCK_N], neg_inf, tl.float32)
        best_z = tl.full([BLOCK_N], neg_inf, tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = row_ok[:, None] & (offs[None, :] < V)
            z = tl.load(logits_ptr + rows[:, None] * stride_row + offs[None, :], mask=valid, other=neg_inf)
            z = z.to(tl.float32)
            if SAMPLE:
                # counter-based noise: W = (k + ½)·2⁻³¹ plays 1 − U; E = −log U = −log1p(−W)
                r = tl.randint(seed, rows[:, None] * V + offs[None, :])
                w = ((r >> 1).to(tl.int32).to(tl.float32) + 0.5) * 4.656612873077393e-10
                w = tl.minimum(w, 0.99999994)
                series = w * (1.0 + w * (0.5 + w * (0.33333334 + w * (0.25 + w * (0.2 + w * (
                    0.16666667 + w * 0.14285715))))))
                e = tl.where(w < 0.05, series, -tl.log(1.0 - w))
                key = tl.where(valid, z * inv_temp - tl.log(e), neg_inf)  # z / T + g,  g = −log E
            else:
                key = z
            key = tl.where(offs[None, :] == exclude, neg_inf, key)  # never chosen, still in lse
            c_key = tl.max(key, 1)
            c_idx = tl.min(tl.where(key == c_key[:, None], offs[None, :], big), 1)
            c_z = tl.max(tl.where(offs[None, :] == c_idx[:, None], z, neg_inf), 1)
            take = c_key > best_key  # strict: earlier tiles win ties (lowest index)
            best_key = tl.where(take, c_key, best_key)
            best_idx = tl.where(take, c_idx, best_idx)
            best_z = tl.where(take, c_z, best_z)

            c_max = tl.max(z, 1)
            m_new = tl.maximum(m, c_max)
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # rescales the old sums; 0 while nothing finite was seen
            ez = tl.exp(z - m_safe[:, None])
            if CONF == 1:
                c_first = tl.min(tl.where(z == c_max[:, None], offs[None, :], big), 1)
                c_sec = tl.max(tl.where(offs[None, :] == c_first[:, None], neg_inf, z), 1)
                m2 = tl.maximum(tl.minimum(m, c_max), tl.maximum(m2, c_sec))
            if CONF == 2:
                shift = tl.where(m == neg_inf, 0.0, m - m_safe) * s
                d = tl.where(z == neg_inf, 0.0, z - m_safe[:, None])
                t = alpha * (t + shift) + tl.sum(ez * d, 1)
            s = s * alpha + tl.sum(ez, 1)
            m = m_new

        # rows past N saw only −inf: give them harmless values (their results are not stored)
        s = tl.where(row_ok, s, 1.0)
        m = tl.where(row_ok, m, 0.0)
        m2 = tl.where(row_ok, m2, 0.0)
        best_z = tl.where(row_ok, best_z, 0.0)
        if CONF == 0:
            conf = tl.exp(best_z - m) / s  # p(x0) = exp(z_x0 − lse),  lse = m + log s
        elif CONF == 1:
            conf = (1.0 - tl.exp(m2 - m)) / s  # p_top1 − p_top2
        else:
            conf = t / s - tl.log(s)  # −H = Σ p (z − lse)
        tl.store(tokens_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
        tl.store(conf_ptr + rows, conf, mask=row_ok)

    return _sample_step_kernel


def sample_step_triton(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    confidence: ConfidenceKind = "prob",
    exclude_token: int | None = None,
    block_v: int | None = None,
    block_n: int | None = None,
) -> SampleStepOutput:
    """Run the fused Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``seed`` keys the Philox noise directly; otherwise one seed is drawn from ``generator``.
    Tile sizes (powers of two) can be overridden: ``block_v`` columns, default
    ``min(4096, next_power_of_2(V))``; ``block_n`` rows per program, default
    ``clamp(4096 // block_v, 1, 64)`` (one row per program for large vocabularies).
    """
    global _KERNEL
    _check_args(logits, temperature, confidence, exclude_token)
    if not triton_available(logits.device):
        raise TritonUnavailableError(
            "the Triton sampling kernel needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for the "
            f"CPU interpreter); got a {logits.device} tensor, triton "
            f"{'installed' if triton is not None else 'not installed'}. Use backend='torch' instead."
        )
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    lead, V = logits.shape[:-1], logits.shape[-1]
    z = logits.reshape(-1, V)
    if z.stride(-1) != 1:
        z = z.contiguous()
    N = z.shape[0]
    if block_v is None:
        block_v = min(4096, triton.next_power_of_2(V))
    if block_n is None:
        block_n = max(1, min(64, 4096 // block_v))
    for name, value, low in (("block_v", block_v, 2), ("block_n", block_n, 1)):
        if value < low or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
    tokens = torch.empty(N, dtype=torch.long, device=z.device)
    conf = torch.empty(N, dtype=torch.float32, device=z.device)
    sample = temperature > 0
    kernel_seed = _seed_from(generator, seed) if sample else 0
    if N > 0:
        _KERNEL[(triton.cdiv(N, block_n),)](
            z,
            z.stride(0),
            tokens,
            conf,
            N,
            V,
            (1.0 / temperature) if sample else 1.0,
            kernel_seed,
            -1 if exclude_token is None else int(exclude_token),
            SAMPLE=sample,
            CONF=_CONF_CODE[confidence],
            BLOCK_N=block_n,
            BLOCK_V=block_v,
        )
    return SampleStepOutput(tokens.reshape(lead), conf.reshape(lead))


#: implementations of :func:`sample_step` (``auto``: Triton on CUDA when available, torch otherwise).
BACKENDS = ("auto", "torch", "triton")


def sample_step(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    confidence: ConfidenceKind = "prob",
    exclude_token: int | None = None,
    backend: Literal["auto", "torch", "triton"] = "auto",
) -> SampleStepOutput:
    """Choose a token and its confidence for every row of ``logits`` (``[..., V]``).

    Args:
        logits: unnormalised scores, any float dtype (computed in float32); ``−inf`` entries are
            allowed, but every row needs at least one finite entry.
        temperature: ``0`` for greedy argmax (ties: lowest index), ``T > 0`` for a Gumbel-max sample
            from ``softmax(logits / T)``.
        generator: source of the noise (the torch twin draws from it; the kernel draws one seed).
        seed: alternative to ``generator``: an integer key for the noise.
        confidence: ``"prob"`` (probability of the chosen token), ``"margin"`` (top-1 minus top-2
            probability) or ``"entropy"`` (negative entropy); all under ``softmax(logits)``.
        exclude_token: a column that is never chosen (the sampler passes the mask token); it still
            counts in the normalisation of the confidence, as in LLaDA's reference.
        backend: ``"auto"`` (Triton on CUDA when available, torch otherwise), ``"torch"`` or
            ``"triton"`` (raises :class:`TritonUnavailableError` if it cannot run).

    Returns:
        :class:`SampleStepOutput` with ``tokens`` (int64) and ``confidence`` (float32).
    """
    if backend == "auto":
        use_triton = logits.device.type == "cuda" and triton_available(logits.device)
    elif backend in BACKENDS:
        use_triton = backend == "triton"
    else:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if use_triton:
        return sample_step_triton(logits, temperature=temperature, generator=generator, seed=seed,
                                  confidence=confidence, exclude_token=exclude_token)
    return sample_step_torch(logits, temperature=temperature, generator=generator, seed=seed, confidence=confidence,
                             exclude_token=exclude_token)

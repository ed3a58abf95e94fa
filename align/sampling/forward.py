"""Hidden states of the current block for the sampler, with optional block KV caches.

The sampler only needs the final hidden states ``h`` at the current block's positions (the output
head is applied later, at the still-masked positions only). :class:`BlockForward` produces them
under three cache modes (``docs/concepts.md`` §5, Fast-dLLM):

* ``None`` (exact): every step runs the network over the whole sequence (prompt + generation).
* ``"prefix"``: the first step of a block runs the whole sequence and keeps the keys/values of
  everything before the block; later steps of the block run only ``[block_start, end)`` (the block
  and the masked suffix) and attend to the cached prefix.
* ``"dual"``: as ``"prefix"``, but the suffix after the block is cached too, so later steps run
  only the block's ``block_length`` positions.

The caches are approximate: attention is bidirectional, so the cached keys/values of the prefix
(and suffix) would change as the block is decoded; they are refreshed once per block.

Classifier-free guidance runs the conditional and unconditional rows (prompt replaced by ``M``)
as one batch of ``2R`` rows: row ``r`` and row ``R + r``. Rows whose current block is already
decoded can be left out of a step (``rows``), which is how finished generations stop costing
compute.
"""

from __future__ import annotations

import torch

from align.models.adapters import positions_from_mask

KVList = list[tuple[torch.Tensor, torch.Tensor]]


class BlockForward:
    """Computes ``h`` at the current block for a fixed batch of sequences.

    Args:
        model: a denoiser exposing ``hidden_states(ids, attention_mask, position_ids, *, context_kv,
            context_mask, return_kv)`` (the model contract of ``align.models``).
        cache: ``None``, ``"prefix"`` or ``"dual"``.
        attention_mask: ``[R, T]`` (1 = real token) for the full sequence, or ``None``.
        prompt_length: ``P``; positions ``< P`` are the (left-padded) prompt.
        mask_id: the mask token ``M`` used for the unconditional rows.
        cfg: whether to also run the unconditional rows (classifier-free guidance).
        shift: 1 for models whose hidden state at ``i`` predicts token ``i + 1`` (Dream-style
            shifted logits): the block's predictions are then read one position to the left.
    """

    def __init__(
        self,
        model,
        cache: str | None,
        attention_mask: torch.Tensor | None,
        prompt_length: int,
        mask_id: int,
        cfg: bool,
        shift: int = 0,
    ) -> None:
        self.model = model
        self.shift = shift
        self.cache = cache
        self.prompt_length = prompt_length
        self.mask_id = mask_id
        self.cfg = cfg
        self.attn = attention_mask if not cfg or attention_mask is None else torch.cat([attention_mask] * 2)
        self.kv: KVList | None = None
        self.ctx_mask: torch.Tensor | None = None
        self.slot: torch.Tensor | None = None  # model row -> index in the cached rows
        self.cached_sel: torch.Tensor | None = None  # model rows of the last refresh
        self.nfe = 0

    def model_rows(self, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Indices of the network's batch rows for sequence rows ``rows`` (both halves under CFG)."""
        return torch.cat([rows, rows + num_rows]) if self.cfg else rows

    def _inputs(self, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return x.index_select(0, sel)
        uncond = x.clone()
        uncond[:, : self.prompt_length] = self.mask_id  # unconditional pass: prompt masked
        return torch.cat([x, uncond]).index_select(0, sel)

    def __call__(
        self,
        x: torch.Tensor,
        block_start: int,
        block_end: int,
        refresh: bool,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states ``[len(sel), block_end − block_start, d]`` for the network rows of ``rows``.

        Args:
            x: ``[R, T]`` current sequences.
            block_start, block_end: absolute positions of the current block.
            refresh: first step of the block (recompute the cache from the whole sequence).
            rows: sequence rows to run (a subset of the rows of the last refresh).
        """
        R, T = x.shape
        sel = self.model_rows(rows, R)
        ids = self._inputs(x, sel)
        attn = None if self.attn is None else self.attn.index_select(0, sel)
        self.nfe += 1
        lo = block_start - self.shift  # first position whose hidden state is read
        if self.cache is None:
            h = self.model.hidden_states(ids, attention_mask=attn)
            return h[:, lo : lo + block_end - block_start]
        if attn is None:
            pos = torch.arange(T, device=x.device).expand(ids.shape[0], T)
        else:
            pos = positions_from_mask(attn)
        if refresh:
            return self._refresh(ids, attn, pos, lo, block_end, sel, 2 * R if self.cfg else R)
        kv, ctx_mask = self._cached_rows(sel)
        hi = T if self.cache == "prefix" else block_end
        h = self.model.hidden_states(
            ids[:, lo:hi],
            attention_mask=None if attn is None else attn[:, lo:hi],
            position_ids=pos[:, lo:hi],
            context_kv=kv,
            context_mask=ctx_mask,
        )
        return h[:, : block_end - block_start]

    def _refresh(self, ids, attn, pos, lo: int, block_end: int, sel, total_rows: int) -> torch.Tensor:
        """Full pass; cache keys/values before ``lo`` (prefix) and, for ``"dual"``, from ``block_end``."""
        h, kv = self.model.hidden_states(ids, attention_mask=attn, position_ids=pos, return_kv=True)
        dev = ids.device
        if self.cache == "prefix":
            keep = torch.arange(lo, device=dev)
        else:  # dual: everything outside the queried span [lo, block_end)
            keep = torch.cat([torch.arange(lo, device=dev), torch.arange(block_end, ids.shape[1], device=dev)])
        if keep.numel() == 0:
            self.kv, self.ctx_mask = None, None
        else:
            self.kv = [(k.index_select(2, keep), v.index_select(2, keep)) for k, v in kv]
            self.ctx_mask = None if attn is None else attn.index_select(1, keep)
        self.slot = torch.full((total_rows,), -1, dtype=torch.long, device=ids.device)
        self.slot[sel] = torch.arange(sel.numel(), device=ids.device)
        self.cached_sel = sel
        return h[:, lo : block_end - self.shift]

    def _cached_rows(self, sel: torch.Tensor) -> tuple[KVList | None, torch.Tensor | None]:
        if self.kv is None:
            return None, None
        if sel.numel() == self.cached_sel.numel() and torch.equal(sel, self.cached_sel):
            return self.kv, self.ctx_mask
        idx = self.slot[sel]
        kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv]
        return kv, None if self.ctx_mask is None else self.ctx_mask.index_select(0, idx)

"""Masked-diffusion SFT (and pre-training) on ``transformers.Trainer``.

Each micro-batch is noised by the forward process of :mod:`align.masking` with a generator derived from
``(seed, global_step, micro_batch, rank)``, so resumed runs draw the same masks. The loss uses the output
head only at masked positions. Checkpoints are Hugging Face directories; a ``.complete`` marker is written
after everything else, and :func:`last_complete_checkpoint` only resumes from marked ones.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from align.masking import forward_process, sft_loss
from align.rng import derive_seed, make_generator
from align.trainers.sft_config import DiffusionSFTOptions

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` directory of ``output_dir`` that was fully written, or ``None``."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and (p / COMPLETE_MARKER).exists():
            try:
                step = int(p.name.split("-", 1)[1])
            except ValueError:
                continue
            if best is None or step > best[0]:
                best = (step, p)
    return str(best[1]) if best else None


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps whose gradients are not finite, on every rank; abort after ``max_consecutive``.

    Gradients are checked just before the optimizer step; when any rank sees a NaN/inf, every rank drops
    its gradients (the optimizer then leaves the weights unchanged). Under DeepSpeed the engine owns the
    gradients and applies its own overflow handling.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        bad = torch.zeros((), device=grads[0].device)
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            self.consecutive += 1
            self.skipped += 1
            logger.warning("step %d: non-finite gradient, skipping the update (%d in a row)", state.global_step,
                           self.consecutive)
            for p in model.parameters():
                p.grad = None
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(f"{self.consecutive} consecutive steps had non-finite gradients; "
                                         "lower the learning rate or check the data")
        else:
            self.consecutive = 0


class CompleteMarker(TrainerCallback):
    """Write ``.complete`` into each checkpoint once the trainer has finished saving it."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))


class DiffusionSFTTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the masked-diffusion SFT objective.

    Args:
        mask_token_id: id of the mask token ``M``.
        options: forward-process and loss options (:class:`~align.config.DiffusionSFTOptions`).
        seed: base seed of the mask streams.
        *args, **kwargs: passed to ``Trainer`` (model, args, train_dataset, data_collator, ...).

    Batches must carry ``input_ids``, ``response_mask`` and ``attention_mask`` (see
    :class:`~align.data.collator.SFTCollator`).
    """

    def __init__(self, *args: Any, mask_token_id: int, options: DiffusionSFTOptions, seed: int = 0,
                 max_nonfinite_steps: int = 5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_token_id = int(mask_token_id)
        self.options = options
        self.mask_seed = int(seed)
        self._micro_step: tuple[int, int] = (-1, 0)
        # The loss is a per-micro-batch mean; let the Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.add_callback(NonFiniteGuard(max_nonfinite_steps))
        self.add_callback(CompleteMarker())

    def _mask_generator(self) -> torch.Generator:
        step = self.state.global_step
        last_step, micro = self._micro_step
        micro = micro + 1 if last_step == step else 0
        self._micro_step = (step, micro)
        return make_generator(self.mask_seed, step, micro, self.args.process_index)

    def _maybe_random_length(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pre-training: with probability ``random_length_prob`` cut the batch to a random length."""
        p = self.options.random_length_prob
        if p <= 0:
            return inputs
        step, micro = self._micro_step
        rng = random.Random(derive_seed(self.mask_seed, step, micro, self.args.process_index, 1))
        T = inputs["input_ids"].shape[1]
        if T < 2 or rng.random() >= p:
            return inputs
        cut = rng.randint(1, T - 1)
        return {k: v[:, :cut] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in inputs.items()}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Noise the batch, score the masked response tokens, and reduce to the SFT loss."""
        gen = self._mask_generator()
        inputs = self._maybe_random_length(inputs)
        input_ids, response = inputs["input_ids"], inputs["response_mask"].bool()
        o = self.options
        batch = forward_process(input_ids, response, self.mask_token_id, generator=gen, eps=o.eps,
                                t_min=o.t_min, t_max=o.t_max)
        # The model's forward is called (not hidden_states) so that DDP / DeepSpeed hooks run; it returns
        # logits only at the masked positions.
        out = model(input_ids=batch.noisy_ids, attention_mask=inputs.get("attention_mask"),
                    logits_mask=batch.masked)
        logits = out.logits.float()                                   # [N, V] at masked positions
        nll = torch.nn.functional.cross_entropy(logits, input_ids[batch.masked], reduction="none")
        loss = sft_loss(nll, batch, response, o.normalization)
        return (loss, out) if return_outputs else loss

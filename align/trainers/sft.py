"""Masked-diffusion SFT (and pre-training) on ``transformers.Trainer``.

Each micro-batch is noised by the forward process of :mod:`align.masking` with a generator derived from
``(seed, global_step, g)``, ``g`` the micro-batch's place in the step's global batch, so resumed runs draw the
same masks and N processes draw those of one process with N times the accumulation steps. The loss uses the output
head only at masked positions. Checkpoints are Hugging Face directories, written and moved into place as
:mod:`align.trainers.checkpoints` describes.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from transformers import Trainer

from align.masking import forward_process, sft_loss
from align.rng import derive_seed, make_generator
from align.trainers.checkpoints import CompleteMarker, StagedCheckpoints
from align.trainers.guards import install_guard
from align.trainers.sft_config import DiffusionSFTOptions

logger = logging.getLogger(__name__)


class DiffusionSFTTrainer(StagedCheckpoints, Trainer):
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
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_token_id = int(mask_token_id)
        self.options = options
        self.mask_seed = int(seed)
        self._micro_step: tuple[int, int] = (-1, 0)
        # The loss is a per-micro-batch mean; let the Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.guard = install_guard(self, options.max_nonfinite_steps)
        self.add_callback(CompleteMarker())

    def _mask_generator(self) -> torch.Generator:
        step = self.state.global_step
        last_step, micro = self._micro_step
        micro = micro + 1 if last_step == step else 0
        self._micro_step = (step, micro)
        return make_generator(self.mask_seed, step, self._global_micro(micro), 0)

    def _global_micro(self, micro: int) -> int:
        """The micro-batch's place in the optimizer step's global batch: ``micro · world_size + rank`` (accelerate
        deals batch ``g`` of a step to rank ``g mod world_size``), so N processes draw the masks of one process
        with N times the accumulation steps."""
        return micro * self.args.world_size + self.args.process_index

    def _maybe_random_length(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pre-training: with probability ``random_length_prob`` cut the batch to a random length."""
        p = self.options.random_length_prob
        if p <= 0:
            return inputs
        step, micro = self._micro_step
        rng = random.Random(derive_seed(self.mask_seed, step, self._global_micro(micro), 0, 1))
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
        self.guard.components.record({"sft/nll": nll, "sft/loss": loss})
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``, with the count of skipped non-finite steps in each training log."""
        if "loss" in logs:
            logs.update(self.guard.log_fields())
        super().log(logs, start_time)

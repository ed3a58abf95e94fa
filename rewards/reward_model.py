"""Reward-model plug-in: a local ``AutoModelForSequenceClassification`` checkpoint as a reward function.

Each (prompt, completion) pair is rendered with the checkpoint's own tokenizer: through its chat
template when it has one (prompt messages, then the completion as the assistant turn), otherwise as
prompt text followed by completion text. Pairs are scored in batches of ``batch_size`` on
``device``; the reward is the logit ``label_index`` of the classification head. The model is loaded
on first use and dropped when the object is pickled, so the reward can be sent to a worker process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._text import completion_text, prompt_messages

__all__ = ["SequenceClassificationReward"]


class SequenceClassificationReward:
    """Score completions with a sequence-classification checkpoint (see the module docstring).

    Args:
        path: local checkpoint directory (model and tokenizer files).
        device: ``"auto"`` (the process's own GPU, ``cuda:LOCAL_RANK``, when CUDA is available, else CPU), or any
            torch device string. Each process loads its own copy.
        batch_size: pairs per forward pass.
        max_length: truncate inputs to this many tokens (None: the tokenizer's own limit, no truncation).
        label_index: which logit of the head is the reward.
        dtype: torch dtype name for the weights (``"float32"``, ``"bfloat16"``, ...); None keeps the
            checkpoint's.
        use_chat_template: render with the tokenizer's chat template when it has one.
        name: log name (default ``reward_model:<directory name>``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int = 16,
        max_length: int | None = None,
        label_index: int = 0,
        dtype: str | None = None,
        use_chat_template: bool = True,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"reward model checkpoint {str(self.path)!r} is not a directory")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.label_index = int(label_index)
        self.dtype = dtype
        self.use_chat_template = use_chat_template
        self.__name__ = name or f"reward_model:{self.path.name}"
        self._model: Any = None
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = state["_tokenizer"] = None  # reloaded on first use after unpickling
        return state

    def resolved_device(self) -> torch.device:
        """The device the model runs on."""
        if self.device == "auto":   # one copy per process, on the process's own GPU (torchrun's LOCAL_RANK)
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device(self.device)

    def load(self) -> None:
        """Load tokenizer and model (done on first call)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs = {"dtype": getattr(torch, self.dtype)} if self.dtype else {}
        model = AutoModelForSequenceClassification.from_pretrained(self.path, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # heads that pool the last non-pad token
        if not 0 <= self.label_index < model.config.num_labels:
            raise ValueError(f"label_index {self.label_index} out of range for {model.config.num_labels} labels")
        self._tokenizer = tokenizer
        self._model = model.to(self.resolved_device()).eval()

    def render(self, prompt: Any, completion: Any) -> tuple[str, bool]:
        """The text scored for one pair, and whether it came from the chat template."""
        if self._tokenizer is None:
            self.load()
        answer = completion_text(completion)
        if self.use_chat_template and getattr(self._tokenizer, "chat_template", None):
            messages = [*prompt_messages(prompt), {"role": "assistant", "content": answer}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False), True
        if isinstance(prompt, str) or prompt is None:
            return (prompt or "") + answer, False
        return "\n".join(m["content"] for m in prompt_messages(prompt)) + "\n" + answer, False

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> list[float]:
        """One score per (prompt, completion) pair."""
        completions = list(completions or [])
        if not completions:
            return []
        prompts = list(prompts) if prompts is not None else [None] * len(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts for {len(completions)} completions")
        if self._model is None:
            self.load()
        device = next(self._model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            stop = start + self.batch_size
            rendered = [self.render(p, c) for p, c in zip(prompts[start:stop], completions[start:stop])]
            enc = self._tokenizer(
                [text for text, _ in rendered],
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not rendered[0][1],  # a chat template already adds its own
                return_tensors="pt",
            ).to(device)
            logits = self._model(**enc).logits
            scores += logits[:, self.label_index].float().cpu().tolist()
        return scores

    def __repr__(self) -> str:
        return f"SequenceClassificationReward({str(self.path)!r}, device={self.device!r})"

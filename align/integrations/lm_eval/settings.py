"""The ``--model_args`` of the ``dlm-align`` harness model, checked before any weights are read.

This module does not import lm-evaluation-harness: the settings can be built and checked without it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from align.likelihood import SAMPLERS
from align.models.adapters import DENOISER_KINDS, KV_CONTEXT_KINDS
from align.models.resolve import DTYPES
from align.options import ConfigError, FieldError, check_choice
from align.sampling.settings import SamplerSettings

#: How ``is_greedy`` of a log-likelihood request is computed: ``decode`` runs the greedy sampler over the
#: continuation's positions; ``off`` skips it and reports False.
GREEDY_CHECKS = ("decode", "off")
#: Weight dtypes a model may be loaded in; ``auto`` = bfloat16 on CUDA, float32 otherwise.
DTYPE_CHOICES = ("auto", *DTYPES)
#: Where ``model_args`` keys are reported in error messages.
SECTION = "model_args"


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(key, f"must be an integer, got {value!r}").within(SECTION)
    if value < low:
        raise FieldError(key, f"must be >= {low}, got {value}").within(SECTION)
    return value


@dataclass
class HarnessModelArgs:
    """Settings of :class:`~align.integrations.lm_eval.model.DLMAlignLM` (lm-eval's ``--model_args``).

    Attributes:
        pretrained: the model spec: ``builtin:<name>``, a checkpoint directory or a Hub id ``org/name[@rev]``.
        tokenizer: tokenizer spec; default: the model's own.
        adapter: how the checkpoint is loaded (``auto``, ``llada``, ``dream``, ``masked_lm``), as
            ``dlm-align generate --adapter``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; None = CUDA when available. A CUDA device on a machine
            without CUDA falls back to the CPU with a warning (lm-eval's CLI asks for ``cuda:0`` by default).
        batch_size: prompts per sampler call and sequences per ELBO batch.
        gen_length, steps, block_length, temperature, remasking, threshold, cache, cfg_scale: the sampler
            settings of ``generate_until`` (:func:`align.sampling.generate`; ``steps`` is its ``steps``).
        mc_num: Monte Carlo samples (masked views) per continuation in the ELBO of ``loglikelihood``.
        elbo_sampler: how the masking ratios are drawn: ``l_stratified`` (LLaDA's evaluation), ``t`` or
            ``quadrature`` (:func:`align.likelihood.draw_elbo_masks`).
        mc_batch_size: masked views per forward pass while scoring (memory bound); None = a whole batch at once.
        greedy_check: ``decode`` or ``off`` (see :data:`GREEDY_CHECKS`).
        max_length: longest sequence the model is given (context is cut from the left); None = the model
            config's ``max_sequence_length``.
        seed: seed of the explicit generators (sampling noise, mask draws).
        max_batch_size: only accepted as None (lm-eval's automatic batch size is not supported).
    """

    pretrained: str
    tokenizer: str | None = None
    adapter: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 1
    gen_length: int = 32
    steps: int = 32
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0
    mc_num: int = 32
    elbo_sampler: str = "l_stratified"
    mc_batch_size: int | None = None
    greedy_check: str = "decode"
    max_length: int | None = None
    seed: int = 0
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pretrained, str) or not self.pretrained:
            raise FieldError("pretrained", "must name a model (builtin:<name>, a directory or org/name), "
                                           f"got {self.pretrained!r}").within(SECTION)
        try:
            check_choice("adapter", self.adapter, DENOISER_KINDS)
            check_choice("dtype", self.dtype, DTYPE_CHOICES)
            check_choice("elbo_sampler", self.elbo_sampler, SAMPLERS)
            check_choice("greedy_check", self.greedy_check, GREEDY_CHECKS)
            self.cache = None if self.cache == "none" else self.cache
            self.sampler_settings()
        except FieldError as err:
            key = "steps" if err.key == "denoising_steps" else err.key
            raise FieldError(key, err.reason, err.others).within(SECTION) from None
        if self.cache is not None and self.adapter not in ("auto", *KV_CONTEXT_KINDS):
            raise FieldError("cache", f"{self.cache!r} needs KV-context support, which adapter={self.adapter!r} does "
                                      "not have; use cache=none").within(SECTION)
        if isinstance(self.batch_size, str) and self.batch_size.startswith("auto"):
            raise FieldError("batch_size", f"{self.batch_size!r} is not supported by dlm-align; give an integer "
                                           "(--batch_size N or model_args batch_size=N)").within(SECTION)
        _int("batch_size", self.batch_size, 1)
        _int("mc_num", self.mc_num, 1)
        _int("seed", self.seed, 0)
        if self.mc_batch_size is not None:
            _int("mc_batch_size", self.mc_batch_size, 1)
        if self.max_length is not None:
            _int("max_length", self.max_length, 2)
            if self.max_length <= self.gen_length:
                raise FieldError("max_length", f"({self.max_length}) must exceed 'gen_length' ({self.gen_length}) "
                                               "to leave room for a prompt", ("gen_length",)).within(SECTION)
        if self.max_batch_size is not None:
            raise FieldError("max_batch_size", "only applies to an automatic batch size, which dlm-align does not "
                                               "support; drop --max_batch_size").within(SECTION)
        if self.elbo_sampler == "quadrature" and self.mc_num < 2:
            raise FieldError("mc_num", "must be >= 2 with elbo_sampler=quadrature (two Gauss-Legendre nodes)",
                             ("elbo_sampler",)).within(SECTION)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> HarnessModelArgs:
        """Build from lm-eval's parsed ``model_args``; an unknown key is an error that lists the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ConfigError(f"unknown {SECTION} key(s) {unknown} for --model dlm-align; known: {', '.join(known)}")
        if "pretrained" not in args:
            raise ConfigError(f"'{SECTION}.pretrained' is required: --model_args pretrained=builtin:quickstart-base "
                              "(or a checkpoint directory, or a Hub id org/name)")
        values = dict(args)
        if isinstance(values.get("batch_size"), str) and values["batch_size"].isdigit():  # lm-eval's --batch_size
            values["batch_size"] = int(values["batch_size"])
        for key in ("temperature", "cfg_scale", "threshold"):  # lm-eval parses "1" as an int
            if isinstance(values.get(key), int) and not isinstance(values[key], bool):
                values[key] = float(values[key])
        return cls(**values)

    def sampler_settings(self) -> SamplerSettings:
        """The checked sampler settings (:class:`align.sampling.settings.SamplerSettings`) of ``generate_until``."""
        for key in ("gen_length", "steps", "block_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(key, f"must be an integer, got {value!r}")
        for key in ("temperature", "cfg_scale", "threshold"):
            value = getattr(self, key)
            if (value is not None or key != "threshold") and (isinstance(value, bool)
                                                              or not isinstance(value, (int, float))):
                raise FieldError(key, f"must be a number, got {value!r}")
        return SamplerSettings(gen_length=self.gen_length, denoising_steps=self.steps, block_length=self.block_length,
                               temperature=self.temperature, remasking=self.remasking, threshold=self.threshold,
                               cache=self.cache, cfg_scale=self.cfg_scale)

    def record(self) -> dict[str, Any]:
        """Every setting, for the record of how a number was made."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

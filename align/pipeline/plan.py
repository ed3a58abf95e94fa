"""What a recipe will do on N GPUs, before it runs: world size, batch sizes, launch commands, memory per GPU.

``dlm-align validate`` prints this plan (:mod:`align.cli.validate`); the memory figures come from the pure
estimator :mod:`align.memory`, fed with the recipe's stage settings and the token lengths of its rows.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from align.config import RecipeConfig
from align.config.paths import PathCheck
from align.config.validate import zero_stage
from align.memory import (
    Architecture,
    LoraShape,
    MemoryEstimate,
    RolloutShape,
    architecture_from_config,
    estimate_memory,
    released_architecture,
)

#: stages :func:`stage_memory` estimates.
ESTIMATED_STAGES = ("pretrain", "sft", "grpo", "vrpo")
#: TrainingArguments defaults the plan falls back on (those of transformers).
_DEFAULT_BATCH, _DEFAULT_ACCUMULATION = 8, 1


def visible_gpus() -> int:
    """Number of CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_commands(recipe: str, overrides: list[str], nproc: int, nnodes: int = 1) -> list[str]:
    """Commands that run ``recipe`` with ``overrides`` on ``nproc`` processes per node and ``nnodes`` nodes."""
    tail = " ".join(shlex.quote(x) for x in [recipe, *overrides])
    if nproc * nnodes <= 1:
        return [f"dlm-align run {tail}"]
    if nnodes == 1:
        return [f"dlm-align run {tail} --nproc {nproc}",
                f"torchrun --nproc_per_node {nproc} -m align.cli run {tail}",
                f"accelerate launch --num_processes {nproc} -m align.cli run {tail}"]
    return [f"torchrun --nnodes {nnodes} --nproc_per_node {nproc} --node_rank <0..{nnodes - 1}> "
            f"--master_addr <host of node 0> --master_port 29500 -m align.cli run {tail}",
            f"accelerate launch --num_machines {nnodes} --num_processes {nproc * nnodes} --machine_rank "
            f"<0..{nnodes - 1}> --main_process_ip <host of node 0> --main_process_port 29500 -m align.cli run {tail}"]


@dataclass(frozen=True)
class StageBatch:
    """Batch sizes of one stage: per device per micro-batch, and per optimizer step over all processes.

    For ``grpo``, ``per_device`` counts completions (``prompts_per_device`` prompts × ``num_generations``); for
    ``vrpo``, preference pairs (``unit``).
    """

    per_device: int
    accumulation: int
    world_size: int
    num_generations: int | None = None
    unit: str = "sequences"

    @property
    def effective(self) -> int:
        """Sequences (GRPO: completions) per optimizer step."""
        return self.per_device * self.accumulation * self.world_size

    def describe(self) -> str:
        """One line: per device, then per optimizer step."""
        if self.num_generations is None:
            return (f"{self.per_device} {self.unit} per device x {self.accumulation} accumulation x {self.world_size} "
                    f"process(es) = {self.effective} {self.unit} per optimizer step")
        g = self.num_generations
        return (f"{self.per_device} completions per device = {self.per_device // g} prompt(s) x {g} generations; "
                f"x {self.accumulation} accumulation x {self.world_size} process(es) = {self.effective // g} "
                f"prompts, {self.effective} completions per optimizer step")


def stage_batch(cfg: RecipeConfig, stage: str, world_size: int) -> StageBatch:
    """The batch sizes ``stage`` runs with on ``world_size`` processes."""
    opts, ta = cfg.stage_options(stage)
    return StageBatch(int(ta.get("per_device_train_batch_size", _DEFAULT_BATCH)),
                      int(ta.get("gradient_accumulation_steps", _DEFAULT_ACCUMULATION)), world_size,
                      opts.num_generations if stage == "grpo" else None, "pairs" if stage == "vrpo" else "sequences")


def model_architecture(cfg: RecipeConfig, checks: list[PathCheck], vocab_size: int | None = None
                       ) -> tuple[Architecture | None, str]:
    """The model's shape and where it came from: ``init_config``, the checkpoint's ``config.json`` (local,
    built-in or in the Hub cache), or the known shape of a released checkpoint's Hub id; else None and why."""
    m = cfg.model
    if m.init_config is not None:
        from align.models import LLaDAConfig

        fields = dict(m.init_config)
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
            fields.setdefault("embedding_size", fields["vocab_size"])
        try:
            return architecture_from_config(LLaDAConfig(**fields)), "model.init_config"
        except (TypeError, ValueError) as err:
            return None, f"model.init_config: {err}"
    check = next((c for c in checks if c.key == "model.path"), None)
    if check is not None and check.directory is not None:
        from align.models import read_config_dict

        try:
            return architecture_from_config(read_config_dict(check.directory)), f"{check.directory}/config.json"
        except (OSError, ValueError) as err:
            return None, str(err)
    from align.models.resolve import parse_hub_id

    hub = parse_hub_id(m.path or "")
    arch = released_architecture(hub[0]) if hub else None
    if arch is not None:
        return arch, f"known shape of {hub[0]}"
    return None, f"the config of {m.path} is not on this machine"


def _rows_per_completion(estimator: str, args: dict[str, Any]) -> int:
    """Masked views the estimator scores per completion, read from a plan drawn on a dummy sequence."""
    import torch

    from align.likelihood import draw_masks

    ids = torch.zeros(1, 4, dtype=torch.long)
    resp = torch.tensor([[False, True, True, True]])
    extra = {"commit_step": torch.tensor([[-1, 0, 1, 2]])} if estimator == "trace" else {}
    return draw_masks(ids, resp, estimator=estimator, generator=0, **extra, **args).num_rows


def stage_memory(cfg: RecipeConfig, stage: str, arch: Architecture, world_size: int, *,
                 longest: int | None = None, longest_prompt: int | None = None, shortest_prompt: int | None = None,
                 dropout_mask_bytes: int = 1) -> MemoryEstimate:
    """Per-GPU memory estimate of one micro-batch of ``stage`` (``docs/distributed.md``, "Memory estimate").

    Sequence lengths are the longest rows of the data when known (``longest``: prompt + completion; for GRPO the
    prompt, to which ``gen_length`` is added), else ``data.max_length``; SFT's output head is sized for every
    response position masked at ``t_max`` (the worst case of the forward process).
    """
    if stage not in ESTIMATED_STAGES:
        raise ValueError(f"no memory estimate for stage {stage!r} (estimated: {', '.join(ESTIMATED_STAGES)})")
    opts, ta = cfg.stage_options(stage)
    batch = stage_batch(cfg, stage, world_size)
    mixed = bool(ta.get("bf16") or ta.get("fp16"))
    ds = ta.get("deepspeed")
    stage_z = (zero_stage(ds) or 0) if ds is not None else None
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    act = 2 if weight_bytes == 2 or mixed else 4
    peft = cfg.peft
    lora = None
    if peft is not None:
        from align.models import LLADA_LORA_TARGETS

        targets = tuple(LLADA_LORA_TARGETS) if peft.target_modules == "auto" else tuple(peft.target_modules)
        lora = LoraShape(peft.r, targets, peft.lora_dropout)
    ckpt = bool(cfg.model.gradient_checkpointing or ta.get("gradient_checkpointing"))
    fallback = cfg.data.max_length or 2048
    common = {"world_size": world_size, "zero_stage": stage_z, "weight_bytes": weight_bytes, "mixed_precision": mixed,
              "act_bytes": act, "lora": lora, "gradient_checkpointing": ckpt,
              "dropout_mask_bytes": dropout_mask_bytes}
    if stage == "vrpo":
        return _vrpo_memory(arch, opts, batch.per_device, longest or fallback, shortest_prompt or 0,
                            opts.reference == "model" and peft is None, common)
    if stage != "grpo":
        seq_len = longest or fallback
        p_max = (1 - opts.eps) * opts.t_max + opts.eps
        response = seq_len - (shortest_prompt or 0)
        positions = round(batch.per_device * response * p_max)
        return estimate_memory(arch, sequences=batch.per_device, seq_len=seq_len, head_positions=positions,
                               padded=opts.eos_train != "all", **common)
    from align.kernels.logprob import DEFAULT_CHUNK_SIZE
    from align.trainers.grpo_math import RATIO_FREE

    prompt = longest_prompt or longest or fallback
    rows = _rows_per_completion(opts.estimator, dict(opts.estimator_args))
    n_plans = 1 if opts.estimator == "trace" else opts.num_iterations
    old_scored = 0 if opts.loss_type in RATIO_FREE or opts.num_iterations == 1 else min(opts.num_iterations - 1,
                                                                                        n_plans)
    scored = old_scored + (n_plans if opts.beta > 0 else 0)   # buffered old-policy and reference scores
    rollout = RolloutShape(batch.per_device, prompt, opts.gen_length, opts.block_length or opts.gen_length, rows,
                           opts.cache or "none", n_plans, scored, opts.beta > 0 and peft is None)
    return estimate_memory(arch, sequences=batch.per_device * rows, seq_len=prompt + opts.gen_length,
                           head_positions=batch.per_device * rows * opts.gen_length, padded=True, rollout=rollout,
                           head_chunk=DEFAULT_CHUNK_SIZE, **common)


def _vrpo_memory(arch: Architecture, opts: Any, pairs: int, seq_len: int, shortest_prompt: int, reference_copy: bool,
                 common: dict[str, Any]) -> MemoryEstimate:
    """One VRPO micro-batch: ``pairs`` x 2 sequences x ``num_samples`` masked views through the network with
    gradients (each view masks about half of its response on average, so the head sees that many positions, in
    chunks), plus the frozen reference copy when there is one."""
    from align.kernels.logprob import DEFAULT_CHUNK_SIZE
    from align.memory import MemoryRow, param_count

    rows = 2 * pairs * opts.num_samples
    positions = rows * (seq_len - shortest_prompt + 1) // 2
    est = estimate_memory(arch, sequences=rows, seq_len=seq_len, head_positions=positions, padded=True,
                          head_chunk=DEFAULT_CHUNK_SIZE, **common)
    if reference_copy:
        est.rows.append(MemoryRow("reference model", common["weight_bytes"] * param_count(arch),
                                  "frozen copy (vrpo.reference: model, no LoRA)"))
    return est

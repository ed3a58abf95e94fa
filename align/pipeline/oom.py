"""What to lower when a run runs out of memory: the message ``dlm-align run`` prints for an out-of-memory error.

:func:`out_of_memory_message` names the phase that ran out (a stage's training, an evaluation, or loading the
model), taken from the frames of the error's traceback (:func:`~align.pipeline.stage.run_stage` and
:func:`~align.pipeline.recipe.run_eval` hold the stage's name), and lists the settings of that phase that lower
memory, with their values in the recipe.
"""

from __future__ import annotations

from types import TracebackType

from align.config import RecipeConfig

#: functions whose ``stage`` local names the phase an error happened in (training, or evaluation of a stage).
_PHASE_FUNCTIONS = {"run_stage": "train", "run_eval": "eval"}


def failed_phase(tb: TracebackType | None) -> tuple[str, str] | None:
    """``("train", stage)`` or ``("eval", stage)`` for the innermost pipeline frame of ``tb``; None when the error
    happened elsewhere (building the model, reading rows)."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        kind = _PHASE_FUNCTIONS.get(frame.f_code.co_name)
        if kind is not None and frame.f_globals.get("__name__", "").startswith("align.pipeline"):
            stage = frame.f_locals.get("stage")
            if isinstance(stage, str):
                found = (kind, stage)
        tb = tb.tb_next
    return found


def _train_settings(cfg: RecipeConfig, stage: str) -> list[str]:
    opts, ta = cfg.stage_options(stage)
    bs, ga = int(ta.get("per_device_train_batch_size", 8)), int(ta.get("gradient_accumulation_steps", 1))
    hints = []
    unit = {"grpo": "completions", "vrpo": "pairs"}.get(stage, "sequences")
    if bs > 1:
        half = bs // 2
        if stage == "grpo" and half % opts.num_generations:
            half = opts.num_generations
        keep = max(1, bs * ga // max(half, 1))
        hints.append(f"'{stage}.per_device_train_batch_size' ({bs} {unit}): lower it to {half} and raise "
                     f"'{stage}.gradient_accumulation_steps' from {ga} to {keep} to keep the batch per optimizer step")
    if stage == "grpo":
        hints.append(f"'grpo.num_generations' ({opts.num_generations}; 'per_device_train_batch_size' must stay a "
                     "multiple of it)")
        hints.append(f"'grpo.gen_length' ({opts.gen_length})")
        hints.append(f"'grpo.estimator_args' (views per completion, e.g. num_samples / num_views; now "
                     f"{opts.estimator_args or 'defaults'})")
    elif stage == "vrpo":
        hints.append(f"'vrpo.num_samples' ({opts.num_samples} masked views per sequence and model)")
        if opts.reference == "model" and cfg.peft is None:
            hints.append("'vrpo.reference: precomputed' (no reference copy of the model held during training)")
    if cfg.data.max_length is not None:
        hints.append(f"'data.max_length' ({cfg.data.max_length} tokens)")
    return hints


def _model_settings(cfg: RecipeConfig) -> list[str]:
    hints = []
    if not cfg.model.gradient_checkpointing:
        hints.append("'model.gradient_checkpointing: true' (recompute activations in the backward pass)")
    if cfg.model.dtype == "float32":
        hints.append("'model.dtype: bfloat16' (now float32)")
    if cfg.peft is None:
        hints.append("'peft' (train a LoRA adapter instead of every weight: no gradients or optimizer state for the "
                     "base weights)")
    return hints


def out_of_memory_message(cfg: RecipeConfig, exc: BaseException, recipe: str | None = None) -> str:
    """The message for an out-of-memory error ``exc`` raised while running ``cfg``: which phase ran out, the
    settings of that phase to lower (with their values), and the command that prints the memory estimate."""
    phase = failed_phase(exc.__traceback__)
    kind = "GPU" if type(exc).__name__ == "OutOfMemoryError" else "host"
    if phase is None:
        where, hints = "before training (loading the model or the rows)", _model_settings(cfg)
    elif phase[0] == "eval":
        e = cfg.eval
        where = f"evaluating stage {phase[1]!r}"
        hints = [f"'eval.batch_size' ({e.batch_size} prompts per sampler call)", f"'eval.gen_length' ({e.gen_length})"]
        if cfg.model.dtype == "float32":
            hints.append("'model.dtype: bfloat16' (now float32)")
    else:
        where = f"training stage {phase[1]!r}"
        hints = _train_settings(cfg, phase[1]) + _model_settings(cfg)
    lines = [f"out of {kind} memory {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
             "lower one of these settings:"] + [f"  - {h}" for h in hints]
    lines.append(f"`dlm-align validate {recipe or '<recipe>'}` prints the memory estimate per GPU of each stage "
                 "with these settings")
    return "\n".join(lines)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` ran out of memory: ``torch.OutOfMemoryError`` (GPU) or ``MemoryError`` (host)."""
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))



"""Typed recipe configuration, validated when it is loaded.

A recipe is a YAML file whose sections map onto the dataclasses below. Loading rejects unknown keys
(naming the dotted key and suggesting the closest valid one), wrong types and impossible combinations,
before any model is built. ``key.sub=value`` overrides from the command line are applied to the raw YAML
first, so they are validated the same way.

Training stages (``pretrain``, ``sft``) take the diffusion options of :class:`DiffusionSFTOptions` plus any
field of :class:`transformers.TrainingArguments` by its own name (``learning_rate``, ``max_steps``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``deepspeed``, ...); anything else is
rejected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe key is unknown, has the wrong type, or conflicts with another key."""


class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` / ``5E+2`` as floats (YAML 1.1 requires a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)\.\d*(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.\d+(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Which model to start from.

    Attributes:
        path: a local checkpoint directory (Hugging Face format), or ``builtin:<name>`` for a checkpoint
            shipped with the package (``builtin:quickstart-base``).
        init_config: instead of ``path``, build a randomly initialised native LLaDA model from these
            :class:`~align.models.LLaDAConfig` fields (used by pre-training recipes).
        tokenizer: tokenizer directory; defaults to ``path``. ``builtin:arithmetic`` builds the embedded
            word-level tokenizer of the built-in task.
        mask_token_id: override the mask token id of the model config.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        attn_implementation: ``sdpa`` (default) or ``eager``.
        gradient_checkpointing: recompute activations in the backward pass.
    """

    path: str | None = None
    init_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    mask_token_id: int | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where the training and evaluation rows come from.

    Attributes:
        task: a built-in task (``arithmetic``) providing train and held-out splits; or null to use files.
        task_args: arguments of the built-in task: ``num_train``, ``num_test``, ``seed`` and the difficulty
            fields of :class:`~align.data.task.ArithmeticTaskSpec`.
        train_files: local jsonl/json/parquet/csv training files (instead of ``task``).
        eval_files: local held-out files with an answer column (used by evaluation).
        format: ``auto``, ``prompt_completion``, ``messages`` or ``text``.
        prompt_column, completion_column, messages_column, text_column, answer_column: column names.
        use_chat_template: wrap prompts in the tokenizer's chat template.
        max_length: longest prompt + completion in tokens; longer rows are dropped and counted.
    """

    task: str | None = "arithmetic"
    task_args: dict[str, Any] = field(default_factory=dict)
    train_files: list[str] | None = None
    eval_files: list[str] | None = None
    format: str = "auto"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    text_column: str = "text"
    answer_column: str = "answer"
    use_chat_template: bool = True
    max_length: int | None = 512


@dataclass
class PeftConfig:
    """LoRA adapter settings (``peft: null`` trains all weights).

    Attributes:
        r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        target_modules: module names, or ``auto`` for the model's own list (LLaDA: q_proj, k_proj, v_proj,
            attn_out, ff_proj, up_proj, ff_out). Names that match no module are an error.

    At the end of each stage the adapter is saved alone (``<stage>/adapter``), then merged into the weights
    (``<stage>/final``); evaluation and later stages start from the merged model.
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "auto"


@dataclass
class DiffusionSFTOptions:
    """Masked-diffusion options of a training stage (algorithms.md section 1).

    Attributes:
        eps: ``ε`` of ``p_mask = (1 − ε)·t + ε``.
        t_min, t_max: ``t ~ U(t_min, t_max)``.
        normalization: ``sequence`` (LLaDA), ``token`` (d1) or ``masked`` (no 1/p_mask weight).
        eos_train: trailing padding EOS tokens trained: ``all``, ``none`` or an integer k.
        random_length_prob: share of batches cut to a random length (pre-training only, LLaDA uses 0.01).
    """

    eps: float = 1e-3
    t_min: float = 0.0
    t_max: float = 1.0
    normalization: str = "sequence"
    eos_train: str | int = "all"
    random_length_prob: float = 0.0


@dataclass
class EvalConfig:
    """Held-out evaluation after each stage (accuracy, completion length), with the rollout sampler.

    Attributes:
        enabled: evaluate at all.
        base: also evaluate the starting model (stage ``base``).
        num_problems: held-out problems scored (taken from the start of the test split).
        batch_size: prompts per sampler call.
        gen_length, steps, block_length, temperature, remasking, threshold, cache, cfg_scale: sampler
            settings (see ``dlm-align generate --help``).
        loop_detection: keyword arguments of :func:`align.rewards.detect_loops` used for ``loop_rate``
            (e.g. ``min_span`` for short completions).
        loop_guard: decode-time loop guard (:class:`align.sampling.loop_guard.LoopGuardConfig`: ``enabled``,
            ``penalty``, ``max_remasks``, ``detection``); off by default.
    """

    enabled: bool = True
    base: bool = True
    num_problems: int = 200
    batch_size: int = 64
    gen_length: int = 32
    steps: int = 32
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0
    loop_detection: dict[str, Any] = field(default_factory=dict)
    loop_guard: dict[str, Any] = field(default_factory=dict)


STAGES = ("pretrain", "sft", "grpo")


@dataclass
class RecipeConfig:
    """A whole recipe: model, data, optional LoRA, the stages to run, and evaluation.

    Attributes:
        seed: seeds data order, masks and sampling (through explicit generators).
        output_dir: run directory (checkpoints, ``report.json``).
        resume: when re-run into the same directory, skip finished stages and resume an interrupted stage
            from its last complete checkpoint.
        run_name: name shown by loggers; defaults to the output directory's name.
        report_to: loggers for training metrics (``none``, ``wandb``, ``tensorboard``, ``trackio``).
        stages: stages to run in order, from :data:`STAGES`.
        model, data, peft, eval: see the section classes.
        pretrain, sft: per-stage options: :class:`DiffusionSFTOptions` fields plus TrainingArguments fields.
        grpo: :class:`~align.trainers.grpo_config.GRPOOptions` fields plus TrainingArguments fields.
    """

    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = True
    run_name: str | None = None
    report_to: list[str] = field(default_factory=lambda: ["none"])
    stages: list[str] = field(default_factory=lambda: ["sft"])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)

    def stage_options(self, stage: str) -> tuple[Any, dict[str, Any]]:
        """Split a stage section into its own options (:class:`DiffusionSFTOptions` for pretrain/sft,
        :class:`~align.trainers.grpo_config.GRPOOptions` for grpo) and its TrainingArguments keywords."""
        raw = dict(getattr(self, stage))
        cls = _stage_class(stage)
        own = {f.name for f in dataclasses.fields(cls)}
        opts = _build(cls, {k: v for k, v in raw.items() if k in own}, stage)
        return opts, {k: v for k, v in raw.items() if k not in own}


def _stage_class(stage: str) -> type:
    if stage == "grpo":
        from align.trainers.grpo_config import GRPOOptions

        return GRPOOptions
    return DiffusionSFTOptions


# --------------------------------------------------------------------------------------------- building
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    name = f"{where}.{key}" if where else key
    if len(valid) > 30:  # a training stage: its own options plus every TrainingArguments field
        stage = where.split(".")[0]
        own = ", ".join(f.name for f in dataclasses.fields(_stage_class(stage)))
        return ConfigError(f"unknown key '{name}'{hint}: not a '{stage}' option ({own}) nor a "
                           "transformers.TrainingArguments field")
    return ConfigError(f"unknown key '{name}'{hint}; valid keys here: {', '.join(sorted(valid))}")



def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), names, where)
        path = f"{where}.{key}" if where else key
        tp = hints[key]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            target = tp if dataclasses.is_dataclass(tp) else inner[0]
            kwargs[key] = None if value is None and inner else _build(target, value, path)
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[key] = value
    return cls(**kwargs)


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


# Set by the trainer per stage; a recipe may not override them.
_MANAGED_TRAINING_ARGS = {"output_dir", "seed", "data_seed", "report_to", "run_name", "remove_unused_columns"}


def _check_training_arguments(stage: str, kwargs: dict[str, Any]) -> None:
    """Build ``TrainingArguments`` from a stage's keys so that bad values fail at load time."""
    import tempfile
    import warnings

    from transformers import TrainingArguments

    probe = {k: v for k, v in kwargs.items() if k != "deepspeed"}  # the DeepSpeed file is read at launch
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TrainingArguments(output_dir=tmp, use_cpu=True, **{k: v for k, v in probe.items() if k != "use_cpu"})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"'{stage}': invalid training arguments {sorted(probe)}: {exc}") from exc


def _zero_stage(ds: Any) -> int | None:
    """ZeRO stage of a DeepSpeed config (dict or JSON path); None when unset or unreadable."""
    import json

    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text())
        except (OSError, ValueError):
            return None
    if isinstance(ds, dict):
        return ds.get("zero_optimization", {}).get("stage")
    return None


def _check_loop_guard(section: Any, where: str) -> None:
    from align.sampling.loop_guard import LoopGuardConfig, LoopGuardConfigError

    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a mapping (enabled, penalty, max_remasks, detection)")
    try:
        LoopGuardConfig.from_dict(section, where)
    except (LoopGuardConfigError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _validate_grpo(cfg: RecipeConfig, opts: Any, ta_kwargs: dict[str, Any]) -> None:
    from align.trainers.grpo_config import check_grpo_options

    if "grpo" not in cfg.stages:
        return
    errs = check_grpo_options(opts, ta_kwargs)
    if errs:
        raise ConfigError(errs[0])
    from align.likelihood import check_estimator_args
    from align.rewards import RewardRunner

    _check_loop_guard(opts.loop_guard, "grpo.loop_guard")
    try:
        check_estimator_args(opts.estimator, opts.estimator_args)
    except ValueError as exc:
        raise ConfigError(f"'grpo.estimator_args': {exc}") from exc
    try:  # builds every reward (a reward-model path that does not exist fails here) and the runner
        RewardRunner.from_specs(opts.rewards, **opts.reward_failure).close()
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ConfigError(f"'grpo.rewards' / 'grpo.reward_failure': {exc}") from exc
    if cfg.data.task is None and cfg.data.format == "text":
        raise ConfigError("the 'grpo' stage needs prompts: 'data.format' cannot be 'text'")


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Check cross-field constraints; raise :class:`ConfigError` naming the offending key."""
    m = cfg.model
    if (m.path is None) == (m.init_config is None):
        raise ConfigError("set exactly one of 'model.path' (a checkpoint) and 'model.init_config' (random init)")
    if m.init_config is not None and m.tokenizer is None:
        raise ConfigError("'model.tokenizer' is required with 'model.init_config'")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"'model.dtype' must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"'model.attn_implementation' must be sdpa or eager, got {m.attn_implementation!r}")
    if not cfg.stages:
        raise ConfigError("'stages' is empty: name at least one of " + ", ".join(STAGES))
    for s in cfg.stages:
        if s not in STAGES:
            raise ConfigError(f"'stages' has unknown stage {s!r}; available: {', '.join(STAGES)}")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"'stages' lists a stage twice: {cfg.stages}")
    d = cfg.data
    if (d.task is None) == (d.train_files is None):
        raise ConfigError("set exactly one of 'data.task' (built-in task) and 'data.train_files'")
    if d.task is not None and d.task != "arithmetic":
        raise ConfigError(f"'data.task' {d.task!r} is not a built-in task; available: arithmetic")
    if d.task is None and d.task_args:
        raise ConfigError("'data.task_args' is set but 'data.task' is null")
    if d.format not in ("auto", "prompt_completion", "messages", "text"):
        raise ConfigError(f"'data.format' must be auto, prompt_completion, messages or text, got {d.format!r}")
    if d.max_length is not None and d.max_length < 2:
        raise ConfigError(f"'data.max_length' must be >= 2, got {d.max_length}")
    if d.task is not None:
        from align.data.task import ArithmeticTaskSpec

        allowed = {"num_train", "num_test", "seed"} | {f.name for f in dataclasses.fields(ArithmeticTaskSpec)}
        for k in d.task_args:
            if k not in allowed:
                raise _unknown(k, sorted(allowed), "data.task_args")
    if cfg.peft is not None:
        p = cfg.peft
        if p.r < 1:
            raise ConfigError(f"'peft.r' must be >= 1, got {p.r}")
        if not 0.0 <= p.lora_dropout < 1.0:
            raise ConfigError(f"'peft.lora_dropout' must be in [0, 1), got {p.lora_dropout}")
        if isinstance(p.target_modules, str) and p.target_modules != "auto":
            raise ConfigError(f"'peft.target_modules' must be 'auto' or a list of names, got {p.target_modules!r}")
        if "pretrain" in cfg.stages:
            raise ConfigError("'peft' cannot be combined with the 'pretrain' stage (LoRA on random weights)")
        for stage in cfg.stages:
            if _zero_stage(getattr(cfg, stage).get("deepspeed")) == 3:
                raise ConfigError(f"'peft' with DeepSpeed ZeRO-3 ('{stage}.deepspeed') is not supported: the adapter "
                                  "is merged at the end of the stage, which needs whole weights; use ZeRO-2")
    ta_names = _training_argument_names()
    for stage in STAGES:
        section = getattr(cfg, stage)
        if section and stage not in cfg.stages:
            raise ConfigError(f"section '{stage}' is set but '{stage}' is not in 'stages' {cfg.stages}")
        opts, rest = cfg.stage_options(stage)
        for k in rest:
            if k in _MANAGED_TRAINING_ARGS:
                raise ConfigError(f"'{stage}.{k}' is set by dlm-align from the recipe's top-level keys; remove it")
            if k not in ta_names:
                valid = sorted(ta_names | {f.name for f in dataclasses.fields(_stage_class(stage))})
                raise _unknown(k, valid, stage)
        if section and stage in cfg.stages:
            _check_training_arguments(stage, rest)
        if stage == "grpo":
            _validate_grpo(cfg, opts, rest)
            continue
        if not 0.0 <= opts.t_min < opts.t_max <= 1.0:
            raise ConfigError(f"'{stage}.t_min'/'{stage}.t_max' need 0 <= t_min < t_max <= 1")
        if not 0.0 <= opts.eps < 1.0:
            raise ConfigError(f"'{stage}.eps' must be in [0, 1), got {opts.eps}")
        if opts.normalization not in ("sequence", "token", "masked"):
            raise ConfigError(f"'{stage}.normalization' must be sequence, token or masked, got {opts.normalization!r}")
        if not (opts.eos_train in ("all", "none") or (isinstance(opts.eos_train, int) and opts.eos_train >= 0)):
            raise ConfigError(f"'{stage}.eos_train' must be all, none or an integer >= 0, got {opts.eos_train!r}")
        if not 0.0 <= opts.random_length_prob <= 1.0:
            raise ConfigError(f"'{stage}.random_length_prob' must be in [0, 1]")
        if opts.random_length_prob and stage != "pretrain":
            raise ConfigError(f"'{stage}.random_length_prob' only applies to the pretrain stage")
    e = cfg.eval
    if e.enabled:
        if e.num_problems < 1 or e.batch_size < 1:
            raise ConfigError("'eval.num_problems' and 'eval.batch_size' must be >= 1")
        from align.trainers.grpo_config import check_sampler_settings

        errs = check_sampler_settings("eval", gen_length=e.gen_length, steps=e.steps, block_length=e.block_length,
                                      temperature=e.temperature, remasking=e.remasking, threshold=e.threshold,
                                      cache=e.cache)
        if errs:
            raise ConfigError(errs[0])
        import inspect

        from align.rewards import detect_loops

        loop_params = set(inspect.signature(detect_loops).parameters) - {"completion_ids", "pad_ids"}
        for k in e.loop_detection:
            if k not in loop_params:
                raise _unknown(k, sorted(loop_params), "eval.loop_detection")
        _check_loop_guard(e.loop_guard, "eval.loop_guard")
        if d.task is None and d.eval_files is None:
            raise ConfigError("evaluation needs held-out rows: set 'data.eval_files' or use 'data.task', "
                              "or set 'eval.enabled: false'")
    for r in cfg.report_to:
        if r not in ("none", "wandb", "tensorboard", "trackio", "all"):
            raise ConfigError(f"'report_to' has unknown logger {r!r}; use none, wandb, tensorboard or trackio")
    return cfg


# --------------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (``["a", "b", "c"]``, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the raw recipe mapping (creating sections as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a mapping, with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    try:
        raw = yaml_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping at the top level, got {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict[str, Any], *, source: str = "recipe") -> RecipeConfig:
    """Build and validate a :class:`RecipeConfig`; errors are prefixed with ``source``."""
    try:
        return validate(_build(RecipeConfig, raw, ""))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a recipe file, apply ``key=value`` overrides, and validate the result."""
    raw = apply_overrides(load_recipe_dict(path), list(overrides or []))
    return config_from_dict(raw, source=str(path))


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe as plain data (written next to each run for reproducibility)."""
    return dataclasses.asdict(cfg)

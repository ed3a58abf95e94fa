"""The sections of a recipe, each a dataclass that checks its own fields when it is built.

Rules that involve one section only live in its ``__post_init__``; rules across sections live in
:func:`align.config.validate.validate`. Choice lists are imported from the modules that own them.
The stage sections (``pretrain``, ``sft``, ``grpo``) are mappings: their own options
(:class:`~align.trainers.sft_config.DiffusionSFTOptions`, :class:`~align.trainers.grpo_config.GRPOOptions`)
plus ``transformers.TrainingArguments`` fields, split by :meth:`RecipeConfig.stage_options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from align.config.schema import build_section, split_known, unknown_key
from align.data.checks import BAD_ROWS
from align.data.countdown import COUNTDOWN_FORMAT, COUNTDOWN_NUMBERS, COUNTDOWN_TARGET
from align.data.formatting import FORMATS
from align.data.loading import BUILTIN_TASKS
from align.data.task import ArithmeticTaskSpec
from align.models.adapters import DENOISER_KINDS
from align.models.llada import ATTN_IMPLEMENTATIONS
from align.models.loading import LORA_BIAS, LORA_INIT_UNSUPPORTED, LORA_INIT_WEIGHTS
from align.models.resolve import DTYPES
from align.options import FieldError, check_choice, check_range
from align.rewards.loop_reward import LoopPenalty
from align.sampling.settings import SamplerSettings
from align.trainers.grpo_config import GRPOOptions
from align.trainers.sft_config import DiffusionSFTOptions
from align.trainers.vrpo_config import VRPOOptions

#: stages a recipe may run, in the order they make sense, and the options class of each.
STAGE_OPTIONS: dict[str, type] = {"pretrain": DiffusionSFTOptions, "sft": DiffusionSFTOptions, "grpo": GRPOOptions,
                                   "vrpo": VRPOOptions}
STAGES = tuple(STAGE_OPTIONS)
#: loggers of training metrics (``all`` = every installed one, as in transformers).
REPORT_TO = ("none", "wandb", "tensorboard", "trackio", "all")
#: arguments of the built-in task besides the fields of :class:`~align.data.task.ArithmeticTaskSpec`.
TASK_SPLIT_ARGS = ("num_train", "num_test", "seed")


@dataclass
class ModelConfig:
    """Which model to start from.

    Attributes:
        path: the checkpoint: ``builtin:<name>`` (shipped with the package, e.g. ``builtin:quickstart-base``), a
            local directory in Hugging Face format, or a Hub id (``org/name``, read from the Hugging Face cache;
            ``HF_HUB_OFFLINE=1`` is honoured).
        adapter: how to load ``path``: ``auto`` (from its ``config.json``: LLaDA natively, Dream through
            :class:`~align.models.adapters.DreamAdapter`, any other masked LM through
            :class:`~align.models.adapters.MaskedLMAdapter`), or one of ``llada``, ``dream``, ``masked_lm``
            (see :func:`~align.models.adapters.load_denoiser`). With ``init_config`` only ``auto`` or ``llada``.
        init_config: instead of ``path``, build a randomly initialised native LLaDA model from these
            :class:`~align.models.LLaDAConfig` fields (used by pre-training recipes).
        tokenizer: tokenizer (same forms as ``path``); defaults to ``path``. ``builtin:arithmetic`` builds the
            embedded word-level tokenizer of the built-in task.
        mask_token_id: override the mask token id of the model config.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        attn_implementation: ``sdpa`` (default) or ``eager``.
        gradient_checkpointing: recompute activations in the backward pass.
    """

    path: str | None = None
    adapter: str = "auto"
    init_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    mask_token_id: int | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.init_config is None):
            raise FieldError("path", "or 'init_config': set exactly one (a checkpoint, or a random init)",
                             ("init_config",))
        if self.init_config is not None and self.tokenizer is None:
            raise FieldError("tokenizer", "is required with 'init_config'", ("init_config",))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        check_choice("adapter", self.adapter, DENOISER_KINDS)
        if self.init_config is not None and self.adapter not in ("auto", "llada"):
            raise FieldError("adapter", f"is {self.adapter!r}, but 'init_config' builds a native LLaDA model; "
                                        "use 'auto' or 'llada'", ("init_config",))


@dataclass
class DataConfig:
    """Where the training and evaluation rows come from.

    Attributes:
        task: a built-in task (``arithmetic``) providing train and held-out splits; or null to use files.
        task_args: arguments of the built-in task: ``num_train``, ``num_test``, ``seed`` and the difficulty
            fields of :class:`~align.data.task.ArithmeticTaskSpec`.
        train_files: local jsonl/json/parquet/csv training files (instead of ``task``).
        eval_files: local held-out files with an answer column (used by evaluation).
        format: ``auto``, ``prompt_completion``, ``messages`` or ``text`` (:mod:`align.data.formatting`), or
            ``countdown``: the rows of ``train_files`` and ``eval_files`` are Countdown problems, numbers in
            ``input`` (``"44,19,35"``), ``nums`` or ``numbers`` (a list) and the target in ``output`` or ``target``;
            each gets a ``prompt`` (the one ``dlm-align eval --format countdown`` writes) and an ``answer`` (the
            numbers and target as JSON, read by the ``countdown`` reward) beside its own columns, evaluation is
            scored by the ``countdown`` checker, and a row without integer numbers and target is a bad row
            (:mod:`align.data.countdown`). Only the ``grpo`` stage trains on Countdown rows, and the column names
            keep their defaults.
        prompt_column, completion_column, messages_column, text_column, answer_column: column names.
        use_chat_template: wrap prompts in the tokenizer's chat template.
        max_length: longest row in tokens (SFT and pre-training: prompt + completion; GRPO: the prompt; VRPO: the
            prompt + the longer response). Rows are never truncated: a longer row is a bad row (``bad_rows``).
        system_prompt: a system message put in front of every prompt (SFT, GRPO and evaluation alike;
            :func:`~align.data.formatting.add_system_prompt`): before the messages of a conversational prompt,
            and before a string prompt, which becomes the user message. Without a chat template the messages are
            joined by newlines, so it is the prompt's first line. Rewards see it in conversational prompts only
            (string prompts reach them as the dataset's strings). A row that already has a system message is an
            error. Not allowed with ``format: text`` (no prompts).
        bad_rows: what to do with bad rows, found before training by checking every row of the files (malformed
            JSON lines; missing, null, empty or whitespace-only, or wrongly typed fields; rows over ``max_length``;
            preference pairs whose chosen equals rejected): ``strict`` (default) stops before any model is loaded,
            listing every one with its file, line or row, field and reason; ``skip`` leaves them out, logs the counts
            by kind, and the stages train on the rest (:mod:`align.data.checks`).
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
    system_prompt: str | None = None
    bad_rows: str = "strict"

    def __post_init__(self) -> None:
        check_choice("bad_rows", self.bad_rows, BAD_ROWS)
        if (self.task is None) == (self.train_files is None):
            raise FieldError("task", "or 'train_files': set exactly one (a built-in task, or local files)",
                             ("train_files",))
        if self.task is not None:
            check_choice("task", self.task, BUILTIN_TASKS)
            allowed = sorted({*TASK_SPLIT_ARGS, *(f.name for f in dataclasses.fields(ArithmeticTaskSpec))})
            for k in self.task_args:
                if k not in allowed:
                    raise FieldError(f"task_args.{k}", f"is not an argument of task {self.task!r}; "
                                                       f"valid: {', '.join(allowed)}")
        elif self.task_args:
            raise FieldError("task_args", "is set but 'task' is null", ("task",))
        check_choice("format", self.format, (*FORMATS, COUNTDOWN_FORMAT))
        if self.format == COUNTDOWN_FORMAT:
            self._check_countdown()
        if self.max_length is not None and self.max_length < 2:
            raise FieldError("max_length", f"must be >= 2, got {self.max_length}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise FieldError("system_prompt", "is empty; leave it unset (null) for no system prompt")
        if self.system_prompt is not None and self.format == "text":
            raise FieldError("system_prompt", "cannot apply with 'format' text: plain-text rows have no prompt",
                             ("format",))

    def _check_countdown(self) -> None:
        """Countdown rows come from files, and their prompt and answer columns are built, not named."""
        if self.task is not None:
            raise FieldError("format", f"is 'countdown', which reads Countdown rows from 'train_files' and "
                                       f"'eval_files'; the built-in task {self.task!r} has its own rows", ("task",))
        for f in dataclasses.fields(self):
            if f.name.endswith("_column") and getattr(self, f.name) != f.default:
                raise FieldError(f.name, "does not apply with 'format' countdown: the prompt and the answer are built "
                                         f"from the numbers ({', '.join(COUNTDOWN_NUMBERS)}) and the target "
                                         f"({', '.join(COUNTDOWN_TARGET)}); remove it", ("format",))


@dataclass
class PeftConfig:
    """LoRA adapter settings (``peft: null`` trains all weights); the options are PEFT's ``LoraConfig`` fields.

    Attributes:
        r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        target_modules: ``auto`` (the body's linear layers by full module name, so the output head is never
            adapted; LLaDA: every block's q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out), a list of
            names (PEFT matches a name or a ``.``-suffix of a full name) or a regular expression matched against
            full names. Names and patterns that match no module are an error when the model is built.
        exclude_modules: names or a regular expression of modules to leave without an adapter (same matching).
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``model.transformer.ff_out``,
            LLaDA's output head); PEFT matches them by name suffix.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output feature besides the update.
        init_lora_weights: ``true`` (B = 0, the adapter starts as a no-op), ``false`` (random A and B),
            ``gaussian`` or ``orthogonal`` (needs an even ``r``). PEFT's initialisations that rewrite the base weights
            or need an extra pass over data (pissa, olora, corda, eva, lora_ga, loftq) are rejected.
        bias: ``none``, ``all`` (train every bias) or ``lora_only`` (the biases of the adapted layers).
        merge: merge the adapter into the weights at the end of each stage.

    At the end of each stage the adapter is saved alone (``<stage>/adapter``, with the tokenizer). With ``merge: true``
    it is then merged: ``<stage>/final`` holds the merged model and tokenizer, and evaluation and later stages use the
    merged model (a later stage trains a new adapter on it). With ``merge: false`` no merged weights are written:
    ``<stage>/final`` holds a copy of the adapter (no ``config.json``, no model weights), evaluation uses the model
    with the adapter applied, in process, and a later stage keeps training the same adapter (its GRPO reference, the
    model with the adapter disabled, is then the base model). ``dlm-align merge`` merges a saved adapter later.
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "auto"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    merge: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise FieldError("r", f"must be >= 1, got {self.r}")
        check_range("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_range("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.target_modules == "all-linear":
            raise FieldError("target_modules", "'all-linear' is not accepted: use 'auto' (every linear layer of the "
                                               "body by full name, output head excluded)")
        if self.target_modules != "auto":
            _check_module_names("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_module_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            _check_module_names("modules_to_save", self.modules_to_save)
        self._check_init()
        check_choice("bias", self.bias, LORA_BIAS)

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, str) and init not in LORA_INIT_WEIGHTS:
            family = "pissa" if init.startswith("pissa") else init
            if family in LORA_INIT_UNSUPPORTED:
                raise FieldError("init_lora_weights", f"{init!r} is not supported: it {LORA_INIT_UNSUPPORTED[family]}")
            shown = ", ".join(str(v).lower() if isinstance(v, bool) else v for v in LORA_INIT_WEIGHTS)
            raise FieldError("init_lora_weights", f"must be one of {shown}, got {init!r}")
        if init == "orthogonal" and self.r % 2:
            raise FieldError("init_lora_weights", f"'orthogonal' needs an even 'r', got r={self.r}", ("r",))


def _check_module_names(key: str, value: list[str] | str) -> None:
    """A non-empty list of non-empty module names, or a valid regular expression."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise FieldError(key, f"is not a valid regular expression ({err}): {value!r}") from None
        return
    if not value:
        raise FieldError(key, "is an empty list: name at least one module (or remove the key)")
    blank = [i for i, name in enumerate(value) if not name.strip()]
    if blank:
        raise FieldError(key, f"has an empty name at position {blank[0]}")


#: ``loop_penalty`` arguments that shape a reward rather than detect loops (not evaluation settings).
_NOT_DETECTION = {"pad_ids", "shaping", "threshold", "scale"}


def _loop_detection_keys() -> list[str]:
    return sorted(set(inspect.signature(LoopPenalty).parameters) - _NOT_DETECTION)


@dataclass
class EvalConfig(SamplerSettings):
    """Held-out evaluation after each stage (accuracy, completion length, loop rate), with the rollout sampler.

    Attributes:
        enabled: evaluate at all.
        base: also evaluate the starting model (stage ``base``).
        num_problems: held-out problems scored (taken from the start of the test split).
        batch_size: prompts per sampler call.
        gen_length, denoising_steps, block_length, temperature, remasking, threshold, cache, cfg_scale,
            loop_guard: sampler settings (:class:`align.sampling.settings.SamplerSettings`; greedy by default).
        loop_detection: settings of the detector behind ``loop_rate``, the same as ``loop_penalty``'s (minus its
            shaping): ``source`` (``text``, the default, or ``ids`` or ``both``), the text path's settings
            (``min_block_words``, ``word_min_span``, ...) and the token-id path's (``min_span``, ``copy_min_span``,
            ...). Each sample records ``loop_fraction`` (from ``source``) and both paths' ``loop_fraction_text``
            and ``loop_fraction_ids``.
    """

    enabled: bool = True
    base: bool = True
    num_problems: int = 200
    batch_size: int = 64
    loop_detection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_problems < 1:
            raise FieldError("num_problems", f"must be >= 1, got {self.num_problems}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        valid = _loop_detection_keys()
        for k in self.loop_detection:
            if k not in valid:
                raise FieldError(f"loop_detection.{k}", f"is not a loop-detection setting; valid: {', '.join(valid)}")
        try:
            self.loop_detector()
        except (TypeError, ValueError) as err:
            raise FieldError("loop_detection", str(err).removeprefix("loop_penalty: ")) from err

    def loop_detector(self, pad_ids: tuple[int, ...] = ()) -> LoopPenalty:
        """The detector behind ``loop_rate`` (``source`` defaults to the text path)."""
        return LoopPenalty(**{"source": "text", **self.loop_detection}, pad_ids=pad_ids)


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
        model, data, peft, eval: see the section classes (``model`` is required).
        pretrain, sft: per-stage options: :class:`~align.trainers.sft_config.DiffusionSFTOptions` fields plus
            TrainingArguments fields.
        grpo: :class:`~align.trainers.grpo_config.GRPOOptions` fields plus TrainingArguments fields.
        vrpo: :class:`~align.trainers.vrpo_config.VRPOOptions` fields plus TrainingArguments fields.
    """

    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = True
    run_name: str | None = None
    report_to: list[str] = field(default_factory=lambda: ["none"])
    stages: list[str] = field(default_factory=lambda: ["sft"])
    model: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    vrpo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            raise FieldError("model", "is required: set 'model.path' (builtin:<name>, a directory or a Hub id) "
                                      "or 'model.init_config'")
        if not self.stages:
            raise FieldError("stages", f"is empty: name at least one of {', '.join(STAGES)}")
        for s in self.stages:
            check_choice("stages", s, STAGES)
        if len(set(self.stages)) != len(self.stages):
            raise FieldError("stages", f"lists a stage twice: {self.stages}")
        for r in self.report_to:
            check_choice("report_to", r, REPORT_TO)

    def stage_options(self, stage: str) -> tuple[Any, dict[str, Any]]:
        """Split a stage section into its own options (:data:`STAGE_OPTIONS`) and its TrainingArguments keywords;
        the options are built (and so checked), with errors naming ``<stage>.<key>``."""
        cls = STAGE_OPTIONS[stage]
        own, rest = split_known(cls, dict(getattr(self, stage)))
        return build_section(cls, own, stage), rest


def stage_unknown_key(stage: str, key: str, valid: list[str]) -> Exception:
    """The error for a key of a stage section that is neither a stage option nor a TrainingArguments field."""
    own = ", ".join(f.name for f in dataclasses.fields(STAGE_OPTIONS[stage]))
    return unknown_key(key, valid, stage, valid_hint=f"not a '{stage}' option ({own}) nor a "
                                                       "transformers.TrainingArguments field")

"""``dlm-align eval``: evaluate one or more checkpoints on a task and write every number with how it was made.

Checkpoints (``--model SPEC``, repeatable, or positional; ``NAME=SPEC`` names one): ``builtin:<name>``, a checkpoint
directory, a Hub id ``org/name[@revision]``, or a LoRA adapter directory (``adapter_config.json``; its base is the
model it names, or ``--base``). Problems come from one source:

- ``--task builtin:arithmetic``: the built-in task with the quickstart recipe's ``data`` and ``eval`` sections;
- ``--recipe R``: the ``data`` and ``eval`` sections of a recipe (its held-out split, read as the run reads it);
- ``--run DIR``: a run directory: its ``recipe.yaml`` and, unless ``--model`` is given, the starting model (when the
  recipe evaluates it) and every stage's ``final``, named after the stages;
- ``--data FILE``: a local JSONL/JSON/CSV/Parquet file in a ``--format``: ``gsm8k`` (``question``, ``answer`` with
  ``#### X``), ``math`` (``problem``, ``solution`` with ``\\boxed{X}``), ``countdown`` (``input`` numbers
  ``"3,5,7"``, ``output`` target) or ``plain`` (``--prompt-column``, ``--answer-column``).

Completions are scored by ``--checker`` (:func:`align.evaluate.build_checker`). Sampler flags take the names of a
recipe's ``eval`` keys and override the recipe's values. Under ``torchrun`` the ranks split the problems
(:func:`align.evaluate.evaluate_sharded`) and rank 0 writes ``--out``: ``<name>.jsonl`` (every completion) and
``eval.json`` (every number, paired tests against the first checkpoint, and the full record of settings, data,
hardware and versions). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from align.cli.eval_problems import (
    DATA_FORMATS,
    Checkpoint,
    EvalUsageError,
    _load_recipe,
    load_problems,
)
from align.cli.eval_record import comparisons, environment, format_eval_table, model_entry

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  dlm-align eval --run runs/quickstart --out runs/quickstart/eval-again
  dlm-align eval --task builtin:arithmetic --model builtin:quickstart-base --num-problems 100 --out out/
  dlm-align eval --recipe quickstart runs/quickstart/sft/final runs/quickstart/grpo/final --out out/
  dlm-align eval --model GSAI-ML/LLaDA-8B-Instruct --data gsm8k_test.jsonl --format gsm8k \\
      --gen-length 256 --denoising-steps 256 --block-length 8 --batch-size 16 --out out/gsm8k
  torchrun --nproc_per_node 8 -m align.cli eval --model ckpt --data test.jsonl --format math --out out/math
"""

#: Sampler and evaluation flags: recipe ``eval`` key -> type (the flag is the key with '-' for '_').
SAMPLER_FLAGS: dict[str, Any] = {"gen_length": int, "denoising_steps": int, "block_length": int,
                                 "temperature": float, "remasking": str, "threshold": float, "cache": str,
                                 "cfg_scale": float, "batch_size": int, "num_problems": int}




def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command on ``subparsers`` and return its parser."""
    from align.evaluate import CHECKERS
    from align.models.resolve import DTYPES
    from align.sampling import REMASKING

    p = subparsers.add_parser(
        "eval", help="evaluate checkpoints on a task: accuracy with 95%% intervals, paired tests, every completion",
        description="Evaluate one or more checkpoints on a task with the rollout sampler and write every number, "
                    "every completion and how they were made (eval.json) to --out. Sampler flags override a "
                    "recipe's eval section. Under torchrun the ranks split the problems.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="SPEC", help="checkpoints to evaluate (as --model)")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]SPEC",
                   help="a checkpoint: builtin:<name>, a directory, a Hub id org/name[@revision], or a LoRA adapter "
                        "directory (repeatable; the first is the reference of the paired tests)")
    p.add_argument("--base", default=None, metavar="SPEC",
                   help="base model of adapter directories (default: base_model_name_or_path of adapter_config.json)")
    src = p.add_argument_group("task (one of)")
    src.add_argument("--task", default=None, metavar="builtin:NAME",
                     help="a built-in task (builtin:arithmetic) with the quickstart recipe's data and eval settings")
    src.add_argument("--recipe", default=None, help="take data and eval sections from this recipe (name or YAML)")
    src.add_argument("--run", default=None, metavar="DIR",
                     help="a run directory: its recipe.yaml, and (without --model) its base model and every "
                          "stage's final")
    src.add_argument("--data", default=None, metavar="FILE", help="a local .jsonl/.json/.csv/.parquet file of problems")
    d = p.add_argument_group("data files")
    d.add_argument("--format", default="plain", choices=DATA_FORMATS,
                   help="row format of --data: plain (--prompt-column, --answer-column), gsm8k (question, answer "
                        "'... #### X'), math (problem, solution with \\boxed{X}), countdown (input '3,5,7', output "
                        "target) (default plain)")
    d.add_argument("--prompt-column", default=None, help="prompt column of --data (default from --format)")
    d.add_argument("--answer-column", default=None, help="reference-answer column of --data (default from --format)")
    d.add_argument("--split", default="test", help="name of the split --data holds, for the record (default test)")
    d.add_argument("--checker", default=None,
                   help=f"how a completion is scored: {', '.join(CHECKERS)}, or a reward of align.rewards by name "
                        "or package.module:callable (correct when it is at least 1); default: the format's "
                        "(math_accuracy; countdown for --format countdown)")
    d.add_argument("--system-prompt", default=None, help="a system message before every prompt")
    d.add_argument("--raw", action="store_true", help="encode prompts as plain text, without the chat template")
    d.add_argument("--shots", type=int, default=None,
                   help="few-shot examples before each prompt: the first N rows of the train split (--task, "
                        "--recipe, --run) or of --fewshot-file (default 0)")
    d.add_argument("--fewshot-file", default=None, metavar="FILE",
                   help="rows to take the --shots examples from (same columns as the problems; the solution is "
                        "the 'completion' column, else the answer column)")
    s = p.add_argument_group("sampler (default: the recipe's eval section, else its defaults)")
    s.add_argument("--gen-length", type=int, default=None, help="generated tokens per problem")
    s.add_argument("--denoising-steps", type=int, default=None, help="denoising steps over the whole completion")
    s.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--remasking", default=None, choices=REMASKING, help="which positions are committed first")
    s.add_argument("--threshold", type=float, default=None, help="commit every position above this confidence")
    s.add_argument("--cache", default=None, choices=["none", "prefix", "dual"], help="block KV cache")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--batch-size", type=int, default=None, help="problems per sampler call")
    s.add_argument("--num-problems", type=int, default=None,
                   help="problems evaluated, from the start of the split (default: the recipe's eval.num_problems; "
                        "every row of --data)")
    s.add_argument("--seed", type=int, default=None, help="sampler seed (default: the recipe's seed, else 0)")
    o = p.add_argument_group("output and device")
    o.add_argument("--out", default="runs/eval", metavar="DIR", help="output directory (default runs/eval)")
    o.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default; cuda:LOCAL_RANK)")
    o.add_argument("--dtype", default=None, choices=["auto", *DTYPES],
                   help="weights dtype (default: the recipe's model.dtype; auto: bfloat16 on CUDA, float32 on CPU)")
    p.set_defaults(func=run_eval_command)
    return p


# ---------------------------------------------------------------------------------------------------------------
# What is evaluated
# ---------------------------------------------------------------------------------------------------------------

















def eval_settings(args: argparse.Namespace, cfg: Any, num_rows: int | None) -> Any:
    """The recipe's ``eval`` section (or its defaults) with the sampler flags applied, validated.

    Raises:
        ConfigError: a value the sampler cannot use, naming the flag and the recipe key.
    """
    from align.config import ConfigError, EvalConfig
    from align.options import FieldError

    base = cfg.eval if cfg is not None else EvalConfig()
    values = dataclasses.asdict(base)
    if num_rows is not None and (cfg is None or num_rows < values["num_problems"]):
        values["num_problems"] = num_rows
    for key in SAMPLER_FLAGS:
        flag = getattr(args, key)
        if flag is not None:
            values[key] = None if (key == "cache" and flag == "none") else flag
    values["enabled"] = True
    try:
        return EvalConfig(**values)
    except FieldError as err:
        flag = "--" + err.key.split(".")[0].replace("_", "-")
        raise ConfigError(f"sampler settings: {err} (flag {flag}, recipe key eval.{err.key})") from err


def _name_of(spec: str) -> str:
    parts = [p for p in re.split(r"[/\\]", spec.removeprefix("builtin:").rstrip("/")) if p]
    tail = parts[-2:] if len(parts) >= 2 and parts[-1] in ("final", "adapter") else parts[-1:]
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", "-".join(tail)) or "model"


def checkpoints(args: argparse.Namespace, cfg: Any, dtype: str) -> list[Checkpoint]:
    """The checkpoints to evaluate, in order (the first is the reference of the paired tests)."""
    from align.config import ModelConfig

    given = [*args.models, *args.model]
    out: list[Checkpoint] = []
    seed = cfg.seed if cfg is not None else 0
    if not given and args.run:
        run = Path(args.run)
        if cfg.eval.base:
            out.append(Checkpoint("base", cfg.model.path or "model.init_config",
                                  dataclasses.replace(cfg.model, dtype=dtype, gradient_checkpointing=False), seed=seed))
        for stage in cfg.stages:
            final = run / stage / "final"
            if final.is_dir():
                out.append(_checkpoint(stage, str(final), cfg, dtype, args.base, seed))
            else:
                logger.warning("%s: no %s (stage not finished); left out", args.run, final)
        if not out:
            raise EvalUsageError(f"--run {args.run}: no finished stage to evaluate")
        return out
    if not given:
        raise EvalUsageError("no checkpoint: pass --model SPEC (or SPEC), or --run DIR")
    taken: set[str] = set()
    for item in given:
        name, sep, spec = item.partition("=")
        if not sep or "/" in name or not name:
            name, spec = _name_of(item), item
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}-{k}", k + 1
        taken.add(unique)
        out.append(_checkpoint(unique, spec, cfg, dtype, args.base, seed))
    if cfg is None:
        for c in out:
            if c.model_cfg is None:
                c.model_cfg = ModelConfig(path=c.spec, dtype=dtype)
    return out


def _checkpoint(name: str, spec: str, cfg: Any, dtype: str, base: str | None, seed: int) -> Checkpoint:
    """A checkpoint loaded as the recipe's model would be (its adapter kind, attention), or an adapter directory on
    its base model."""
    from align.config import ModelConfig

    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from align.cli.merge import adapter_base_spec, read_adapter_config

        base_spec = base or adapter_base_spec(read_adapter_config(path))
        if base_spec is None:
            raise EvalUsageError(f"{spec}/adapter_config.json names no base model; pass --base SPEC")
        model_cfg = ModelConfig(path=base_spec, dtype=dtype) if cfg is None else dataclasses.replace(
            cfg.model, path=base_spec, init_config=None, tokenizer=None, mask_token_id=None, dtype=dtype,
            gradient_checkpointing=False)
        return Checkpoint(name, spec, model_cfg, adapter=path, seed=seed)
    if cfg is None:
        return Checkpoint(name, spec, ModelConfig(path=spec, dtype=dtype), seed=seed)
    return Checkpoint(name, spec, dataclasses.replace(cfg.model, path=spec, init_config=None, tokenizer=None,
                                                      mask_token_id=None, dtype=dtype, gradient_checkpointing=False),
                      seed=seed)


def load_checkpoint(ckpt: Checkpoint, device: Any) -> tuple[Any, Any]:
    """Model (in eval mode, on ``device``) and tokenizer of ``ckpt``; an adapter is applied unmerged, as a run's
    ``peft.merge: false`` stage evaluates it."""
    from align.build import build_model_and_tokenizer, build_tokenizer
    from align.models.resolve import TOKENIZER_FILES

    model, tokenizer = build_model_and_tokenizer(ckpt.model_cfg, seed=ckpt.seed)
    if ckpt.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(ckpt.adapter))
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"adapter {ckpt.adapter} does not apply to its base {ckpt.model_cfg.path}: {err}") from err
        if any((ckpt.adapter / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = build_tokenizer(str(ckpt.adapter))
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Running and writing
# ---------------------------------------------------------------------------------------------------------------







def _device(spec: str) -> Any:
    import torch

    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _init_distributed(device: Any) -> tuple[int, int, bool]:
    """Join the process group of ``torchrun`` (WORLD_SIZE > 1); ``(rank, world size, whether it was started here)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True








def _write(out: Path, record: dict[str, Any], results: dict[str, Any]) -> None:
    from align.pipeline.report import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, r in enumerate(res.samples):
                f.write(json.dumps({"index": i, **r}, ensure_ascii=False) + "\n")
    write_json_atomic(out / "eval.json", record)


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``dlm-align eval``; returns the exit status (2 for bad flags, data or checkpoints)."""
    from align.config import ConfigError
    from align.data.formatting import DataFormatError
    from align.evaluate import build_checker, evaluate_sharded

    sources = [f for f in ("task", "recipe", "run", "data") if getattr(args, f)]
    try:
        if len(sources) != 1 and sources != ["run", "data"] and sources != ["recipe", "data"]:
            raise EvalUsageError("name one task: --task, --recipe, --run or --data"
                                 + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
        loaded = _load_recipe(args)
        cfg, recipe = loaded if loaded is not None else (None, None)
        data_cfg = None if args.data else cfg
        device = _device(args.device)
        dtype = args.dtype or (cfg.model.dtype if cfg is not None else "auto")
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        problems = load_problems(args, data_cfg, recipe)
        settings = eval_settings(args, cfg, len(problems.prompts) if args.data else None)
        problems.prompts = problems.prompts[:settings.num_problems]
        problems.answers = problems.answers[:settings.num_problems]
        problems.record["num_problems"] = len(problems.prompts)
        checker = build_checker(problems.checker)
        seed = args.seed if args.seed is not None else (cfg.seed if cfg is not None else 0)
        models = checkpoints(args, cfg, dtype)
    except (EvalUsageError, ConfigError, DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, world, started = _init_distributed(device)
    record: dict[str, Any] = {
        "command": shlex.join(sys.argv), "cwd": os.getcwd(),
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": problems.record, "shots": problems.shots, "sampler": dataclasses.asdict(settings), "seed": seed,
        "environment": environment(device, dtype, world), "models": {}}
    results: dict[str, Any] = {}
    try:
        for ckpt in models:
            model, tokenizer = load_checkpoint(ckpt, device)
            res = evaluate_sharded(model, tokenizer, problems.prompts, problems.answers, settings,
                                   use_chat_template=problems.use_chat_template, seed=seed, desc=f"eval {ckpt.name}",
                                   checker=checker)
            results[ckpt.name] = res
            record["models"][ckpt.name] = model_entry(ckpt, res)
            del model
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    record["comparisons"] = comparisons(results)
    if rank == 0:
        out = Path(args.out)
        _write(out, record, results)
        print(format_eval_table(record))
        print(f"eval: {out / 'eval.json'}")
    return 0

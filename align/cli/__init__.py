"""The ``dlm-align`` command line: run, validate, list and copy recipes; generate with a model."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

EPILOG = """examples:
  dlm-align ls                                   list shipped recipes
  dlm-align validate quickstart                  check a recipe, its paths and rows; plan and memory per GPU
  dlm-align run quickstart                       run a shipped recipe
  dlm-align run my.yaml sft.learning_rate=1e-4   run a file with overrides (key.sub=value, YAML values)
  dlm-align run quickstart --nproc 2              run on 2 processes (torchrun; one per GPU, gloo on CPU)
  dlm-align run --restart quickstart sft.max_steps=300
                                                 run again, replacing a run of another recipe in output_dir
  dlm-align cp quickstart my.yaml                copy a shipped recipe to edit it
  dlm-align generate --model runs/quickstart/sft/final --prompts prompts.txt
  dlm-align report runs/quickstart               rebuild a run's report.md and plots
  dlm-align eval --run runs/quickstart --out runs/quickstart/eval-again
                                                 evaluate a run's checkpoints again, every setting recorded
  dlm-align lm-eval --model dlm-align --model_args pretrained=runs/quickstart/grpo/final --tasks T --include_path D
                                                 an lm-evaluation-harness task on a checkpoint
"""


def _cmd_ls(args: argparse.Namespace) -> int:
    from align.recipes import list_recipes, recipe_description, recipe_path

    names = list_recipes()
    width = max((len(n) for n in names), default=10)
    for n in names:
        print(f"{n:<{width}}  {recipe_description(recipe_path(n))}")
    return 0


def _cmd_cp(args: argparse.Namespace) -> int:
    from align.recipes import recipe_path

    src = recipe_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.name} to {dest}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from align.cli.launch import LaunchError, launch, plan_from_args, run_args_of
    from align.config import load_config
    from align.pipeline import run_recipe
    from align.recipes import recipe_path

    try:
        plan = plan_from_args(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = load_config(recipe_path(args.recipe), args.overrides)   # a bad recipe fails here, once, before a launch
    if not plan.in_process:
        return launch(plan, run_args_of(args), verbose=args.verbose)
    from align.trainers.checkpoints import TrainingStopped

    try:
        run_recipe(cfg, restart=args.restart, restart_from=args.restart_from)
    except TrainingStopped as exc:
        print(f"{exc}: dlm-align run {' '.join([args.recipe, *args.overrides])}", file=sys.stderr)
        _close_process_group()
        return 143                                             # 128 + SIGTERM, as a shell reports it
    except (RuntimeError, MemoryError) as exc:
        message = _run_failure(cfg, exc, args.recipe)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    _close_process_group()
    return 0


def _run_failure(cfg: object, exc: BaseException, recipe: str) -> str | None:
    """The message for a run that ran out of memory, had too many non-finite steps or sampled non-finite logits
    (the traceback adds nothing to it); None for any other error."""
    from align.pipeline.oom import is_out_of_memory, out_of_memory_message
    from align.sampling import NonFiniteLogitsError
    from align.trainers.guards import NonFiniteLossError

    if is_out_of_memory(exc):
        return out_of_memory_message(cfg, exc, recipe)
    if isinstance(exc, (NonFiniteLossError, NonFiniteLogitsError)):
        return str(exc)
    return None


def _close_process_group() -> None:
    """Under torchrun / deepspeed / accelerate: wait for every rank, then close the process group.

    Ranks that leave with the group still open can tear down its communication threads while a peer
    still uses them (the peer then aborts), so a finished run closes it explicitly.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dlm-align`` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="dlm-align", description="Align masked diffusion language models: SFT, preference optimization "
        "and diffusion policy optimization, driven by YAML recipes.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run a recipe (shipped name or YAML path) with key=value overrides")
    p.add_argument("recipe", help="shipped recipe name (see `dlm-align ls`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. sft.max_steps=100 eval.enabled=false")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--restart", action="store_true",
                       help="delete the results of an earlier run in output_dir (recipe.yaml, report.json, eval/, "
                       "every stage folder) and run every stage again; without it a run whose recipe differs from "
                       "the stored one in keys a kept result depends on stops and names them")
    again.add_argument("--restart-from", metavar="STAGE",
                       help="keep the stages before STAGE, delete the results of STAGE and of the stages after it "
                       "(their folders, evaluations and report entries) and run them again")
    from align.cli.launch import add_launch_arguments

    add_launch_arguments(p)
    p.set_defaults(func=_cmd_run)

    from align.cli.validate import add_validate_parser

    add_validate_parser(sub)

    p = sub.add_parser("ls", help="list the shipped recipes")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("cp", help="copy a shipped recipe to a file to edit")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_cp)

    try:
        from align.cli.generate import add_generate_parser
    except ImportError:  # pragma: no cover - the sampler is part of the package
        add_generate_parser = None
    if add_generate_parser is not None:
        add_generate_parser(sub)

    from align.cli.merge import add_merge_parser

    add_merge_parser(sub)

    from align.cli.eval import add_eval_parser

    add_eval_parser(sub)

    from align.cli.report import add_report_parser

    add_report_parser(sub)

    sub.add_parser("lm-eval", add_help=False, help="run lm-evaluation-harness with the 'dlm-align' model registered "
                   "(the [eval] extra); every argument after 'lm-eval' goes to lm-eval unchanged, e.g. dlm-align "
                   "lm-eval --model dlm-align --model_args pretrained=builtin:quickstart-base --tasks T "
                   "--include_path D")
    return parser


def _lm_eval(argv: list[str]) -> int:
    """``dlm-align lm-eval ARGS``: lm-eval's own command line, with the ``dlm-align`` model registered."""
    from align.integrations.lm_eval import main as lm_eval_main

    try:
        return int(lm_eval_main(argv) or 0)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dlm-align`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        return _lm_eval(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from align.config import ConfigError
    from align.data.formatting import DataFormatError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

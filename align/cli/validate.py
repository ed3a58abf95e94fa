"""``dlm-align validate``: answer the questions of a big run before it starts.

Loads and checks the recipe (keys, types, rules across sections), then, without loading a model: every input
path (model, tokenizer, data files, DeepSpeed / accelerate / FSDP JSON files, reward models), the data rows
(tokenised as the stages will tokenise them; a bad row is named with its file and row), and prints the plan:
world size, batch sizes per device and per optimizer step, the launch commands, and a per-GPU memory estimate
of each stage. Every problem is listed; the exit status is non-zero when there is one.
"""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  dlm-align validate quickstart
  dlm-align validate llada/sft-lora data.train_files=[/data/sft.jsonl] --nproc 8
  dlm-align validate illada/sft data.train_files=[/data/sft.jsonl] --nproc 8 --nnodes 2
"""


def add_validate_parser(sub: Any) -> None:
    """Register ``validate`` on the ``dlm-align`` subparsers."""
    p = sub.add_parser("validate", help="check a recipe, its paths and rows, and print the plan and memory per GPU",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="shipped recipe name (see `dlm-align ls`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.train_files=[/data/sft.jsonl]")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes (GPUs) per node; default: the GPUs visible here, or 1")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    p.set_defaults(func=run_validate)


def _gib(x: float) -> str:
    return f"{x / (1 << 30):.2f} GiB"


def _tokenizer(cfg: Any, checks: list[Any], problems: list[str]) -> tuple[Any | None, str]:
    """The recipe's tokenizer when it is on this machine (nothing is downloaded), and a note."""
    from align.build import build_tokenizer
    from align.config.paths import cache_only

    key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.path"
    check = next((c for c in checks if c.key == key), None)
    if check is None or check.status != "ok":
        return None, f"{key} is not on this machine"
    try:
        with cache_only():
            return build_tokenizer(check.value), ""
    except (OSError, ValueError) as err:
        problems.append(f"{key}: the tokenizer does not load: {err}")
        return None, "the tokenizer does not load"


def _data(cfg: Any, checks: list[Any], tokenizer: Any, note: str, problems: list[str]) -> dict[str, Any]:
    """Check the rows (see :func:`align.pipeline.recipe.check_data`); print what was found."""
    from align.data.checks import BadRowsError
    from align.data.formatting import DataFormatError
    from align.pipeline.recipe import check_data

    print("\ndata:")
    if any(c.problem for c in checks if c.key.startswith("data.")):
        print("  rows not read: data files are missing")
        return {}
    try:
        _, _, stats = check_data(cfg, tokenizer)
    except BadRowsError as err:                       # every bad row, as `dlm-align run` reports them
        problems.append(f"data: {len(err.problems)} bad row(s) of {err.total} (listed above; data.bad_rows: strict)")
        print("  BAD ROWS  " + str(err).replace("\n", "\n  "))
        return {}
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        problems.append(f"data: {err}")
        print(f"  BAD ROW  {err}")
        return {}
    for stage, s in stats.items():
        sample = f" (first {s.checked} of {s.rows})" if s.checked < s.rows else ""
        bad = ", ".join(f"{n} {kind}" for kind, n in s.bad.items())
        left_out = f"; left out (data.bad_rows: skip): {bad}" if bad else ""
        if s.longest is None:
            print(f"  {stage}: {s.kept} of {s.checked} rows{sample} have the right shape{left_out}; not tokenised: "
                  f"{note}")
        else:
            what = {"grpo": "prompt", "vrpo": "prompt + longer response"}.get(stage, "prompt + completion")
            print(f"  {stage}: {s.kept} of {s.checked} rows{sample} kept{left_out}; longest {what} {s.longest} tokens")
    return stats


def _memory(cfg: Any, stage: str, arch: Any, world: int, stats: dict[str, Any]) -> None:
    from align.memory import human_count, param_count
    from align.pipeline.plan import ESTIMATED_STAGES, stage_memory

    if stage not in ESTIMATED_STAGES:
        print(f"\nmemory per GPU, stage {stage}: not estimated (estimated stages: {', '.join(ESTIMATED_STAGES)})")
        return
    s = stats.get(stage)
    lengths = {} if s is None or s.longest is None else {
        "longest": s.longest, "longest_prompt": s.longest_prompt, "shortest_prompt": s.shortest_prompt}
    est = stage_memory(cfg, stage, arch, world, **lengths)
    where = "the longest rows of the data" if lengths else (f"data.max_length ({cfg.data.max_length})"
                                                           if cfg.data.max_length else "2048 (assumed)")
    print(f"\nmemory per GPU, stage {stage} ({human_count(param_count(arch))} params; lengths: {where}):")
    print(est.table())


def run_validate(args: argparse.Namespace) -> int:
    """The ``validate`` command; returns 0 when the recipe can run, 2 when something is missing or wrong."""
    from align.config import load_config
    from align.config.paths import check_paths
    from align.config.validate import zero_stage
    from align.pipeline.plan import launch_commands, model_architecture, stage_batch, visible_gpus
    from align.recipes import recipe_path

    path = recipe_path(args.recipe)
    cfg = load_config(path, args.overrides)
    if (args.nproc is not None and args.nproc < 1) or args.nnodes < 1:
        print("error: --nproc and --nnodes must be >= 1")
        return 2
    nproc = args.nproc or max(visible_gpus(), 1)
    world = nproc * args.nnodes
    problems: list[str] = []
    print(f"recipe: {path} (stages: {', '.join(cfg.stages)}; output_dir: {cfg.output_dir})\n\ninputs:")
    checks = check_paths(cfg)
    for c in checks:
        print(f"  {c.status.upper() if c.problem else c.status:<9} {c.key:<24} {c.message}")
        if c.problem:
            problems.append(f"{c.key}: {c.message}")
    if not checks:
        print("  (no files: built-in model, tokenizer and task)")
    tokenizer, note = _tokenizer(cfg, checks, problems)
    stats = _data(cfg, checks, tokenizer, note, problems)
    gpus = "given" if args.nproc else ("visible here" if visible_gpus() else "no GPU visible here: 1 assumed")
    print(f"\nplan: {world} process(es) = {nproc} per node ({gpus}) x {args.nnodes} node(s)")
    for stage in cfg.stages:
        ds = getattr(cfg, stage).get("deepspeed")
        backend = ("DDP" if world > 1 else "one process") if ds is None else f"DeepSpeed ZeRO-{zero_stage(ds) or 0}"
        print(f"  {stage}: {stage_batch(cfg, stage, world).describe()}; {backend}")
    print("launch:")
    for cmd in launch_commands(args.recipe, list(args.overrides), nproc, args.nnodes):
        print(f"  {cmd}")
    arch, source = model_architecture(cfg, checks, len(tokenizer) if tokenizer is not None else None)
    if arch is None:
        print(f"\nmemory per GPU: cannot estimate: {source}")
    else:
        print(f"\nmodel shape from {source}: d_model {arch.d_model}, {arch.n_layers} layers, {arch.n_heads} heads "
              f"({arch.n_kv_heads} key/value), MLP {arch.mlp_hidden_size}, vocabulary {arch.vocab_size}")
        for stage in cfg.stages:
            _memory(cfg, stage, arch, world, stats)
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        if any(c.problem for c in checks):
            print("  (relative paths in a recipe file are looked up next to the file, then among the shipped "
                  "files, then in the current directory; on the command line, in the current directory first)")
        print(f"{path}: NOT ok")
        return 2
    print(f"\n{path}: ok (stages: {', '.join(cfg.stages)}; output_dir: {cfg.output_dir})")
    return 0

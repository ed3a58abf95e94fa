"""``dlm-align merge``: merge a saved LoRA adapter into its base model and write a full checkpoint.

The adapter is a directory written by PEFT (``adapter_config.json`` and ``adapter_model.safetensors``), such as a
LoRA stage's ``<stage>/adapter``, or a Hub id. Its base model is the one ``adapter_config.json`` names
(``base_model_name_or_path``, plus ``revision`` for a Hub id), or ``--base``; either is resolved by
:func:`align.models.resolve.resolve_model` (``builtin:<name>``, a directory or a Hub id ``org/name[@revision]``)
and loaded by :func:`align.models.load_denoiser` (LLaDA natively; Dream and masked LMs through their wrappers).
Before anything is merged, every adapted layer of the adapter is checked against the base: a module the base lacks
or a shape that differs is an error naming both.

The merge runs in the output dtype (``--dtype``; by default the dtype the base checkpoint is stored in), as a
stage's in-process merge runs in the model's dtype, so a stage's ``final`` and ``dlm-align merge`` of its adapter
hold the same weights. The output directory gets the merged model in the base's own checkpoint format and a
tokenizer: the adapter directory's when it has one, else the base's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.models.resolve import BUILTIN_PREFIX, DTYPES, TOKENIZER_FILES, parse_hub_id

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  dlm-align merge runs/my-sft/sft/adapter --out runs/my-sft-merged
  dlm-align merge runs/my-sft/sft/adapter --out merged --base /models/LLaDA-8B-Base --dtype bfloat16
  HF_HUB_OFFLINE=1 dlm-align merge my-org/llada-lora --out merged      (an adapter on the Hub, base from its config)
"""

_PEFT_PREFIX = "base_model.model."
_HINT = "a LoRA stage writes one to <output_dir>/<stage>/adapter"


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_adapter` did.

    Attributes:
        adapter: the adapter directory.
        base: the base model's spec (as given by ``--base`` or read from ``adapter_config.json``).
        base_path: the base model's local directory.
        out: the directory written.
        dtype: name of the saved weights' dtype.
        r: the adapter's rank.
        lora_layers: number of layers whose LoRA update was merged.
        saved_modules: names of modules the adapter stores whole (``modules_to_save``), copied into the model.
        tokenizer_from: directory the saved tokenizer came from (None: no tokenizer found).
    """

    adapter: Path
    base: str
    base_path: Path
    out: Path
    dtype: str
    r: int
    lora_layers: int
    saved_modules: tuple[str, ...]
    tokenizer_from: Path | None


def add_merge_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``merge`` sub-command on ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "merge",
        help="merge a saved LoRA adapter into its base model and write a full checkpoint",
        description=("Merge a LoRA adapter (a directory with adapter_config.json, e.g. <output_dir>/<stage>/adapter, "
                     "or a Hub id) into its base model and write the merged model and a tokenizer to --out.\n"
                     "The base is the model named in adapter_config.json (base_model_name_or_path) unless --base "
                     "is given: builtin:<name>, a checkpoint directory or a Hub id org/name[@revision]."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (or Hub id) holding adapter_config.json")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the merged checkpoint to")
    p.add_argument("--base", default=None, metavar="SPEC",
                   help="base model (default: base_model_name_or_path of adapter_config.json)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of the merge and of the saved weights (default: the base checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args: argparse.Namespace) -> int:
    """The ``merge`` command: merge, print what was done; errors are printed and return 2."""
    try:
        res = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = f" and {len(res.saved_modules)} whole module(s) ({', '.join(res.saved_modules)})" \
        if res.saved_modules else ""
    where = "" if str(res.base_path) == res.base else f" ({res.base_path})"
    print(f"merged {res.adapter} (LoRA r={res.r}, {res.lora_layers} layers{extra}) into {res.base}{where}")
    tok = f"tokenizer from {res.tokenizer_from}" if res.tokenizer_from else "no tokenizer (none found)"
    print(f"wrote {res.out}: {res.dtype} weights, {tok}")
    return 0


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter directory, with errors naming the directory."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        full = (adapter_dir / "config.json").is_file()
        what = " (it holds a full checkpoint, config.json: nothing to merge)" if full else ""
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json, so not a PEFT adapter directory{what}; "
                                f"{_HINT}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: peft_type is {found!r}; dlm-align merge handles LoRA adapters only")
    return config


def adapter_base_spec(config: dict[str, Any]) -> str | None:
    """The base model spec an adapter names: ``base_model_name_or_path``, with ``@revision`` for a Hub id."""
    name = config.get("base_model_name_or_path")
    if not name:
        return None
    revision = config.get("revision")
    if revision and not name.startswith(BUILTIN_PREFIX) and parse_hub_id(name) is not None and "@" not in name:
        return f"{name}@{revision}"
    return name


def check_adapter_matches(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, adapter: str, base: str) -> int:
    """Check that every LoRA weight of an adapter fits a linear layer of ``model``; return how many layers.

    Raises:
        ValueError: a module the base lacks, one that is not a linear layer, or a shape that differs (up to five
            problems are listed, naming the adapter and the base).
    """
    modules = dict(model.named_modules())
    shapes: dict[str, list[int | None]] = {}  # module name -> [inputs of lora_A, outputs of lora_B]
    for key, tensor in weights.items():
        for i, part in enumerate((".lora_A.", ".lora_B.")):
            if part in key:
                name = key.removeprefix(_PEFT_PREFIX).split(part, 1)[0]
                shapes.setdefault(name, [None, None])[i] = tensor.shape[-1] if i == 0 else tensor.shape[0]
    if not shapes:
        raise ValueError(f"adapter {adapter} holds no LoRA weights")
    problems = []
    order = {name: i for i, name in enumerate(modules)}
    for name in sorted(shapes, key=lambda n: (order.get(n, len(order)), n)):
        module = modules.get(name)
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if module is None:
            problems.append(f"the base has no module {name}")
        elif in_f is None or out_f is None:
            problems.append(f"{name} is a {type(module).__name__} in the base, not a linear layer")
        elif shapes[name] != [in_f, out_f]:
            problems.append(f"{name} maps {in_f} -> {out_f} features in the base, {shapes[name][0]} -> "
                            f"{shapes[name][1]} in the adapter")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} layers in all)" if len(problems) > 5 else "")
        raise ValueError(f"adapter {adapter} does not match the base model {base}: {shown}")
    return len(shapes)


def _stored_dtype(base_dir: Path) -> str:
    """Name of the dtype a checkpoint's ``config.json`` says its weights are stored in (float32 if unknown)."""
    try:
        raw = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "float32"
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _resolve_adapter(spec: str) -> Path:
    from align.models.resolve import resolve_model

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{spec}: expected an adapter directory, found a file; {_HINT}")
    if parse_hub_id(spec) is None:
        raise FileNotFoundError(f"{spec}: adapter directory does not exist; {_HINT}")
    return resolve_model(spec).path


def merge_adapter(adapter: str, out: str, *, base: str | None = None, dtype: str | None = None,
                  force: bool = False) -> MergeResult:
    """Merge the LoRA adapter at ``adapter`` into its base model and write the checkpoint to ``out``.

    Args:
        adapter: adapter directory (or Hub id) with ``adapter_config.json``.
        out: output directory; it must not exist or be empty unless ``force``.
        base: base model spec; default: the one ``adapter_config.json`` names.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the merge and the saved weights; default: the dtype the
            base checkpoint is stored in.
        force: replace a non-empty ``out``.

    Raises:
        FileNotFoundError: no adapter directory or ``adapter_config.json``, or a base spec that does not resolve.
        FileExistsError: ``out`` exists and is not empty (without ``force``), or is the adapter or base directory.
        ValueError: not a LoRA adapter, no base named, or an adapter that does not fit the base.
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights

    from align.models import load_denoiser, load_tokenizer, resolve_model

    adapter_dir = _resolve_adapter(adapter)
    config = read_adapter_config(adapter_dir)
    spec = base or adapter_base_spec(config)
    if spec is None:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path is empty); "
                         "pass --base SPEC")
    try:
        resolved = resolve_model(spec)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"base model of adapter {adapter_dir}: {err}") from err
    out_dir = Path(out).expanduser()
    for taken in (adapter_dir, resolved.path):
        if out_dir.resolve() == taken.resolve():
            raise FileExistsError(f"--out {out} is the directory of the {'adapter' if taken == adapter_dir else 'base'}"
                                  "; write the merged checkpoint somewhere else")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (use --force to replace it)")
    dtype = dtype or _stored_dtype(resolved.path)
    model = load_denoiser(resolved, dtype=DTYPES[dtype])
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    n_layers = check_adapter_matches(model, weights, adapter=str(adapter_dir), base=spec)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {adapter_dir} does not apply to the base model {spec}: {err}") from err
    merged = peft_model.merge_and_unload().to(DTYPES[dtype])
    tok_dir = next((d for d in (adapter_dir, resolved.path) if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp))
    if tok_dir is not None:
        load_tokenizer(tok_dir).save_pretrained(str(tmp))
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    tmp.rename(out_dir)
    saved = tuple(config.get("modules_to_save") or ())
    logger.info("merged %s into %s: %d LoRA layers, dtype %s", adapter_dir, spec, n_layers, dtype)
    return MergeResult(adapter=adapter_dir, base=spec, base_path=resolved.path, out=out_dir, dtype=dtype,
                       r=int(config.get("r", 0)), lora_layers=n_layers, saved_modules=saved, tokenizer_from=tok_dir)

"""``dlm-align generate``: sample completions from a checkpoint with the batched denoising sampler.

Prompts come from a text file (one per line), a JSONL file (a ``"prompt"`` field per line: a string
or a list of chat messages), ``--prompt`` arguments, or standard input. The tokenizer's chat
template is applied unless ``--raw``. Completions are printed; ``--output`` also writes one JSON
object per completion with the token ids and the step at which each token was committed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from align.data.formatting import DataFormatError
from align.models.adapters import DENOISER_KINDS
from align.models.resolve import DTYPES, builtin_checkpoints
from align.sampling import BACKENDS, CACHE_MODES, EOS_POLICIES, REMASKING

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  dlm-align generate --model runs/quickstart/sft/final --prompts prompts.txt
  dlm-align generate --model builtin:quickstart-base --prompt "What is 7 + 5?" --gen-length 32
  HF_HUB_OFFLINE=1 dlm-align generate --model GSAI-ML/LLaDA-8B-Instruct --prompt "Hi." --cache dual
  dlm-align generate --model /ckpt/Dream-v0-Instruct-7B --adapter dream --prompt "Hi." --gen-length 64
  echo "What is 7 + 5?" | dlm-align generate --model ckpt --gen-length 64 --block-length 32
  dlm-align generate --model ckpt --prompts eval.jsonl --threshold 0.9 --cache prefix --output out.jsonl
  dlm-align generate --model ckpt --prompt "Tell a story." --temperature 0.8 --num-generations 4 --seed 1
"""

#: ``--cache`` values: the sampler's :data:`~align.sampling.CACHE_MODES`, with None spelled "none".
CACHE_CHOICES = tuple("none" if mode is None else mode for mode in CACHE_MODES)

#: Flags renamed for one name per concept: old flag -> new flag.
RENAMED_FLAGS = {"--num-samples": "--num-generations", "--steps": "--denoising-steps"}


class _RenamedFlag(argparse.Action):
    """A hidden old flag: using it stops with an error naming its new name."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was renamed to {RENAMED_FLAGS[option_string]}")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``generate`` sub-command on ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "generate",
        help="sample completions from a checkpoint",
        description=(
            "Sample completions from a checkpoint with the batched denoising sampler and print them.\n"
            "Prompts: --prompt, a .txt file (one per line), a .jsonl file ('prompt' field) or stdin.\n"
            "Sampler settings follow LLaDA's generate; see docs/sampling.md."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input and output")
    shipped = ", ".join(f"builtin:{name}" for name in builtin_checkpoints()) or "none"
    src.add_argument("--model", required=True, metavar="SPEC",
                     help="the model: builtin:<name> (shipped: " + shipped + "), a checkpoint directory "
                          "(config.json, weights, tokenizer), or a Hugging Face Hub id org/name[@revision] "
                          "(with HF_HUB_OFFLINE=1, from the local cache only); see docs/models.md")
    src.add_argument("--adapter", default="auto", choices=DENOISER_KINDS,
                     help="how to load --model: auto (from its config.json: LLaDA natively, Dream, or any other "
                          "masked LM through its adapter), llada, dream or masked_lm (default auto)")
    src.add_argument("--prompts", default=None,
                     help="prompts file: .jsonl with a 'prompt' field per line, otherwise one prompt per line; "
                          "'-' or omitted (without --prompt) reads standard input")
    src.add_argument("--prompt", action="append", default=[], help="a prompt on the command line (repeatable)")
    src.add_argument("--raw", action="store_true", help="encode prompts as plain text, without the chat template")
    src.add_argument("--output", default=None, help="also write one JSON object per completion to this .jsonl file")
    src.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (default 8)")

    s = p.add_argument_group("sampler")
    s.add_argument("--gen-length", type=int, default=128, help="generated tokens per prompt (default 128)")
    s.add_argument("--block-length", type=int, default=32,
                   help="semi-autoregressive block size; divides --gen-length (default 32)")
    s.add_argument("--denoising-steps", type=int, default=None,
                   help="total denoising steps, a multiple of the number of blocks (default: --gen-length)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples (default 0)")
    s.add_argument("--remasking", default="low_confidence", choices=REMASKING,
                   help="which positions to commit first (default low_confidence)")
    s.add_argument("--threshold", type=float, default=None,
                   help="commit every position with confidence above this (at least one per step)")
    s.add_argument("--cache", default="none", choices=CACHE_CHOICES,
                   help="block KV cache: none (exact), prefix or dual (faster, approximate)")
    s.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale w (default 0)")
    s.add_argument("--eos-policy", default="stop", choices=EOS_POLICIES,
                   help="stop: a row ends once EOS/EOT is committed with everything before it decoded "
                        "(default); none: always decode all --gen-length tokens")
    s.add_argument("--logits-eos-inf", action="store_true", help="never generate EOS")
    s.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="zero confidence for EOS (at temperature 0 only) and end-of-turn, as in LLaDA")
    s.add_argument("--loop-guard", action="store_true",
                   help="decode-time loop guard: remask tokens that close a repetition loop and down-weight them")
    s.add_argument("--loop-guard-penalty", type=float, default=5.0,
                   help="logit penalty of a rejected loop token at its position (default 5.0; 0 = only remask)")
    s.add_argument("--loop-guard-max-remasks", type=int, default=2,
                   help="times one position may be remasked by the loop guard (default 2)")
    s.add_argument("--num-generations", type=int, default=1, help="completions per prompt (default 1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler's generator (default 0)")
    s.add_argument("--mask-id", type=int, default=None, help="mask token id (default: from the model config)")

    d = p.add_argument_group("device")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default)")
    d.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model dtype; auto = bfloat16 on CUDA, float32 on CPU")
    d.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="sampling-step kernel (auto: Triton on CUDA)")
    for old in RENAMED_FLAGS:
        p.add_argument(old, action=_RenamedFlag)
    p.set_defaults(func=run_generate)
    return p


def read_prompts(source: str | None, inline: list[str]) -> list[Any]:
    """Prompts from ``--prompt`` values and/or a file (``None`` or ``-`` = stdin when nothing inline)."""
    prompts: list[Any] = list(inline)
    if source is None and inline:
        return prompts
    if source in (None, "-"):
        name, lines = "<stdin>", sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompts file does not exist")
        name, lines = str(path), path.read_text(encoding="utf-8").splitlines()
    jsonl = name.endswith(".jsonl")
    blank = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{name}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataFormatError(f"{name}:{lineno}: expected a JSON object with a 'prompt' field")
        prompt = row["prompt"]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise DataFormatError(
                f"{name}:{lineno}: field 'prompt' must be a string or a non-empty list of chat messages, "
                f"got {type(prompt).__name__}"
            )
        prompts.append(prompt)
    if blank:
        logger.info("%s: skipped %d blank lines", name, blank)
    if not prompts:
        raise DataFormatError(f"{name}: no prompts found")
    return prompts


def _stop_ids(tokenizer, model) -> tuple[int | None, int | None]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    eot = None
    for tok in ("<|eot_id|>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and tid != eos:
            eot = tid
            break
    return eos, eot


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def _load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The model (through ``--adapter``) and tokenizer of ``--model``, in eval mode. A ``--cache`` the model
    cannot use is rejected before any weights are read."""
    from align.models import load_tokenizer, resolve_model
    from align.models.adapters import KV_CONTEXT_KINDS, MissingMaskTokenError, detect_denoiser_kind, load_denoiser
    from align.sampling import SamplingConfigError

    resolved = resolve_model(args.model)  # any spec: builtin:<name>, a directory, a Hub id
    kind = detect_denoiser_kind(resolved.path, args.adapter)  # None without a config.json: load_denoiser says so
    if args.cache != "none" and kind is not None and kind not in KV_CONTEXT_KINDS:
        raise SamplingConfigError(f"--cache {args.cache} needs KV-context support, which the {kind} adapter of "
                                  f"{args.model} does not have; use --cache none")
    tokenizer = load_tokenizer(resolved)
    try:
        model = load_denoiser(resolved, kind or args.adapter, dtype=dtype, device=device, mask_token_id=args.mask_id,
                              tokenizer=tokenizer)
    except MissingMaskTokenError as err:
        raise MissingMaskTokenError(f"{args.model}: no mask token id in its config.json or tokenizer; pass --mask-id"
                                    ) from err
    if len(tokenizer) > model.config.vocab_size:
        logger.warning("%s: tokenizer has %d tokens but the model's vocab_size is %d", args.model, len(tokenizer),
                       model.config.vocab_size)
    return model.eval(), tokenizer


def run_generate(args: argparse.Namespace) -> int:
    """Run ``dlm-align generate``; returns the exit status (2 for bad input or settings)."""
    from align.data.collator import left_pad
    from align.evaluate import stop_token_ids
    from align.sampling import LoopGuardConfig, SamplingConfigError, completion_lengths, generate

    try:
        prompts = read_prompts(args.prompts, args.prompt)
        if args.batch_size <= 0:
            raise SamplingConfigError(f"--batch-size must be positive, got {args.batch_size}")
        device, dtype = _device_and_dtype(args)
        model, tokenizer = _load(args, device, dtype)
        if not args.raw and not getattr(tokenizer, "chat_template", None):
            raise DataFormatError(f"{args.model}: the tokenizer has no chat template; pass --raw for plain prompts")
        from align.data.formatting import encode_prompt

        encoded = [encode_prompt(tokenizer, p, use_chat_template=not args.raw) for p in prompts]
        for i, row in enumerate(encoded):
            if not row:
                raise DataFormatError(f"prompt {i + 1} encodes to no tokens")
        eos, eot = _stop_ids(tokenizer, model)
        stops = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        generator = torch.Generator().manual_seed(args.seed)
        guard_cfg = LoopGuardConfig.from_dict({"enabled": bool(args.loop_guard), "penalty": args.loop_guard_penalty,
                                               "max_remasks": args.loop_guard_max_remasks}, "--loop-guard")
        guard_rows = 0
        records: list[dict[str, Any]] = []
        start, total_nfe = time.perf_counter(), 0
        for s in range(0, len(encoded), args.batch_size):
            ids, att = left_pad(encoded[s : s + args.batch_size], pad)
            out = generate(
                model, ids.to(device), attention_mask=att.to(device), gen_length=args.gen_length,
                steps=args.denoising_steps or args.gen_length, block_length=args.block_length,
                temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale,
                threshold=args.threshold, cache=None if args.cache == "none" else args.cache,
                mask_id=args.mask_id, logits_eos_inf=args.logits_eos_inf,
                confidence_eos_eot_inf=args.confidence_eos_eot_inf, eos_token_id=eos, eot_token_id=eot,
                eos_policy=args.eos_policy, num_generations=args.num_generations, generator=generator,
                backend=args.backend, on_commit=(guard := guard_cfg.build(stops)),
            )
            total_nfe += out.nfe
            guard_rows += guard.stats["rows"] if guard is not None else 0
            comp = out.completion_ids.cpu()
            lengths = completion_lengths(comp, stops)[0]
            for r in range(comp.shape[0]):
                index = s + r // args.num_generations
                records.append({
                    "prompt_index": index,
                    "sample": r % args.num_generations,
                    "prompt": prompts[index],
                    "completion": tokenizer.decode(comp[r, : lengths[r]].tolist(), skip_special_tokens=True),
                    "completion_length": int(lengths[r]),
                    "completion_ids": comp[r].tolist(),
                    "commit_step": out.commit_step[r].cpu().tolist(),
                    "nfe": out.nfe,
                })
    except (ValueError, FileNotFoundError) as err:  # bad prompts, settings or checkpoint (incl. SamplingConfigError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    _print(records, len(prompts), args.num_generations)
    if args.output:
        out_path = Path(args.output)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        logger.info("wrote %d completions to %s", len(records), out_path)
    logger.info("%d completions, %d network evaluations, %.2fs", len(records), total_nfe, elapsed)
    if args.loop_guard:
        logger.info("loop guard fired in %d of %d completions", guard_rows, len(records))
    return 0


def _print(records: list[dict[str, Any]], num_prompts: int, num_generations: int) -> None:
    if num_prompts == 1 and num_generations == 1:
        print(records[0]["completion"])
        return
    for rec in records:
        tag = f"prompt {rec['prompt_index'] + 1}/{num_prompts}"
        if num_generations > 1:
            tag += f", sample {rec['sample'] + 1}/{num_generations}"
        print(f"--- {tag} ---")
        print(rec["completion"])

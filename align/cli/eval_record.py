"""The record ``dlm-align eval`` writes beside every number: package versions, hardware, each model's entry, the paired
tests between checkpoints, and the printed table."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from align.cli.eval_problems import Checkpoint


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("dlm-align", "torch", "transformers", "peft", "math-verify"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: Any, dtype: str, world_size: int) -> dict[str, Any]:
    """Device, card, dtype, processes and package versions of this evaluation."""
    import torch

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": card, "dtype": dtype, "world_size": world_size,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "versions": _versions()}


def model_entry(ckpt: Checkpoint, res: Any) -> dict[str, Any]:
    """The numbers of one checkpoint in ``eval.json``."""
    from align.evaluate import wilson_interval

    correct = sum(bool(r["correct"]) for r in res.samples)
    lo, hi = wilson_interval(correct, res.num_problems)
    entry = {"spec": ckpt.spec, "adapter": str(ckpt.adapter) if ckpt.adapter else None,
             "model": ckpt.model_cfg.path if ckpt.model_cfg is not None else None,
             "accuracy": res.accuracy, "accuracy_ci95": [lo, hi], "correct": correct,
             "num_problems": res.num_problems, "loop_rate": res.loop_rate,
             "mean_loop_fraction": res.mean_loop_fraction, "mean_completion_length": res.mean_completion_length,
             "generated_tokens": res.generated_tokens, "seconds": res.seconds,
             "tokens_per_second": res.tokens_per_second, "nfe": res.nfe, "completions": f"{ckpt.name}.jsonl"}
    if ckpt.model_cfg is not None and ckpt.model_cfg.path is None:
        entry["init_config"] = ckpt.model_cfg.init_config
    return entry


def comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """Paired McNemar tests of every checkpoint against the first (accuracy, and the loop indicator under
    ``loop_rate``), as the run report's ``comparisons``."""
    from align.stats import mcnemar_exact

    names = list(results)
    out = {}
    first = results[names[0]].samples if names else []
    for name in names[1:]:
        other = results[name].samples
        out[f"{name}_vs_{names[0]}"] = {
            **mcnemar_exact([bool(r["correct"]) for r in first], [bool(r["correct"]) for r in other]),
            "loop_rate": mcnemar_exact([r["loop_fraction"] > 0 for r in first],
                                       [r["loop_fraction"] > 0 for r in other])}
    return out


def format_eval_table(record: dict[str, Any]) -> str:
    """The checkpoints side by side (accuracy with its 95% interval, length, loops, speed) and the paired tests."""
    w = max([10, *(len(n) for n in record["models"])])
    lines = [f"{'model':<{w}} {'accuracy':>9} {'95% CI':>15} {'mean_len':>9} {'loop_rate':>10} {'tok/s':>9} "
             f"{'nfe':>7} {'problems':>9}"]
    for name, r in record["models"].items():
        lo, hi = r["accuracy_ci95"]
        lines.append(f"{name:<{w}} {100 * r['accuracy']:>8.1f}% {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>15} "
                     f"{r['mean_completion_length']:>9.1f} {100 * r['loop_rate']:>9.1f}% "
                     f"{r['tokens_per_second']:>9.1f} {r['nfe']:>7d} {r['num_problems']:>9d}")
    for key, c in record.get("comparisons", {}).items():
        lines.append(f"{key}: {100 * c['delta']:+.1f} points, McNemar p = {c['p_value']:.3g} "
                     f"(fixed {c['n01']}, broke {c['n10']})")
    return "\n".join(lines)


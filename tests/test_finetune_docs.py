"""docs/finetune.md end to end: every ``dlm-align`` command of the page runs, as written and in order, through
``align.cli.main``, with a tiny native LLaDA model standing in for the released checkpoint in an offline Hugging Face
cache and the page's example rows as the data."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "finetune.md"
REPO = "GSAI-ML/LLaDA-8B-Instruct"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
#: Added to the page's `validate` and `run` commands: two steps of a tiny model, in float32 on a CPU.
SIZE = ["model.dtype=float32", "model.gradient_checkpointing=false", "sft.bf16=false", "sft.max_steps=2",
        "sft.per_device_train_batch_size=2", "sft.gradient_accumulation_steps=1", "data.max_length=128",
        "peft.r=8", "peft.lora_alpha=16"]


def code_blocks(text: str, lang: str) -> list[str]:
    """Bodies of the page's fenced code blocks in ``lang``, in order."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S) if tag == lang]


def page_commands(text: str) -> list[list[str]]:
    """The ``dlm-align`` command lines of the page's bash blocks, as argument lists without the program name."""
    return [shlex.split(line)[1:] for block in code_blocks(text, "bash") for line in block.splitlines()
            if line.startswith("dlm-align ")]


def test_the_page_runs_end_to_end(tmp_path, monkeypatch, offline_stand_in, capsys):
    text = PAGE.read_text()
    commands = page_commands(text)
    assert [c[0] for c in commands] == ["cp", "validate", "run", "generate", "run", "merge", "generate"]
    prompt_rows, message_rows = ([json.loads(line) for line in block.splitlines()]
                                 for block in code_blocks(text, "jsonl")[:2])
    assert prompt_rows and all(set(r) == {"prompt", "completion"} for r in prompt_rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in message_rows)

    prompts = [c[c.index("--prompt") + 1] for c in commands if "--prompt" in c]
    files = offline_stand_in(REPO, COMMIT, [f"{r['prompt']} {r['completion']}" for r in prompt_rows] + prompts)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "data" / "my-sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows))

    printed = []
    for args in commands:
        full = [*args, *SIZE] if args[0] in ("validate", "run") else args
        assert main(full) == 0, full
        printed.append(capsys.readouterr().out)

    merged_run, adapter_run = work / "runs" / "my-sft", work / "runs" / "my-sft-adapter"
    assert (merged_run / "sft" / "final" / "config.json").is_file()
    config = json.loads((merged_run / "sft" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO and config["revision"] is None  # the Hub id, not a cache path
    final = adapter_run / "sft" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    report = json.loads((adapter_run / "report.json").read_text())
    assert report["stages"]["sft"]["checkpoint"].endswith("my-sft-adapter/sft/final")
    assert report["recipe"]["peft"]["merge"] is False
    assert printed[5].startswith("merged runs/my-sft-adapter/sft/adapter (LoRA r=8, 14 layers) into "
                                 f"{REPO} ({tmp_path / 'hf' / 'hub'}")
    # Same seed, same data: the adapter merged later equals the merge done at the end of the first run.
    ours = load_file(str(work / "runs" / "my-sft-merged" / "model.safetensors"))
    theirs = load_file(str(merged_run / "sft" / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    base = load_file(str(files / "model.safetensors"))
    assert any(not torch.equal(base[k], ours[k]) for k in base)  # training changed the weights
    for out in (printed[3], printed[6]):  # both generate commands printed a completion
        assert out.strip(), out

    # The page's Python snippet loads the adapter with PEFT onto the (stand-in) released checkpoint.
    from peft import PeftModel

    (snippet,) = code_blocks(text, "python")
    namespace: dict = {}
    exec(snippet, namespace)
    assert isinstance(namespace["model"], PeftModel)
    assert namespace["model"].peft_config["default"].r == 8

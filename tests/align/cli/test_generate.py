"""``dlm-align generate``: prompts from files and stdin, chat template, JSONL output, errors."""

import argparse
import io
import json
from pathlib import Path

import pytest
import torch

from align.cli.generate import add_generate_parser, run_generate
from align.data.tokenizer import build_word_tokenizer, save_tokenizer
from align.models import LLaDAModelLM, tiny_llada_config
from align.sampling import generate

CORPUS = ["What is two plus three ?", "The answer is five .", "Tell me a story about a cat ."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaDA checkpoint with the project's word-level tokenizer and chat template."""
    path = tmp_path_factory.mktemp("ckpt")
    tok = build_word_tokenizer(CORPUS)
    cfg = tiny_llada_config(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                            mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, init_std=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LLaDAModelLM(cfg).save_pretrained(path)
    save_tokenizer(tok, path)
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlm-align")
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


SMALL = ("--gen-length", "8", "--block-length", "4", "--denoising-steps", "8", "--device", "cpu")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_txt_prompts_with_chat_template_and_jsonl_output(checkpoint, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is two plus three ?\n\nTell me a story .\n")  # the blank line is skipped
    out = tmp_path / "out.jsonl"
    args = parse("--model", str(checkpoint), "--prompts", str(prompts), "--output", str(out),
                 "--eos-policy", "none", *SMALL)
    assert run_generate(args) == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["What is two plus three ?", "Tell me a story ."]
    for r in rows:
        assert len(r["completion_ids"]) == 8 and len(r["commit_step"]) == 8
        assert sorted(r["commit_step"]) == list(range(8)) and r["nfe"] == 8
    printed = capsys.readouterr().out
    assert "--- prompt 1/2 ---" in printed and "--- prompt 2/2 ---" in printed

    # the same completions as calling the sampler on the chat-formatted prompts
    from align.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me a story ."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    direct = generate(model.eval(), ids, gen_length=8, block_length=4, steps=8, eot_token_id=eot)
    assert rows[1]["completion_ids"] == direct.completion_ids[0].tolist()


def test_jsonl_prompts_raw_and_samples(checkpoint, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "What is two plus three ?"}, {"prompt": [{"role": "user", "content": "Tell me ."}]}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "o.jsonl"
    args = parse("--model", str(checkpoint), "--prompts", str(prompts), "--output", str(out), "--raw",
                 "--num-generations", "2", "--temperature", "1.0", "--seed", "3", "--threshold", "0.5",
                 "--cache", "prefix", *SMALL)
    assert run_generate(args) == 0
    rows = read_jsonl(out)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0 <= s < r["nfe"] for r in rows for s in r["commit_step"])
    assert "sample 2/2" in capsys.readouterr().out
    assert run_generate(args) == 0 and read_jsonl(out) == rows  # --seed makes it reproducible


def test_loop_guard_flags(checkpoint, tmp_path, caplog) -> None:
    out = tmp_path / "g.jsonl"
    args = parse("--model", str(checkpoint), "--prompt", "What is two plus three ?", "--output", str(out),
                 "--loop-guard", "--loop-guard-penalty", "3", "--num-generations", "2", *SMALL)
    with caplog.at_level("INFO"):
        assert run_generate(args) == 0
    assert len(read_jsonl(out)) == 2 and "loop guard fired in" in caplog.text
    bad = parse("--model", str(checkpoint), "--prompt", "x", "--loop-guard", "--loop-guard-max-remasks", "0", *SMALL)
    assert run_generate(bad) == 2


def test_stdin_and_inline_prompts(checkpoint, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What is two plus three ?\n"))
    assert run_generate(parse("--model", str(checkpoint), *SMALL)) == 0
    single = capsys.readouterr().out
    assert "---" not in single  # one prompt, one sample: just the completion
    assert run_generate(parse("--model", str(checkpoint), "--prompt", "What is two plus three ?", *SMALL)) == 0
    assert capsys.readouterr().out == single


@pytest.mark.parametrize(
    ("content", "name", "extra", "message"),
    [
        ('{"prompt": "ok"}\n{"text": "x"}\n', "p.jsonl", (), "p.jsonl:2: expected a JSON object with a 'prompt'"),
        ('{"prompt": 3}\n', "p.jsonl", (), "field 'prompt' must be a string"),
        ("{not json\n", "p.jsonl", (), "p.jsonl:1: not valid JSON"),
        ("\n\n", "p.txt", (), "no prompts found"),
        ("hello\n", "p.txt", ("--gen-length", "10"), "multiple of block_length"),
    ],
)
def test_bad_input_is_reported(checkpoint, tmp_path, capsys, content, name, extra, message) -> None:
    prompts = tmp_path / name
    prompts.write_text(content)
    args = parse("--model", str(checkpoint), "--prompts", str(prompts), *SMALL, *extra)
    assert run_generate(args) == 2
    assert message in capsys.readouterr().err


def test_missing_files_are_reported(checkpoint, tmp_path, capsys) -> None:
    assert run_generate(parse("--model", str(checkpoint), "--prompts", str(tmp_path / "none.txt"), *SMALL)) == 2
    assert "prompts file does not exist" in capsys.readouterr().err
    assert run_generate(parse("--model", str(tmp_path / "nothing"), "--prompt", "hi", *SMALL)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_lists_the_sampler_knobs() -> None:
    parser = argparse.ArgumentParser(prog="dlm-align")
    sub = parser.add_subparsers()
    text = add_generate_parser(sub).format_help()
    for flag in ("--threshold", "--cache", "--remasking", "--cfg-scale", "--eos-policy", "--confidence-eos-eot-inf",
                 "--logits-eos-inf", "--num-generations", "--denoising-steps", "--output", "--raw", "--backend"):
        assert flag in text


def test_help_choices_come_from_their_owners() -> None:
    from align.models.resolve import DTYPES
    from align.sampling import CACHE_MODES, EOS_POLICIES, REMASKING

    parser = argparse.ArgumentParser(prog="dlm-align")
    p = add_generate_parser(parser.add_subparsers())
    choices = {a.dest: a.choices for a in p._actions if a.choices is not None}
    assert list(choices["remasking"]) == list(REMASKING)
    assert list(choices["cache"]) == ["none" if m is None else m for m in CACHE_MODES]
    assert list(choices["eos_policy"]) == list(EOS_POLICIES)
    assert list(choices["dtype"]) == ["auto", *DTYPES]
    text = p.format_help()
    assert "builtin:quickstart-base" in text and "org/name" in text  # --model names all three kinds
    assert "--num-samples" not in text and "--steps " not in text  # the old names are hidden


@pytest.mark.parametrize(("old", "new"), [("--num-samples", "--num-generations"), ("--steps", "--denoising-steps")])
def test_renamed_flags_name_the_new_flag(checkpoint, capsys, old, new) -> None:
    from align.cli import main

    for value in (("2",), ()):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--model", str(checkpoint), "--prompt", "hi", old, *value])
        assert exc.value.code == 2
        assert f"{old} was renamed to {new}" in capsys.readouterr().err


def test_dtype_flag_uses_the_shared_mapping(checkpoint, tmp_path) -> None:
    out = tmp_path / "d.jsonl"
    args = parse("--model", str(checkpoint), "--prompt", "What is two plus three ?", "--dtype", "float32",
                 "--output", str(out), *SMALL)
    assert run_generate(args) == 0 and len(read_jsonl(out)) == 1


def test_main_cli_dispatches_generate(checkpoint, capsys) -> None:
    from align.cli import main

    argv = ["--model", str(checkpoint), "--prompt", "What is two plus three ?", *SMALL]
    assert main(["generate", *argv]) == 0
    via_main = capsys.readouterr().out
    assert run_generate(parse(*argv)) == 0
    assert capsys.readouterr().out == via_main

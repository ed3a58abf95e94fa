"""Built-in task, tokenizer, formatting, loading and collation."""

import json

import pytest
import torch

from align.data.collator import CollatorError, SFTCollator
from align.data.formatting import DataFormatError, encode_pair
from align.data.loading import load_files, tokenize_dataset
from align.data.task import (
    ArithmeticTaskSpec,
    TaskConfigError,
    arithmetic_dataset,
    extract_answer,
    generate_problems,
    is_correct,
)
from align.data.tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def tok():
    from align.data.task import corpus_for_tokenizer

    return build_word_tokenizer(corpus_for_tokenizer())


def test_task_deterministic_and_disjoint():
    a = arithmetic_dataset(300, 100, seed=3)
    b = arithmetic_dataset(300, 100, seed=3)
    assert a["train"]["prompt"] == b["train"]["prompt"]
    assert not set(a["train"]["prompt"]) & set(a["test"]["prompt"])
    for row in a["test"]:
        assert is_correct(row["completion"], row["answer"])
        # the worked solution is consistent: each step's result feeds the next
        steps = [s for s in row["completion"].split(". ") if "=" in s]
        for s in steps:
            lhs, rhs = s.rstrip(".").split("=")
            assert eval(lhs) == int(rhs)  # the arithmetic is right


def test_task_settings_errors():
    with pytest.raises(TaskConfigError):
        generate_problems(5, seed=0, spec=ArithmeticTaskSpec(min_ops=3, max_ops=2))
    with pytest.raises(TaskConfigError):
        generate_problems(10_000, seed=0, spec=ArithmeticTaskSpec(min_ops=1, max_ops=1, max_start=2, max_operand=1,
                                                                  allow_multiply=False))


def test_loop_fraction_changes_only_training_solutions():
    from align.rewards import detect_loops

    clean = arithmetic_dataset(400, 50, seed=1)
    loopy = arithmetic_dataset(400, 50, seed=1, spec=ArithmeticTaskSpec(loop_fraction=0.25, loop_repeats=5))
    assert loopy["test"]["completion"] == clean["test"]["completion"]  # held-out split untouched
    assert loopy["train"]["prompt"] == clean["train"]["prompt"]
    changed = [a for a, b in zip(loopy["train"]["completion"], clean["train"]["completion"], strict=True) if a != b]
    assert 0.15 < len(changed) / 400 < 0.35
    for text in changed:
        assert "The answer is" not in text
        steps = [t.strip() for t in text.split(".") if t.strip()]
        assert len(steps) >= 6 and len(set(steps[-6:])) == 1  # one step repeated five more times
    ids = [[ord(c) for c in text] for text in changed]
    assert all(r.has_loop for r in detect_loops(ids, min_span=24))
    for bad in ({"loop_fraction": 1.0}, {"loop_fraction": -0.1}, {"loop_repeats": 1}):
        with pytest.raises(TaskConfigError):
            arithmetic_dataset(5, 5, seed=0, spec=ArithmeticTaskSpec(**bad))


def test_extract_answer():
    assert extract_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert extract_answer("no answer") is None
    assert not is_correct("The answer is 8.", 7)


def test_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "Mia has 17 shells. She finds 5 more. How many shells does Mia have now?"
    assert t2.decode(t2(text)["input_ids"]) == text
    assert t2.mask_token_id == 5 and t2.eos_token_id == 0 and t2.pad_token_id == 0
    ids = t2("12 + 30 = 42.")["input_ids"]
    assert len(ids) == 9  # one token per digit, "▁+" "▁=" attached to their space, "."
    assert t2.unk_token_id not in t2(text)["input_ids"]


def test_encode_pair_chat(tok):
    p, c = encode_pair(tok, "Tom has 3 apples.", "The answer is 3.", use_chat_template=True)
    assert tok.decode(p).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert c[-1] == tok.eos_token_id and tok.convert_tokens_to_ids("<|eot_id|>") in c
    assert tok.decode(c, skip_special_tokens=True) == "The answer is 3."


def test_load_files_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError):
        load_files(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(DataFormatError, match="unsupported"):
        load_files(str(bad))
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "Tom has 3 apples.", "completion": "The answer is 3."},
                                                     {"prompt": "Tom has 4 apples.", "completion": 5}]))
    ds = load_files(str(f))
    with pytest.raises(DataFormatError, match=r"rows.jsonl row 1: field 'completion'"):
        tokenize_dataset(ds, tok, source="rows.jsonl")


def test_messages_and_too_long_rows_are_counted(tmp_path, tok, caplog):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Tom has 3 apples."},
                          {"role": "assistant", "content": "The answer is 3."}]},
            {"messages": [{"role": "user", "content": "Tom has 3 apples. " * 30},
                          {"role": "assistant", "content": "The answer is 3."}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level("WARNING"):
        out = tokenize_dataset(load_files(str(f)), tok, max_length=60, source="chat.jsonl", bad_rows="skip")
    assert len(out) == 1 and "1 bad row(s) of 2 (1 longer than max_length)" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataFormatError, match="last message"):
        tokenize_dataset(load_files(str(bad)), tok, source="bad.jsonl")


@pytest.mark.parametrize("eos_train,expect_targets,expect_attended",
                         [("all", [5, 3], [7, 7]), ("none", [2, 3], [4, 7]), (1, [3, 3], [5, 7])])
def test_collator_eos_train(eos_train, expect_targets, expect_attended):
    col = SFTCollator(0, eos_train=eos_train)
    batch = col([{"prompt_ids": [7, 8], "completion_ids": [9, 0]},
                 {"prompt_ids": [7, 8, 7, 8], "completion_ids": [9, 9, 0]}])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["response_mask"].sum(1).tolist() == expect_targets
    assert not batch["response_mask"][:, :2].any()  # prompt never a target
    assert torch.equal(batch["input_ids"][0], torch.tensor([7, 8, 9, 0, 0, 0, 0]))
    assert batch["attention_mask"].sum(1).tolist() == expect_attended


def test_collator_errors():
    with pytest.raises(CollatorError):
        SFTCollator(0, eos_train=-1)
    with pytest.raises(CollatorError):
        SFTCollator(0)([{"prompt_ids": [1], "completion_ids": []}])


def test_splits_nest_across_sizes():
    small = arithmetic_dataset(100, 50, seed=0)
    big = arithmetic_dataset(400, 80, seed=0)
    assert big["test"]["prompt"][:50] == small["test"]["prompt"]
    assert big["train"]["prompt"][:100] == small["train"]["prompt"]
    assert not set(big["train"]["prompt"]) & set(small["test"]["prompt"])


def test_tokenize_prompts_for_rl(tmp_path, tok):
    from align.data.formatting import ColumnNames
    from align.data.loading import tokenize_prompts

    f = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Tom has {i} apples.", "answer": f"so #### {i}"} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    out = tokenize_prompts(load_files(str(f)), tok, names=ColumnNames(prompt="question"), source="gsm.jsonl")
    assert out.column_names == ["answer", "prompt", "prompt_ids"]
    assert out[1]["prompt"] == "Tom has 1 apples."
    assert tok.decode(out[1]["prompt_ids"]).endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(DataFormatError, match="needs a 'prompt' or 'messages' column"):
        tokenize_prompts(load_files(str(f)), tok, source="gsm.jsonl")

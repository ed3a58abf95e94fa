"""Preference rows: TRL's shapes, pairs that cannot teach a preference reported with their place, pairs made from
the built-in task, and the pair batches."""

import json
import logging
import random
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from align.build import build_tokenizer
from align.cli import main
from align.data.formatting import DataFormatError
from align.data.loading import load_files
from align.data.preference import (
    PreferenceCollator,
    split_preference_row,
    task_preference_pairs,
    tokenize_preferences,
    wrong_solution,
)
from align.data.task import arithmetic_dataset, extract_answer, is_correct


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("builtin:arithmetic")


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"prompt": "Tom has 3 apples. How many apples does Tom have now?", "chosen": "The answer is 3.",
        "rejected": "The answer is 4."}


def test_bad_pairs_are_reported_with_file_line_and_reason(tmp_path, tok):
    path = _jsonl(tmp_path / "prefs.jsonl", [
        json.dumps(GOOD),
        "",                                                                   # blank line: not a row
        json.dumps({**GOOD, "rejected": GOOD["chosen"]}),                     # line 3
        json.dumps({**GOOD, "chosen": "  "}),                                 # line 4
        json.dumps({**GOOD, "rejected": ""}),                                 # line 5
        json.dumps(GOOD),
    ])
    ds = load_files([str(path)])
    with pytest.raises(DataFormatError) as err:
        tokenize_preferences(ds, tok, source=str(path))
    text = str(err.value)
    assert f"{path}: 3 bad row(s) of 5 (2 empty string, 1 chosen equals rejected)" in text
    assert f"{path}:3: chosen equals rejected" in text
    assert f"{path}:4: empty chosen response" in text
    assert f"{path}:5: empty rejected response" in text
    assert f"{path}:1:" not in text and f"{path}:6:" not in text


def test_dropped_bad_pairs_are_logged_and_left_out(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "rejected": GOOD["chosen"]}),
                                             json.dumps({**GOOD, "chosen": "The answer is 5."})])
    with caplog.at_level(logging.WARNING, logger="align.data.preference"):
        out = tokenize_preferences(load_files([str(path)]), tok, source=str(path), bad_pairs="drop")
    assert len(out) == 2 and out["pair_index"] == [0, 1]
    assert out["chosen"] == [GOOD["chosen"], "The answer is 5."]
    assert f"{path}:2: chosen equals rejected" in caplog.text


def test_pairs_equal_after_tokenisation_are_reported(tok):
    # the task's word-level tokenizer maps every unknown word to the same id
    ds = Dataset.from_list([{**GOOD, "chosen": "zzz answer is 3.", "rejected": "qqq answer is 3."}])
    with pytest.raises(DataFormatError, match="dataset row 0: chosen and rejected tokenize to the same ids"):
        tokenize_preferences(ds, tok)


def test_plain_conversational_and_implicit_prompts_agree(tok):
    user = [{"role": "user", "content": GOOD["prompt"]}]
    rows = [
        GOOD,
        {"prompt": user, "chosen": [{"role": "assistant", "content": GOOD["chosen"]}],
         "rejected": [{"role": "assistant", "content": GOOD["rejected"]}]},
        {"chosen": [*user, {"role": "assistant", "content": GOOD["chosen"]}],
         "rejected": [*user, {"role": "assistant", "content": GOOD["rejected"]}]},
    ]
    encoded = [tokenize_preferences(Dataset.from_list([r]), tok)[0] for r in rows]
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert encoded[0][key] == encoded[1][key] == encoded[2][key], key
    assert encoded[0]["chosen_ids"] != encoded[0]["rejected_ids"]
    assert encoded[0]["chosen_ids"][-1] == tok.eos_token_id
    empty = {**rows[1], "rejected": []}                                       # an empty conversational response
    with pytest.raises(DataFormatError, match="dataset row 0: empty rejected response"):
        tokenize_preferences(Dataset.from_list([empty]), tok)


def test_malformed_rows_name_the_row_and_field():
    with pytest.raises(DataFormatError, match="row 7: missing field 'rejected'"):
        split_preference_row({"prompt": "p", "chosen": "a"}, "row 7")
    with pytest.raises(DataFormatError, match="row 2: no 'prompt' field"):
        split_preference_row({"chosen": "a", "rejected": "b"}, "row 2")
    with pytest.raises(DataFormatError, match="share no first message"):
        split_preference_row({"chosen": [{"role": "user", "content": "a"}],
                              "rejected": [{"role": "user", "content": "b"}]}, "row 1")
    with pytest.raises(DataFormatError, match="assistant messages only"):
        split_preference_row({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "row 0")


def test_pairs_over_max_length_are_dropped(tok):
    long = {**GOOD, "rejected": " ".join(["3 + 4 = 7."] * 20)}
    with pytest.raises(DataFormatError, match=r"row 1: prompt \+ longer response is .* over data\.max_length=40"):
        tokenize_preferences(Dataset.from_list([GOOD, long]), tok, max_length=40)
    out = tokenize_preferences(Dataset.from_list([GOOD, long]), tok, max_length=40, bad_rows="skip")
    assert out["rejected"] == [GOOD["rejected"]]


def test_wrong_solution_is_right_in_form_and_carries_the_error():
    completion = "7 + 5 = 12. 12 - 3 = 9. 9 * 2 = 18. The answer is 18."
    for seed in range(20):
        wrong = wrong_solution(completion, random.Random(seed))
        steps = [s.strip() for s in wrong.split(".") if "=" in s]
        assert len(steps) == 3
        values = [int(s.split("=")[1]) for s in steps]
        assert [int(s.split()[0]) for s in steps[1:]] == values[:-1]      # each step starts from the last value
        assert extract_answer(wrong) == str(values[-1]) != "18"
    assert wrong_solution("no steps here", random.Random(0)) is None


def test_task_pairs_choose_correct_solutions_and_skip_looping_rows():
    rows = arithmetic_dataset(200, 10, seed=0, spec=None)["train"]
    looped = [{**r, "completion": "1 + 1 = 2. 1 + 1 = 2. 1 + 1 = 2."} if i % 4 == 0 else r
              for i, r in enumerate(rows)]
    pairs = task_preference_pairs(looped, seed=3, rejected="mixed")
    assert len(pairs) == 150                                                  # every fourth row has no correct one
    assert set(pairs["rejected_kind"]) == {"looping", "wrong"}
    for p in pairs:
        assert is_correct(p["chosen"], p["answer"]) and not is_correct(p["rejected"], p["answer"])
        if p["rejected_kind"] == "looping":
            assert extract_answer(p["rejected"]) is None
    assert task_preference_pairs(looped, seed=3)["rejected"] == pairs["rejected"]   # deterministic
    assert set(task_preference_pairs(rows, seed=0, rejected="wrong")["rejected_kind"]) == {"wrong"}


def test_collator_lays_out_chosen_and_rejected_after_the_same_prompt():
    batch = PreferenceCollator(pad_token_id=0)([
        {"prompt_ids": [7, 8], "chosen_ids": [1, 2, 3], "rejected_ids": [4], "pair_index": 5},
        {"prompt_ids": [9], "chosen_ids": [1], "rejected_ids": [2, 3], "pair_index": 2},
    ])
    assert batch["input_ids"].tolist() == [[7, 8, 1, 2, 3], [7, 8, 4, 0, 0], [9, 1, 0, 0, 0], [9, 2, 3, 0, 0]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0],
                                                     [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 2, 3]
    assert batch["pair_index"].tolist() == [5, 2]


def test_run_reports_bad_pairs_before_loading_a_model(tmp_path, capsys, tiny_init_config, monkeypatch):
    path = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "chosen": GOOD["rejected"]})])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "stages": ["vrpo"],
        "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
        "data": {"task": None, "train_files": [str(path)], "max_length": 64}, "eval": {"enabled": False}}))
    import align.pipeline.recipe as recipe_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the rows were checked")

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", no_model)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: chosen equals rejected" in err and "vrpo.bad_pairs: drop" in err

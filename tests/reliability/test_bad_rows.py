"""Every row checked before training: a file with planted defects of ten kinds is reported row by row under
``data.bad_rows: strict`` (before any model is loaded) and trained on without them under ``skip``."""

import json
import logging
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from align.cli import main
from align.config import load_config
from align.data.checks import BadRowsError, read_rows, rows_to_dataset
from align.data.formatting import DataFormatError
from align.data.loading import load_files, tokenize_dataset, tokenize_prompts
from align.data.preference import tokenize_preferences

MAX_LENGTH = 64
LONG_PROMPT = "What is " + " + ".join(["3"] * 40) + " ?"           # well over MAX_LENGTH tokens


def _good(i: int) -> dict:
    return {"prompt": f"What is {i % 10} + {i % 7} ?", "completion": f"{i % 10} + {i % 7} = {i % 10 + i % 7}",
            "answer": str(i % 10 + i % 7)}


#: the ten kinds of defect: (what the line holds, the problem's kind, a word of its reason).
DEFECTS = [
    (lambda i: json.dumps(_good(i))[:-9], "malformed JSON", "not valid JSON"),                 # truncated line
    (lambda i: json.dumps([_good(i)]), "not a JSON object", "JSON object"),
    (lambda i: json.dumps({k: v for k, v in _good(i).items() if k != "completion"}), "missing field",
     "missing field 'completion'"),
    (lambda i: json.dumps({**_good(i), "prompt": None}), "null field", "field 'prompt' is null"),
    (lambda i: json.dumps({**_good(i), "completion": ""}), "empty string", "field 'completion' is empty"),
    (lambda i: json.dumps({**_good(i), "prompt": "  \t "}), "empty string", "field 'prompt' is whitespace only"),
    (lambda i: json.dumps({**_good(i), "completion": 7}), "wrong type", "field 'completion' must be"),
    (lambda i: json.dumps({**_good(i), "prompt": ["What is", "3 + 4 ?"]}), "malformed messages", "field 'prompt'[0]"),
    (lambda i: json.dumps({**_good(i), "prompt": LONG_PROMPT}), "longer than max_length", "over data.max_length=64"),
    (lambda i: json.dumps({**_good(i), "completion": [{"role": "assistant"}]}), "malformed messages",
     "field 'completion'[0]"),
]


def _planted_file(path: Path, n: int = 1000, per_kind: int = 5) -> dict[int, tuple[str, str]]:
    """Write ``n`` JSONL lines, ``per_kind`` of them for each defect, spread over the file; return
    {line number: (kind, reason word)} of the planted ones."""
    planted: dict[int, tuple[str, str]] = {}
    lines = []
    slots = iter(range(7, n, n // (per_kind * len(DEFECTS))))
    bad = {next(slots): k for _ in range(per_kind) for k in range(len(DEFECTS))}
    for i in range(n):
        if i in bad:
            make, kind, word = DEFECTS[bad[i]]
            lines.append(make(i))
            planted[i + 1] = (kind, word)
        else:
            lines.append(json.dumps(_good(i)))
    path.write_text("\n".join(lines) + "\n")
    return planted


def _recipe(tmp_path: Path, train: Path, **data) -> Path:
    raw = {"output_dir": str(tmp_path / "run"), "stages": ["sft"], "seed": 0,
           "model": {"init_config": {"d_model": 32, "n_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
                                     "max_sequence_length": 128, "mask_token_id": 5, "eos_token_id": 0,
                                     "pad_token_id": 0},
                     "tokenizer": "builtin:arithmetic"},
           "data": {"task": None, "train_files": [str(train)], "use_chat_template": True, "max_length": MAX_LENGTH,
                    **data},
           "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                   "use_cpu": True},
           "eval": {"enabled": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def planted(tmp_path):
    train = tmp_path / "train.jsonl"
    return train, _planted_file(train)


def test_strict_reports_all_50_defects_with_their_lines_before_the_model(planted, tmp_path, capsys, monkeypatch):
    import align.pipeline.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("the model was loaded before the rows were checked"))
    train, lines = planted
    assert len(lines) == 50 and len({k for k, _ in lines.values()}) == 8     # 10 defects, 8 kinds of problem
    assert main(["run", str(_recipe(tmp_path, train))]) == 2
    err = capsys.readouterr().err
    assert f"{train}: 50 bad row(s) of 1000 (" in err
    assert "Traceback" not in err and "position" not in err and "KeyError" not in err
    reported = [line.strip() for line in err.splitlines() if line.strip().startswith(f"{train}:")]
    assert len(reported) == 50
    for line_no, (_kind, word) in lines.items():
        hit = [r for r in reported if r.startswith(f"{train}:{line_no}: ")]
        assert len(hit) == 1 and word in hit[0], (line_no, word, hit)
    # validate reports the same rows and the same counts
    assert main(["validate", str(_recipe(tmp_path, train))]) == 2
    out = capsys.readouterr().out
    assert "data: 50 bad row(s) of 1000" in out
    assert all(f"{train}:{line_no}: " in out for line_no in lines)


def test_the_exception_lists_every_problem_and_counts_by_kind(planted, tmp_path):
    from align.pipeline.recipe import check_data

    train, lines = planted
    cfg = load_config(_recipe(tmp_path, train))
    with pytest.raises(BadRowsError) as info:
        check_data(cfg, __import__("align.build", fromlist=["x"]).build_tokenizer("builtin:arithmetic"))
    err = info.value
    assert sorted(int(p.where.rsplit(":", 1)[1]) for p in err.problems) == sorted(lines)
    assert {p.where: p.kind for p in err.problems} == {f"{train}:{n}": k for n, (k, _) in lines.items()}
    assert "(5 malformed JSON, 5 not a JSON object, 5 missing field, 5 null field, 5 wrong type, 10 empty string, " \
           "10 malformed messages, 5 longer than max_length):" in str(err)
    fields = {p.where: p.field for p in err.problems}
    assert fields[f"{train}:{min(n for n, (k, _) in lines.items() if k == 'missing field')}"] == "completion"


def test_skip_trains_on_the_950_good_rows(planted, tmp_path, caplog, monkeypatch):
    import align.pipeline.stage as stage_module

    seen = {}
    original = stage_module._build_trainer

    def spy(cfg, stage, model, tokenizer, train):
        trainer, runner = original(cfg, stage, model, tokenizer, train)
        seen[stage] = len(trainer.train_dataset)
        return trainer, runner

    monkeypatch.setattr(stage_module, "_build_trainer", spy)
    train, _ = planted
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(_recipe(tmp_path, train, bad_rows="skip"))]) == 0
    assert seen == {"sft": 950}
    assert "50 bad row(s) of 1000 (5 malformed JSON" in caplog.text
    assert "left out (data.bad_rows: skip): 950 of 1000 rows remain" in caplog.text


def test_validate_skip_prints_the_rows_kept_and_left_out(planted, tmp_path, capsys):
    train, _ = planted
    assert main(["validate", str(_recipe(tmp_path, train, bad_rows="skip"))]) == 0
    out = capsys.readouterr().out
    assert "sft: 950 of 1000 rows kept; left out (data.bad_rows: skip): 5 malformed JSON" in out


def test_bad_rows_is_checked_at_load_time(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps(_good(0)) + "\n")
    with pytest.raises(ValueError, match=r"'data.bad_rows' must be one of strict, skip, got 'drop'"):
        load_config(_recipe(tmp_path, train, bad_rows="drop"))


def test_reader_names_lines_and_keeps_reading(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "compl\n42\n'
                 '{"prompt": "d", "completion": "e"}\n')
    raw = read_rows(str(f))
    assert raw.places == [f"{f}:1", f"{f}:5"] and raw.read == 4
    assert [(p.where, p.kind) for p in raw.problems] == [(f"{f}:3", "malformed JSON"), (f"{f}:4", "not a JSON object")]
    assert "column" in raw.problems[0].reason and "position" not in raw.problems[0].reason
    with pytest.raises(BadRowsError, match=rf"{f}:3: not valid JSON"):
        load_files(str(f))
    assert len(load_files(str(f), bad_rows="skip")) == 2


def test_json_array_and_mixed_types_load(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"prompt": "a", "completion": "b", "meta": 1}, {"prompt": "c", "completion": "d",
                                                                          "meta": "x"}, 3]))
    raw = read_rows(str(f))
    assert raw.places == [f"{f} row 0", f"{f} row 1"] and raw.problems[0].where == f"{f} row 2"
    ds = rows_to_dataset(raw.rows)                                    # 'meta' mixes a number and a string
    assert ds[1]["meta"] == "x" and ds[0]["meta"] == 1


def test_tokenisers_collect_every_bad_row(tok_arith, caplog):
    rows = [_good(0), {**_good(1), "completion": " "}, _good(2), {**_good(3), "prompt": LONG_PROMPT}]
    ds = Dataset.from_list(rows)
    with pytest.raises(BadRowsError) as info:
        tokenize_dataset(ds, tok_arith, max_length=MAX_LENGTH, source="t.jsonl")
    assert [p.where for p in info.value.problems] == ["t.jsonl row 1", "t.jsonl row 3"]
    with caplog.at_level(logging.WARNING):
        out = tokenize_dataset(ds, tok_arith, max_length=MAX_LENGTH, source="t.jsonl", bad_rows="skip")
    assert out["prompt"] == [rows[0]["prompt"], rows[2]["prompt"]] and "1 empty string, 1 longer than" in caplog.text
    prompts = Dataset.from_list([_good(0), {**_good(1), "answer": ""}, {**_good(2), "prompt": LONG_PROMPT}])
    with pytest.raises(BadRowsError) as info:
        tokenize_prompts(prompts, tok_arith, max_length=MAX_LENGTH, source="p")
    assert [(p.where, p.field, p.kind) for p in info.value.problems] == [
        ("p row 1", "answer", "empty string"), ("p row 2", None, "longer than max_length")]


def test_preference_rows_follow_bad_rows_and_bad_pairs(tok_arith):
    good = {"prompt": "What is 3 + 4 ?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"}
    ds = Dataset.from_list([good, {**good, "rejected": good["chosen"]}, {**good, "chosen": None}])
    with pytest.raises(BadRowsError) as info:
        tokenize_preferences(ds, tok_arith, source="p")
    assert [(p.where, p.kind) for p in info.value.problems] == [("p row 1", "chosen equals rejected"),
                                                                 ("p row 2", "null field")]
    with pytest.raises(BadRowsError) as info:                       # drop: equal pairs only; the null still stops
        tokenize_preferences(ds, tok_arith, source="p", bad_pairs="drop")
    assert [p.where for p in info.value.problems] == ["p row 2"]
    assert len(tokenize_preferences(ds, tok_arith, source="p", bad_rows="skip")) == 1


def test_no_raw_errors_for_odd_values():
    from align.data.formatting import split_row

    for row in ({"prompt": {"a": 1}, "completion": "x"}, {"prompt": "p", "completion": [1, 2]},
                {"prompt": "p", "completion": []}, {"prompt": [], "completion": "x"}):
        with pytest.raises(DataFormatError) as info:
            split_row(row, "prompt_completion", "f:1")
        assert str(info.value).startswith("f:1: field ") and info.value.field in ("prompt", "completion")


@pytest.fixture(scope="module")
def tok_arith():
    from align.build import build_tokenizer

    return build_tokenizer("builtin:arithmetic")


if __name__ == "__main__":
    # Writes the drill's files for the CLI: DIR/train.jsonl and DIR/{strict,skip}/recipe.yaml.
    import sys

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(_planted_file(out / 'train.jsonl'))} planted defects in {out / 'train.jsonl'}")
    for policy in ("strict", "skip"):
        (out / policy).mkdir(exist_ok=True)
        print(_recipe(out / policy, out / "train.jsonl", bad_rows=policy))

"""Honest re-runs: a run directory's results are reused only by the recipe they came from; otherwise the run stops
before writing anything, naming each changed key and the ways out (a new output_dir, --restart, --restart-from)."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.config import config_to_dict, load_config
from align.pipeline.reruns import changed_keys
from align.recipes import recipe_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: its path and the hash of its bytes (folders: ``dir``)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------- which keys a result uses
def test_each_result_depends_on_its_own_keys_only():
    old = {"seed": 0, "output_dir": "a", "run_name": None, "stages": ["sft", "grpo"], "model": {"path": "m"},
           "data": {"task": "arithmetic"}, "peft": None, "eval": {"num_problems": 8},
           "sft": {"max_steps": 10, "logging_steps": 1, "save_steps": 2}, "grpo": {"beta": 0.0}}
    assert changed_keys(old, old, "grpo") == []
    cosmetic = {**old, "output_dir": "b", "run_name": "x", "sft": {**old["sft"], "logging_steps": 5, "save_steps": 9}}
    assert changed_keys(old, cosmetic, "grpo") == []                         # cadence and names change no result
    later = {**old, "grpo": {"beta": 0.1}}
    assert changed_keys(old, later, "sft") == []                             # a later stage does not touch sft ...
    assert changed_keys(old, later, "grpo") == [("grpo.beta", 0.0, 0.1)]     # ... but is itself changed
    earlier = {**old, "sft": {**old["sft"], "max_steps": 300}}
    assert changed_keys(old, earlier, "grpo") == [("sft.max_steps", 10, 300)]  # grpo starts from sft's model
    assert changed_keys(old, earlier, None) == []                            # the base evaluation does not
    shared = {**old, "eval": {"num_problems": 9}, "peft": {"r": 4}}
    assert [k for k, _, _ in changed_keys(old, shared, None)] == ["eval.num_problems", "peft"]
    assert changed_keys(old, shared, None)[1] == ("peft", None, {"r": 4})
    assert changed_keys(old, {**old, "stages": ["grpo"]}, "grpo")[0][0] == "stages"
    assert changed_keys(old, {**old, "stages": ["sft", "grpo", "vrpo"]}, "grpo") == []   # a stage appended


# ----------------------------------------------------------------------------- the quickstart, finished before
@pytest.fixture()
def finished_quickstart(tmp_path: Path) -> Path:
    """A run directory as a finished default `dlm-align run quickstart` leaves it (recipe, report, finals,
    checkpoints and evaluations; the weights are stand-ins, never read by a refused run)."""
    out = tmp_path / "quickstart"
    cfg = config_to_dict(load_config(recipe_path("quickstart"), [f"output_dir={out}"]))
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = {"accuracy": 0.1, "mean_completion_length": 20.0, "num_problems": 500}
    report = {"stages": {"base": result}, "recipe": cfg, "seconds": {}}
    for stage in ("sft", "grpo"):
        for name in ("final", "checkpoint-10"):
            (out / stage / name).mkdir(parents=True)
            (out / stage / name / "config.json").write_text("{}")
            (out / stage / name / "model.safetensors").write_bytes(stage.encode() * 100)
        (out / stage / "checkpoint-10" / ".complete").write_text("10")
        report["stages"][stage] = {"checkpoint": str(out / stage / "final"), "merged": True, **result}
    (out / "eval").mkdir()
    for stage in ("base", "sft", "grpo"):
        (out / "eval" / f"{stage}.jsonl").write_text('{"correct": false}\n')
    (out / "report.json").write_text(json.dumps(report))
    return out


def test_quickstart_rerun_with_other_max_steps_stops_and_changes_nothing(finished_quickstart, capsys):
    before = _snapshot(finished_quickstart)
    code = main(["run", "quickstart", f"output_dir={finished_quickstart}", "sft.max_steps=300"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sft.max_steps: 1000 -> 300" in err
    assert "sft (finished), grpo (finished)" in err                # grpo trained from sft's model
    assert "output_dir=" in err and "--restart-from sft" in err and "--restart " in err
    assert _snapshot(finished_quickstart) == before


def test_changed_evaluation_settings_name_the_base_evaluation(finished_quickstart, capsys):
    before = _snapshot(finished_quickstart)
    assert main(["run", "quickstart", f"output_dir={finished_quickstart}", "eval.num_problems=100"]) == 2
    err = capsys.readouterr().err
    assert "eval.num_problems: 500 -> 100" in err and "base (evaluated)" in err
    assert "--restart-from" not in err                             # only a full restart redoes the base evaluation
    assert _snapshot(finished_quickstart) == before


def test_restart_from_an_unknown_stage_is_refused(finished_quickstart, capsys):
    before = _snapshot(finished_quickstart)
    assert main(["run", "--restart-from", "vrpo", "quickstart", f"output_dir={finished_quickstart}"]) == 2
    assert "--restart-from vrpo: not a stage of this recipe (sft, grpo)" in capsys.readouterr().err
    assert _snapshot(finished_quickstart) == before


# ---------------------------------------------------------------------------------------- a tiny run, for real
@pytest.fixture()
def tiny(tmp_path: Path, tiny_init_config):
    """``tiny(*overrides, flags=())``: `dlm-align run` of a 4-step SFT recipe with a 4-problem evaluation."""
    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 4, "seed": 0}, "max_length": 128},
           "sft": {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                   "learning_rate": 1e-2},
           "eval": {"num_problems": 4, "batch_size": 4, "gen_length": 8, "denoising_steps": 8, "block_length": 8}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))

    def run(*overrides: str, flags: tuple[str, ...] = ()) -> int:
        return main(["run", *flags, str(path), *overrides])

    return run


def test_unchanged_rerun_reuses_and_changed_rerun_stops(tiny, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    assert tiny() == 0
    finished = _snapshot(run_dir / "sft")
    caplog.set_level(logging.INFO, logger="align.pipeline.recipe")
    assert tiny("sft.logging_steps=2") == 0                        # cadence only: the stage is reused
    assert "stage sft already finished" in caplog.text
    assert _snapshot(run_dir / "sft") == finished
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["sft"]["logging_steps"] == 2
    capsys.readouterr()

    before = _snapshot(run_dir)
    assert tiny("sft.max_steps=6") == 2
    err = capsys.readouterr().err
    assert "sft.max_steps: 4 -> 6" in err and "sft (finished)" in err
    assert _snapshot(run_dir) == before

    # partly trained (a checkpoint, no final, no report entry): resuming with other settings is refused as well
    import shutil

    shutil.rmtree(run_dir / "sft" / "final")
    report = json.loads((run_dir / "report.json").read_text())
    del report["stages"]["sft"]
    (run_dir / "report.json").write_text(json.dumps(report))
    before = _snapshot(run_dir)
    assert tiny("sft.learning_rate=0.5") == 2
    err = capsys.readouterr().err
    assert "sft.learning_rate: 0.01 -> 0.5" in err and "sft (partly trained)" in err
    assert _snapshot(run_dir) == before


def test_restart_from_replaces_the_stage_and_records_what_ran(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert tiny() == 0
    (run_dir / "notes.txt").write_text("mine")
    assert tiny("sft.max_steps=2", flags=("--restart-from", "sft")) == 0
    assert sorted(p.name for p in (run_dir / "sft").glob("checkpoint-*")) == ["checkpoint-2"]  # no step-4 leftover
    report = json.loads((run_dir / "report.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert report["recipe"]["sft"]["max_steps"] == recipe["sft"]["max_steps"] == 2
    state = json.loads((run_dir / "sft" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2 and set(report["stages"]) == {"base", "sft"}

    assert tiny("eval.num_problems=2", flags=("--restart",)) == 0  # the base evaluation is redone too
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"]["base"]["num_problems"] == report["stages"]["sft"]["num_problems"] == 2
    assert (run_dir / "notes.txt").read_text() == "mine"           # only the run's own files are deleted


def test_a_restart_also_deletes_the_report_page_and_its_plots(tmp_path):
    from align.pipeline.reruns import restart_paths

    cfg = load_config(recipe_path("quickstart"), [f"output_dir={tmp_path}"])
    for name in ("report.json", "report.md", "plots", "sft", "grpo", "notes.txt"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    everything, _ = restart_paths(cfg, None, True)
    assert {p.name for p in everything} == {"report.json", "report.md", "plots", "sft", "grpo"}  # notes.txt stays
    from_grpo, drop = restart_paths(cfg, "grpo", False)
    assert {p.name for p in from_grpo} == {"grpo", "report.md", "plots"} and drop == ["grpo"]

"""Run reports: each stage's log_history.json, report.md with its table and PNG plots, `dlm-align report`."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, read from its header (fails on anything that is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def linked_images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def write_recipe(folder: Path, tiny_init_config, **sections) -> Path:
    raw = {"seed": 0, "output_dir": str(folder / "run"), "stages": ["sft", "grpo"], "report_to": ["none"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 8, "seed": 0}, "max_length": 128},
           "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3},
           "grpo": {"max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                    "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "learning_rate": 1e-2,
                    "rewards": [{"name": "step_accuracy"}, {"name": "task_accuracy"}]},
           "eval": {"num_problems": 4, "gen_length": 8, "denoising_steps": 8, "block_length": 8}}
    raw.update(sections)
    raw = {k: v for k, v in raw.items() if v is not None}                   # a section given as None is left out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return folder / "recipe.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_init_config) -> Path:
    """SFT (4 steps) then GRPO (3 steps, beta 0: no KL), evaluated on 4 problems after each, through the CLI."""
    from align.cli import main

    folder = tmp_path_factory.mktemp("report")
    assert main(["run", str(write_recipe(folder, tiny_init_config))]) == 0
    return folder / "run"


def test_each_stage_keeps_its_log_history(tiny_run):
    sft = json.loads((tiny_run / "sft" / "log_history.json").read_text())
    grpo = json.loads((tiny_run / "grpo" / "log_history.json").read_text())
    assert [e["step"] for e in sft if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in grpo if "loss" in e] == [1, 2, 3]
    assert all("rewards/step_accuracy/mean" in e and "completions/mean_length" in e for e in grpo if "loss" in e)
    assert "train_runtime" in sft[-1] and "train_runtime" in grpo[-1]        # written at the end of the stage too


def test_report_md_has_the_table_and_valid_plots(tiny_run):
    text = (tiny_run / "report.md").read_text()
    report = json.loads((tiny_run / "report.json").read_text())
    for stage in ("base", "sft", "grpo"):
        r = report["stages"][stage]
        row = next(line for line in text.splitlines() if line.startswith(f"| {stage} |"))
        assert f"{100 * r['accuracy']:.1f}% (" in row and f"| {r['num_problems']} | {r['nfe']} |" in row
    assert "| sft vs base |" in text and "| grpo vs sft |" in text
    assert "<details>" in text and "stages:\n- sft\n- grpo" in text                # the recipe, folded
    links = linked_images(text)
    expected = {"eval", "sft_loss", "grpo_loss", "grpo_rewards", "grpo_clip_ratio", "grpo_completion_length",
                "grpo_rollout_tokens_per_second"}
    assert {Path(p).stem for p in links} == expected
    for link in links:
        width, height = png_size(tiny_run / link)
        assert width > 100 and height > 100
    assert sorted(p.name for p in (tiny_run / "plots").iterdir()) == sorted(f"{n}.png" for n in expected)
    # never logged, so never drawn: KL (beta 0) and the GRPO and VRPO metrics in the SFT stage
    assert not (tiny_run / "plots" / "grpo_kl.png").exists()
    assert not (tiny_run / "plots" / "sft_rewards.png").exists()


def test_report_command_rebuilds_the_same_report(tiny_run, capsys):
    from align.cli import main

    before = (tiny_run / "report.md").read_text()
    names = sorted(p.name for p in (tiny_run / "plots").iterdir())
    (tiny_run / "report.md").unlink()
    shutil.rmtree(tiny_run / "plots")
    assert main(["report", str(tiny_run)]) == 0
    assert f"report: {tiny_run / 'report.md'} ({len(names)} plots" in capsys.readouterr().out
    assert (tiny_run / "report.md").read_text() == before
    assert sorted(p.name for p in (tiny_run / "plots").iterdir()) == names


def test_missing_metrics_and_logs_leave_their_plots_out(tmp_path):
    """A VRPO stage that logged the accuracy but not the margin, an SFT stage with no log and no evaluation."""
    from align.pipeline.report import write_report_md

    run = tmp_path / "run"
    (run / "vrpo").mkdir(parents=True)
    (run / "plots").mkdir()
    (run / "plots" / "vrpo_kl.png").write_bytes(b"left from an earlier report")
    (run / "report.json").write_text(json.dumps({
        "stages": {"sft": {"checkpoint": "x"}, "vrpo": {"checkpoint": "y"}},
        "recipe": {"stages": ["sft", "vrpo"], "run_name": "partial"}, "seconds": {"sft": 75.0, "vrpo": 4000.0}}))
    (run / "vrpo" / "log_history.json").write_text(json.dumps([
        {"loss": 0.7, "rewards/accuracies": 0.5, "step": 10}, {"loss": 0.6, "rewards/accuracies": 0.75, "step": 20},
        {"loss": None, "step": 30}, {"train_runtime": 4.0, "step": 30}]))
    text = write_report_md(run).read_text()
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["vrpo_loss.png", "vrpo_preference_accuracy.png"]
    assert "# Run report: partial" in text
    assert "No training log: `sft/log_history.json` is missing." in text
    assert "| sft | – | – | – | – | – | 1m 15s | – |" in text and "| vrpo | – | – | – | – | – | 1h 06m | – |" in text
    assert "No paired comparison" in text
    assert linked_images(text) == ["plots/vrpo_loss.png", "plots/vrpo_preference_accuracy.png"]


def test_report_command_names_what_is_wrong(tmp_path, capsys):
    from align.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path}: no report.json here" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"stages": {}, "recipe": {"stages": ["sft"]}}))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "log_history.json").write_text("[{\"loss\": 1.0,")
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'sft' / 'log_history.json'}: not valid JSON" in capsys.readouterr().err


def test_results_rows_carry_95_percent_intervals(tmp_path):
    """The quickstart base model's numbers (43 of 500 right, none looping): Wilson intervals in the table."""
    from align.pipeline.report import write_report_md

    (tmp_path / "report.json").write_text(json.dumps({
        "stages": {"base": {"accuracy": 0.086, "loop_rate": 0.0, "mean_completion_length": 19.364,
                            "num_problems": 500, "nfe": 64}},
        "recipe": {"stages": []}, "seconds": {"eval_base": 78.4}}))
    text = write_report_md(tmp_path).read_text()
    assert "| base | 8.6% (6.4%–11.4%) | 0.0% (0.0%–0.8%) | 19.4 | 500 | 64 | – | 1m 18s |" in text
    assert linked_images(text) == ["plots/eval.png"]
    png_size(tmp_path / "plots" / "eval.png")


def test_resumed_stage_keeps_the_earlier_history(tmp_path, tiny_init_config):
    """An SFT stage checkpointed at steps 2 and 4, then cut back to its step-2 checkpoint with its log and final
    gone: the resumed stage's log holds steps 1-2 from the checkpoint (a value marked there shows it), then 3-4
    again, each once."""
    from align.cli import main

    recipe = write_recipe(tmp_path, tiny_init_config, stages=["sft"], eval={"enabled": False}, grpo=None,
                          sft={"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                               "learning_rate": 1e-3})
    assert main(["run", str(recipe)]) == 0
    stage = tmp_path / "run" / "sft"
    first = json.loads((stage / "log_history.json").read_text())
    for gone in ("final", "checkpoint-4"):
        shutil.rmtree(stage / gone)
    (stage / "log_history.json").unlink()
    state_file = stage / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["log_history"][0]["step"] == 1
    state["log_history"][0]["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    assert main(["run", str(recipe)]) == 0
    again = [e for e in json.loads((stage / "log_history.json").read_text()) if "loss" in e]
    trained = [e for e in first if "loss" in e]
    assert [e["step"] for e in again] == [1, 2, 3, 4]
    assert again[0]["loss"] == 123.0 and again[1] == trained[1]
    assert [e["loss"] for e in again[2:]] == pytest.approx([e["loss"] for e in trained[2:]], rel=1e-6)


def test_history_is_written_at_each_logging_step_by_the_main_process_only(tmp_path):
    from types import SimpleNamespace

    from align.pipeline.history import LogHistoryWriter, load_log_history

    main_rank, other_rank = LogHistoryWriter(tmp_path / "main"), LogHistoryWriter(tmp_path / "other")
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"loss": 1.5, "step": 1}])
    main_rank.on_log(None, state, None)
    assert load_log_history(tmp_path / "main") == [{"loss": 1.5, "step": 1}]
    state.log_history.append({"loss": float("nan"), "grad_norm": float("inf"), "step": 2})
    main_rank.on_log(None, state, None)
    assert load_log_history(tmp_path / "main")[1] == {"loss": None, "grad_norm": None, "step": 2}   # valid JSON
    other_rank.on_log(None, SimpleNamespace(is_world_process_zero=False, log_history=[{"step": 1}]), None)
    assert load_log_history(tmp_path / "other") is None

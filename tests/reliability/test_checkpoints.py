"""Crash-safe checkpoints on the tiny model: runs killed with SIGKILL (while training and while writing a
checkpoint) resume from the newest complete checkpoint and end bit-identical to uninterrupted runs; SIGTERM saves a
checkpoint at the next step boundary and stops; torn checkpoints are named and never resumed from."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from align.data.collator import SFTCollator
from align.trainers.checkpoints import (
    COMPLETE_MARKER,
    STAGING_DIR,
    last_complete_checkpoint,
    resume_checkpoint,
    torn_checkpoints,
)
from align.trainers.sft import DiffusionSFTTrainer
from align.trainers.sft_config import DiffusionSFTOptions

pytestmark = pytest.mark.usefixtures("one_thread")

#: randomised kills of the drill below, and the seed of their timing.
KILLS, KILL_SEED = 50, 18


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, different


def test_resume_skips_and_names_torn_checkpoints(tmp_path, caplog):
    """A newer checkpoint without its marker and one left in the staging folder are named and skipped; the
    staging leftover is deleted, the unmarked folder left where it is."""
    for name, marked in (("checkpoint-2", True), ("checkpoint-4", False), (f"{STAGING_DIR}/checkpoint-6", False)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "trainer_state.json").write_text("{}")
        if marked:
            (tmp_path / name / COMPLETE_MARKER).write_text("2")
    caplog.set_level(logging.WARNING, logger="align.trainers.checkpoints")
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert f"skipping torn checkpoint {tmp_path / 'checkpoint-4'} (no .complete marker)" in caplog.text
    assert f"{tmp_path / STAGING_DIR / 'checkpoint-6'} (never moved into place); deleting it" in caplog.text
    assert not (tmp_path / STAGING_DIR).exists() and (tmp_path / "checkpoint-4").is_dir()


# ------------------------------------------------------------------------- the SFT trainer in process, forked runs
def _sft_trainer(out: Path, model, max_steps: int, save: bool = True):
    """A tiny SFT trainer at a constant learning rate (its steps do not depend on ``max_steps``), saving a
    checkpoint after every step (``save``), the newest 3 kept. The modules it needs are imported at the top, so
    that forked runs start at once."""
    g = torch.Generator().manual_seed(0)
    rows = Dataset.from_dict({"prompt_ids": torch.randint(0, 250, (64, 3), generator=g).tolist(),
                              "completion_ids": torch.randint(0, 250, (64, 5), generator=g).tolist()})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=10_000,
                             save_strategy="steps" if save else "no", save_steps=1,
                             save_total_limit=3, report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=0, data_seed=0)
    return DiffusionSFTTrainer(model=model, args=args, train_dataset=rows,
                               data_collator=SFTCollator(model.config.pad_token_id, eos_train="all"),
                               mask_token_id=model.mask_token_id, options=DiffusionSFTOptions(), seed=0)


class _Report(TrainerCallback):
    """Writes a line to a pipe when training starts and after each checkpoint is in place."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def on_train_begin(self, args, state, control, **kw):
        os.write(self.fd, b"begin\n")

    def on_save(self, args, state, control, **kw):
        os.write(self.fd, f"saved {state.global_step}\n".encode())


def _fork_training(trainer, resume: str | None) -> tuple[int, int]:
    """Run ``trainer.train`` in a forked child (built and imported once here, so it starts at once), then save
    ``<output_dir>/final``; return ``(pid, read end of the child's pipe)``. This process's trainer stays untrained."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                 # the child: train, then leave without cleanup
        code = 0
        try:
            os.close(r)
            trainer.add_callback(_Report(w))
            trainer.train(resume_from_checkpoint=resume)
            trainer.save_model(str(Path(trainer.args.output_dir) / "final"))
        except BaseException:
            import traceback

            os.write(w, ("error " + traceback.format_exc()).encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _read_lines(fd: int, until: str | None = None) -> list[str]:
    """Lines from the pipe: up to the first starting with ``until``, or to its end."""
    lines, buf = [], b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return lines + ([buf.decode()] if buf else [])
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(line.decode())
            if until is not None and line.decode().startswith(until):
                return lines


#: set in the fresh interpreter that runs the kill drill (``os.fork`` is only safe in a process with one thread)
_FRESH = "DLM_ALIGN_KILL_DRILL_PROCESS"


def test_fifty_random_kills_each_resume_from_the_newest_complete_checkpoint(tmp_path, make_tiny_llada, caplog):
    """50 times: SIGKILL a training run at a random moment after its first checkpoint (most land while the next
    checkpoint is written: saving takes most of each step), then resume from the newest complete checkpoint. No
    torn checkpoint is ever in place or resumed from, each torn one is named, and the weights after the last
    resume equal those of a run that was never stopped.

    The runs are forked, and a fork copies only the calling thread: in a process where other threads hold locks
    (the rest of the suite leaves some), the child can wait on one forever. So the drill runs in a fresh
    interpreter with one thread."""
    if os.environ.get(_FRESH) != "1":
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                               f"{__file__}::test_fifty_random_kills_each_resume_from_the_newest_complete_checkpoint"],
                              env={**os.environ, _FRESH: "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        assert f"{KILLS} kills:" in done.stdout
        return
    rng = random.Random(KILL_SEED)

    def make_trainer(out: Path, max_steps: int, save: bool = True):
        return _sft_trainer(out, make_tiny_llada(seed=0, d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64)
                            .train(), max_steps, save)

    run, straight = tmp_path / "killed", tmp_path / "straight"
    trainer = make_trainer(run, 100_000)                       # never reached while it is being killed
    torn_seen, resumed_steps, pending = 0, [], []
    caplog.set_level(logging.WARNING, logger="align.trainers.checkpoints")
    for _ in range(KILLS):
        caplog.clear()
        resume = resume_checkpoint(run)
        warned = " ".join(r.getMessage() for r in caplog.records if "torn checkpoint" in r.getMessage())
        assert all(name in warned for name in pending), (pending, warned)   # each torn one is named ...
        assert not (run / STAGING_DIR).exists() and not torn_checkpoints(run)  # ... and none is left or in place
        if resume is not None:
            assert resume == last_complete_checkpoint(run) and (Path(resume) / COMPLETE_MARKER).is_file()
            resumed_steps.append(int(Path(resume).name.split("-")[1]))
            json.loads((Path(resume) / "trainer_state.json").read_text())   # whole files, not torn ones
            load_file(str(Path(resume) / "model.safetensors"))
        pid, fd = _fork_training(trainer, resume)
        lines = _read_lines(fd, until="saved")                 # one more checkpoint in place: progress
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
        assert any(line.startswith("saved") for line in lines), lines
        staging = run / STAGING_DIR
        pending = [str(p) for p in staging.iterdir()] if staging.is_dir() else []
        torn_seen += bool(pending)
    assert resumed_steps == sorted(resumed_steps) and len(set(resumed_steps)) == len(resumed_steps)
    # save_total_limit (3) is applied after each move: a kill between a move and the clean-up leaves one more complete
    # checkpoint in place, which the next save removes
    in_place = list(run.glob("checkpoint-*"))
    assert len(in_place) <= 4 and all((c / COMPLETE_MARKER).is_file() for c in in_place)
    last = resume_checkpoint(run)
    end = int(Path(last).name.split("-")[1]) + 3
    for out, resume in ((run, last), (straight, None)):       # the last resume, and a run never stopped
        pid, fd = _fork_training(make_trainer(out, end, save=out == run), resume)
        lines = _read_lines(fd)
        assert os.waitpid(pid, 0)[1] == 0, lines
    _same_weights(run / "final", straight / "final")
    print(f"\n{KILLS} kills: {torn_seen} left a torn checkpoint in {STAGING_DIR}; resumed at steps {resumed_steps}")


# ------------------------------------------------------------------------------- `dlm-align run` in a subprocess
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STAGE_OPTIONS = {
    "sft": {"max_steps": 24, "save_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
            "learning_rate": 1e-2},
    # μ = 2: a checkpoint inside a cycle carries its buffered rollouts; the regex reward varies between rollouts
    "grpo": {"max_steps": 4, "save_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2,
             "gen_length": 8, "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "learning_rate": 1e-2,
             "num_iterations": 2, "beta": 0.04, "temperature": 1.0,
             "rewards": [{"name": "regex_format", "pattern": "[0-9]", "mode": "search"}]},
}


def _recipe(folder: Path, stage: str) -> Path:
    """A tiny run of ``stage`` from the shipped base model (a random ``init_config`` would differ between
    processes)."""
    raw = {"seed": 0, "output_dir": str(folder / "run"), "stages": [stage],
           "model": {"path": "builtin:quickstart-base"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 64, "num_test": 8, "seed": 0}, "max_length": 128},
           stage: STAGE_OPTIONS[stage], "eval": {"enabled": False}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return folder / "recipe.yaml"


def _command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "align.cli", "run", str(recipe)]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The SFT and the GRPO run that nothing stops (started together, in the background): ``{stage: final}``."""
    root = tmp_path_factory.mktemp("straight")
    procs = {s: subprocess.Popen(_command(_recipe(root / s, s)), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in STAGE_OPTIONS}

    def final(stage: str) -> Path:
        _, err = procs[stage].communicate(timeout=600)
        assert procs[stage].returncode == 0, err[-3000:]
        return root / stage / "run" / stage / "final"

    yield final
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("stage,signum", [("sft", signal.SIGKILL), ("grpo", signal.SIGKILL),
                                          ("sft", signal.SIGTERM)], ids=["sft-SIGKILL", "grpo-SIGKILL", "sft-SIGTERM"])
def test_stopped_run_resumes_bit_identical(tmp_path, straight_runs, stage, signum):
    """`dlm-align run` stopped once a complete checkpoint exists (SIGKILL: nothing more is written; SIGTERM: a
    checkpoint at the next step boundary, exit status 143 and a message), then the same command again: it resumes
    from the newest complete checkpoint and ends with the weights of the run that was never stopped."""
    recipe = _recipe(tmp_path, stage)
    stage_dir = tmp_path / "run" / stage
    proc = subprocess.Popen(_command(recipe), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while last_complete_checkpoint(stage_dir) is None:      # polls the marker; no timing is asserted
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (stage_dir / "final").exists()                   # stopped before the end
    newest = last_complete_checkpoint(stage_dir)
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert f"stopped on SIGTERM after step {newest.rsplit('-', 1)[1]} (saved {newest})" in err
        assert "run the same command again to resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    again = subprocess.run(_command(recipe), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {stage} from {newest}" in again.stderr
    _same_weights(stage_dir / "final", straight_runs(stage))

"""Two-process training on the CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, launched with torchrun."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, init_config: dict, extra: dict) -> Path:
    raw = {
        "seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["pretrain"],
        "model": {"init_config": init_config, "tokenizer": "builtin:arithmetic"},
        "data": {"task": "arithmetic", "task_args": {"num_train": 64, "num_test": 8, "seed": 0}, "max_length": 128},
        "pretrain": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_steps": 3, **extra},
        "eval": {"enabled": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("# dlm-align run recipe.yaml\n" + yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_two_process_training(tmp_path, tiny_init_config, backend):
    extra = {} if backend == "ddp" else {"deepspeed": str(RECIPES / f"{backend}.json")}
    recipe = _recipe(tmp_path, tiny_init_config(), extra)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "align.cli",
                           "run", str(recipe)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = tmp_path / "run" / "pretrain" / "checkpoint-3"
    assert (ckpt / ".complete").exists()
    # one RNG state per rank: both processes took part
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # 64 rows, 4 per device, 2 devices: 8 rows per step
    assert abs(state["epoch"] - 3 * 8 / 64) < 1e-6
    from align.models import load_model

    model = load_model(str(tmp_path / "run" / "pretrain" / "final"))
    assert model.model.transformer.blocks[0].q_proj.weight.shape == (32, 32)  # gathered, not a ZeRO-3 shard

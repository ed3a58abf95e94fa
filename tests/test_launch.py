"""``dlm-align run RECIPE --nproc N``: the launch flags, the command it starts, and a 2-process SFT run on the CPU
(gloo) that ends with the same weights as the same recipe started by hand with torchrun."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main
from align.cli.launch import LaunchPlan, launch_command
from align.recipes import list_recipes

ACCELERATE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, init_config: dict, name: str) -> Path:
    raw = {
        "seed": 0, "output_dir": str(tmp_path / name), "stages": ["sft"],
        "model": {"init_config": init_config, "tokenizer": "builtin:arithmetic"},
        "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 8, "seed": 0}, "max_length": 128},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                "save_steps": 2},
        "eval": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# dlm-align run {name}.yaml\n" + yaml.safe_dump(raw))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "sft" / "final" / "model.safetensors"))


@pytest.mark.slow
def test_nproc_2_runs_both_ranks_and_matches_torchrun(tmp_path, tiny_init_config):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    launched = _recipe(tmp_path, tiny_init_config(), "launched")
    proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(launched), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "torch.distributed.run --nproc_per_node 2" in out      # the command it started, printed first
    assert "[default0]:" in out and "[default1]:" in out         # both ranks' output streamed, prefixed
    ckpt = tmp_path / "launched" / "sft" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert abs(state["epoch"] - 2 * 8 / 32) < 1e-6                # 4 rows per device x 2 devices per step
    report = json.loads((tmp_path / "launched" / "report.json").read_text())
    assert "sft" in report["stages"]

    by_hand = _recipe(tmp_path, tiny_init_config(), "by-hand")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "align.cli",
                           "run", str(by_hand)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _weights(tmp_path / "launched"), _weights(tmp_path / "by-hand")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("flags,needle", [
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nnodes", "0"], "--nnodes must be >= 1, got 0"),
    (["--node-rank", "1"], "--node-rank needs --nnodes M with M > 1"),
    (["--master-addr", "h"], "--master-addr needs --nnodes M with M > 1"),
    (["--master-port", "29500"], "--master-port needs --nproc N with N > 1"),
    (["--nproc", "2", "--master-port", "70000"], "--master-port must be in 1..65535, got 70000"),
    (["--nnodes", "2", "--master-addr", "h"], "--nnodes 2 needs --node-rank R (0..1)"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank must be in 0..1 for --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "0"], "--nnodes 2 needs --master-addr HOST"),
    (["--nproc", "2", "--config_file", "zero3.yaml"], "--config_file is accelerate's config: add --launcher"),
    (["--launcher", "accelerate", "--config_file", "nope.yaml"], "--config_file nope.yaml: file does not exist"),
])
def test_bad_launch_flags_exit_2_before_anything_runs(capsys, monkeypatch, flags, needle):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert main(["run", "quickstart", *flags]) == 2
    assert needle in capsys.readouterr().err


def test_nproc_inside_a_launched_process_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["run", "quickstart", "--nproc", "2"]) == 2
    assert "started by a launcher" in capsys.readouterr().err


def test_multi_node_commands():
    plan = LaunchPlan(nproc=8, nnodes=2, node_rank=1, master_addr="node0", master_port=29400)
    cmd = launch_command(plan, ["llada/sft-lora", "sft.max_steps=5", "--restart"])
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1:cmd.index("-m", i + 1)] == [
        "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node0",
        "--master_port", "29400", "--tee", "3"]
    assert cmd[-4:] == ["run", "llada/sft-lora", "sft.max_steps=5", "--restart"]
    assert "--nproc" not in cmd[cmd.index("align.cli"):]          # the launched processes run in-process
    plan = LaunchPlan(launcher="accelerate", nproc=8, nnodes=2, node_rank=0, master_addr="node0",
                      config_file="/x/zero3.yaml")
    cmd = launch_command(plan, ["illada/sft"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[3:cmd.index("align.cli") - 1] == [
        "--config_file", "/x/zero3.yaml", "--num_processes", "16", "--num_machines", "2", "--machine_rank", "0",
        "--main_process_ip", "node0", "--main_process_port", "29500"]


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                       ("fsdp2", "FSDP")])
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind
    if name.startswith("zero"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
    assert not any(r.startswith("accelerate/") for r in list_recipes())   # configs, not recipes


def test_accelerate_config_found_by_shipped_name(capsys, monkeypatch, tmp_path):
    """``--config_file zero3.yaml`` names the shipped file from any directory; the launch is not started here."""
    from align.cli import launch as launch_module

    started = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(launch_module, "launch", lambda plan, run_args, verbose=False: started.append(plan) or 0)
    assert main(["run", "quickstart", "--launcher", "accelerate", "--config_file", "zero3.yaml", "--nproc", "2"]) == 0
    assert started and started[0].config_file == str(ACCELERATE / "zero3.yaml")
    assert started[0].nproc == 2

"""GRPO metrics reach wandb (offline run directory with a completions table), tensorboard and trackio."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

METRICS = ("reward", "rewards/step_accuracy/mean", "advantages/std", "clip_ratio/region_mean",
           "completions/mean_length", "completions/clipped_ratio", "rollout/time_share", "rollout/tokens_per_second",
           "rollout/loop_guard_rows")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_init_config) -> Path:
    """One 3-step GRPO run reporting to all three loggers (offline), in a subprocess with its own log dirs."""
    tmp = tmp_path_factory.mktemp("logging")
    recipe = {
        "seed": 0, "output_dir": str(tmp / "run"), "stages": ["grpo"], "run_name": "logtest",
        "report_to": ["wandb", "tensorboard", "trackio"],
        "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
        "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 8, "seed": 0}, "max_length": 128},
        "grpo": {"max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                 "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "learning_rate": 1e-2,
                 "project": "dlm-test",
                 "loop_guard": {"enabled": True, "detection": {"min_span": 4}},
                 "rewards": [{"name": "step_accuracy"}, {"name": "task_accuracy"}]},
        "eval": {"enabled": False},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb_dir"), "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(tmp / "trackio"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    (tmp / "wandb_dir").mkdir()
    proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def read_wandb_records(path: Path) -> list:
    """Records of an offline run's transaction log (``run-<id>.wandb``): a 7-byte file header, then
    LevelDB-style 32 KiB blocks of chunks (crc32, length, type: full / first / middle / last), each record one
    serialized ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, partial = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def test_wandb_offline_run_has_metrics_and_completions_table(logged_run: Path) -> None:
    runs = list((logged_run / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = read_wandb_records(next(runs[0].glob("run-*.wandb")))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    train = [h for h in history if "train/reward" in h]
    assert len(train) == 3  # one row per logging step
    for key in METRICS:
        assert f"train/{key}" in train[0], key
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the stage closed its run
    tables = [h for h in history if h.get("completions/_type") == "table-file"]
    assert tables
    table = json.loads((runs[0] / "files" / tables[0]["completions/path"]).read_text())
    assert {"prompt", "completion", "reward", "advantage", "step"} <= set(table["columns"])
    assert table["data"] and all(len(row) == len(table["columns"]) for row in table["data"])


def test_tensorboard_events_have_the_metrics(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((logged_run / "run" / "grpo").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in METRICS:
        assert f"train/{key}" in tags, key
    assert len(acc.Scalars("train/reward")) == 3  # one point per logging step


def test_trackio_local_store_has_the_metrics(logged_run: Path) -> None:
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs('dlm-test', 'logtest-grpo'), default=str))")
    env = {**os.environ, "TRACKIO_DIR": str(logged_run / "trackio")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [r for r in logs if "train/reward" in r]
    assert len(rows) == 3
    for key in METRICS:
        assert f"train/{key}" in rows[0], key

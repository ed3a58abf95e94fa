"""Non-finite guards on the tiny model: a planted NaN step is skipped on every rank and leaves the weights and the
optimizer state as they were, the log names the step and the loss term, a NaN streak stops the run with a message,
and the sampler refuses NaN logits instead of decoding token 0."""

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ SFT trainer, in process
class _Snapshots(TrainerCallback):
    """Copies the weights and the optimizer state after every step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.optim: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        names = {id(p): n for n, p in model.named_parameters()}
        flat = {}
        for p, st in optimizer.state.items():
            for k, v in st.items():
                flat[f"{names[id(p)]}/{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        self.optim.append(flat)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sft_trainer(tmp_path: Path, model, *, max_steps: int, accumulation: int):
    from datasets import Dataset
    from transformers import TrainingArguments

    from align.data.collator import SFTCollator
    from align.trainers.sft import DiffusionSFTTrainer
    from align.trainers.sft_config import DiffusionSFTOptions

    rows = Dataset.from_dict({"prompt_ids": [[1, 2, 3]] * 32, "completion_ids": [[4, 5, 6, 7, 8]] * 32})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, max_steps=max_steps, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    return DiffusionSFTTrainer(model=model, args=args, train_dataset=rows,
                               data_collator=SFTCollator(model.config.pad_token_id, eos_train="all"),
                               mask_token_id=model.mask_token_id, options=DiffusionSFTOptions(), seed=0)


def test_planted_nan_step_is_skipped_and_leaves_weights_and_optimizer_unchanged(tmp_path, make_tiny_llada, caplog):
    """4 steps of 2 micro-batches; the second micro-batch of step 2 has NaN logits: step 2 is skipped as a whole."""
    model = make_tiny_llada(seed=0, d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64).train()
    calls = {"n": 0}

    def plant(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 4:                          # micro-batches 1, 2 = step 1; 3, 4 = step 2
            output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(plant)
    trainer = _sft_trainer(tmp_path, model, max_steps=4, accumulation=2)
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    with caplog.at_level(logging.WARNING, logger="align.trainers.guards"):
        trainer.train()
    assert len(snaps.weights) == 4
    assert _equal(snaps.weights[1], snaps.weights[0])          # step 2 skipped: weights ...
    assert _equal(snaps.optim[1], snaps.optim[0])              # ... and Adam's moments and step counts unchanged
    assert not _equal(snaps.weights[2], snaps.weights[1])      # step 3 trains again
    assert all(torch.isfinite(w).all() for s in snaps.weights for w in s.values())
    assert all(torch.isfinite(v).all() for s in snaps.optim for v in s.values())
    warnings = [r.getMessage() for r in caplog.records if r.name == "align.trainers.guards"]
    assert len(warnings) == 1
    assert warnings[0].startswith("step 2: non-finite sft/nll (nan)") and "sft/loss (nan)" in warnings[0]
    assert warnings[0].endswith("update skipped (1 in a row, 1 in all)")
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in logs] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert all(r["loss"] == r["loss"] for r in logs)           # the logged loss stays a number


def test_guard_leaves_overflow_to_a_float16_scaler_but_still_counts():
    """Under a gradient scaler the guard does not drop the gradients (the scaler skips the step and lowers its
    scale); the streak limit still applies."""
    from align.trainers.guards import NonFiniteGuard, NonFiniteLossError

    lin = torch.nn.Linear(3, 2)
    guard = NonFiniteGuard(max_consecutive=2)
    scaled = type("ScaledOptimizer", (), {"scaler": object()})()
    state = type("State", (), {"global_step": 7})()
    lin.weight.grad = torch.full_like(lin.weight, float("inf"))
    guard.on_pre_optimizer_step(None, state, None, model=lin, optimizer=scaled)
    assert lin.weight.grad is not None and guard.skipped == 1
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row .* step 8, non-finite gradient \(first in weight"):
        guard.on_pre_optimizer_step(None, state, None, model=lin, optimizer=scaled)
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.zeros_like(lin.bias)
    guard.on_pre_optimizer_step(None, state, None, model=lin, optimizer=scaled)
    assert guard.consecutive == 0 and guard.skipped == 2


def _two_rank_guard(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from align.trainers.guards import NonFiniteGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        lin = torch.nn.Linear(3, 2)
        lin.weight.grad = torch.ones_like(lin.weight)
        lin.bias.grad = torch.full_like(lin.bias, float("nan") if rank == 1 else 1.0)
        guard = NonFiniteGuard()
        guard.components.record({"test/term": torch.tensor(float("nan") if rank == 1 else 0.0)})
        logs = []
        handler = logging.Handler()
        handler.emit = lambda r: logs.append(r.getMessage())
        logging.getLogger("align.trainers.guards").addHandler(handler)
        guard.on_pre_optimizer_step(None, type("S", (), {"global_step": 0})(), None, model=lin)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"dropped": lin.weight.grad is None, "logs": logs}))
    finally:
        dist.destroy_process_group()


def test_a_step_non_finite_on_one_rank_is_skipped_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_rank_guard, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["dropped"] and r1["dropped"]                     # rank 0's finite gradients are dropped too
    assert r0["logs"] == ["step 1: non-finite gradient on another rank; update skipped (1 in a row, 1 in all)"]
    assert r1["logs"] == ["step 1: non-finite test/term (nan); update skipped (1 in a row, 1 in all)"]


# ------------------------------------------------------------------------------------------ through the CLI
def _recipe(tmp_path: Path, tiny_init_config, stage: str, section: dict) -> Path:
    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": [stage],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 8, "seed": 0}, "max_length": 128},
           stage: section, "eval": {"enabled": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_nan_streak_stops_the_run_with_a_message(tmp_path, tiny_init_config, monkeypatch, capsys):
    """Every SFT loss is NaN: `dlm-align run` stops after `sft.max_nonfinite_steps` steps, exit status 1."""
    import align.trainers.sft as sft
    from align.cli import main

    real = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    path = _recipe(tmp_path, tiny_init_config, "sft", {"max_steps": 10, "per_device_train_batch_size": 4,
                                                        "logging_steps": 1, "max_nonfinite_steps": 3})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: 3 steps in a row had a non-finite loss or gradient (last: step 3, non-finite sft/loss (nan))" in err
    assert "'max_nonfinite_steps'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_grpo_names_the_kl_term_of_a_planted_nan_step(tmp_path, tiny_init_config, monkeypatch, caplog):
    import align.trainers.grpo_loss as grpo
    from align.cli import main

    real, calls = grpo.k3_kl, {"n": 0}

    def planted(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(grpo, "k3_kl", planted)
    path = _recipe(tmp_path, tiny_init_config, "grpo", {
        "max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
        "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "learning_rate": 1e-2, "beta": 0.1,
        "save_steps": 3, "temperature": 1.0, "rewards": [{"name": "task_accuracy"}]})
    with caplog.at_level(logging.WARNING, logger="align.trainers.guards"):
        assert main(["run", str(path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "align.trainers.guards"]
    assert warnings == ["step 2: non-finite grpo/kl (nan); update skipped (1 in a row, 1 in all)"]
    state = json.loads((tmp_path / "run" / "grpo" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [r["skipped_steps"] for r in state["log_history"] if "loss" in r] == [0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampler_refuses_nan_logits(make_tiny_llada, backend):
    from align.kernels.sampling_step import triton_available
    from align.sampling import NonFiniteLogitsError, generate

    if backend == "triton" and not triton_available("cpu"):
        pytest.skip("triton is not installed")
    model = make_tiny_llada(seed=0)
    with torch.no_grad():
        model.model.transformer.ff_out.weight[7, 3] = float("nan")      # one damaged weight of the output head
    prompt = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(NonFiniteLogitsError) as exc:
        generate(model, prompt, gen_length=8, steps=8, block_length=8, backend=backend,
                 generator=torch.Generator().manual_seed(0))
    msg = str(exc.value)
    assert msg.startswith("denoising step 0: the model's logits are not finite at 8 of 8 positions being decoded "
                          "(8 with NaN); they would decode as token 0")
    assert "float16" in msg and "weights" in msg


def test_logit_check_allows_some_minus_inf_but_not_a_row_of_them():
    from align.sampling import NonFiniteLogitsError
    from align.sampling.select import check_logits

    logits = torch.randn(3, 10)
    logits[0, 4] = float("-inf")                                       # a banned token: still decodable
    check_logits(logits, step=2)
    logits[1] = float("-inf")
    logits[2, 0] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"^denoising step 2: .* at 2 of 3 positions .* \(0 with NaN\)"):
        check_logits(logits, step=2)

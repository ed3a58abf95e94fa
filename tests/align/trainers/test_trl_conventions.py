"""TRL's data and reward conventions in the GRPO stage: conversational data with rewards written for TRL,
TRL's loss types and their normalisation, TRL's metric names, and μ > 1 using every prompt it draws."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.trainers.grpo_math import LOSS_TYPES, WINDOW_NORMALIZED, aggregate, policy_objective
from align.trainers.grpo_metrics import policy_metrics, rollout_metrics

HERE = Path(__file__).resolve().parent
TRL_REWARDS = ("trl.rewards:accuracy_reward", "trl.rewards:think_format_reward")
OWN_REWARDS = ("gsm8k_rewards:correctness_reward", "gsm8k_rewards:int_reward", "gsm8k_rewards:tag_format_reward",
               "gsm8k_rewards:conversation_shape")
BUILT_IN = ("task_accuracy", "loop_penalty")   # dlm-align's own rewards take both forms


def _trl_source() -> str:
    import trl.trainer.grpo_trainer as trl_grpo

    return Path(trl_grpo.__file__).read_text()


def _conversational_rows(n: int) -> list[dict]:
    """GSM8K-shaped rows from the built-in task: ``prompt`` as chat messages, the worked solution ending in
    ``#### N`` as ``answer`` and the bare number as TRL's ``solution``."""
    from align.data.task import generate_problems

    return [{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": f"{p['completion']} #### {p['answer']}",
             "solution": str(p["answer"])} for p in generate_problems(n, seed=5)]


# ---------------------------------------------------------------------------------------------- end to end
def test_trl_conversational_rewards_run_unchanged_by_import_path(tmp_path, tiny_init_config):
    data = tmp_path / "gsm8k_style.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversational_rows(16)))
    recipe = {
        "seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["grpo"],
        "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
        "data": {"task": None, "train_files": [str(data)], "eval_files": [str(data)], "max_length": 128,
                 "system_prompt": "Answer the question."},
        "grpo": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                 "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-2,
                 "loss_type": "dapo", "rewards": [{"name": name} for name in TRL_REWARDS + OWN_REWARDS + BUILT_IN]},
        "eval": {"num_problems": 4, "batch_size": 4, "gen_length": 8, "denoising_steps": 8, "block_length": 8},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    state = json.loads((tmp_path / "run" / "grpo" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [r for r in state["log_history"] if "reward" in r]
    assert len(logged) == 2
    names = [name.split(":")[1] for name in TRL_REWARDS + OWN_REWARDS] + list(BUILT_IN)
    for row in logged:
        for name in names:
            assert row[f"reward_errors/{name}/failed_samples"] == 0, (name, row)
            assert row[f"reward_errors/{name}/error_rate"] == 0, (name, row)
            assert math.isfinite(row[f"rewards/{name}/mean"]), (name, row)
        # every sample reached the rewards as TRL's conversational form, system prompt first
        assert row["rewards/conversation_shape/mean"] == 1.0
        for key in ("completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                    "frac_reward_zero_std", "reward_std"):
            assert key in row, key
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["grpo"]["num_problems"] == 4


def test_the_gsm8k_style_rewards_need_the_conversational_form():
    """The rewards above fail on plain strings, so their zero failure count shows what they were given."""
    sys.path.insert(0, str(HERE))
    try:
        import gsm8k_rewards
    finally:
        sys.path.remove(str(HERE))
    convo = [[{"role": "system", "content": "s"}, {"role": "user", "content": "Tom has 3 pens. How many?"}]]
    right = [[{"role": "assistant", "content": "3 + 0 = 3. #### 3"}]]
    assert gsm8k_rewards.correctness_reward(prompts=convo, completions=right, answer=["3 = 3. #### 3"]) == [2.0]
    assert gsm8k_rewards.int_reward(completions=right) == [0.5]
    with pytest.raises(TypeError):
        gsm8k_rewards.correctness_reward(prompts=["Tom has 3 pens."], completions=["#### 3"], answer=["#### 3"])


# ---------------------------------------------------------------------------------------------- loss types
def test_loss_types_are_trls():
    from trl import GRPOConfig

    trl_help = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = re.search(r"Supported values are (.*?)\. ", trl_help).group(1)
    assert set(LOSS_TYPES) == set(re.findall(r"'(\w+)'", supported))


def test_each_loss_types_normalisation_by_hand():
    per = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    L = 3
    expected = {
        "grpo": ((1 + 2) / 2 + 3 / 1) / 2,    # each completion's token mean, then the mean over completions
        "sapo": ((1 + 2) / 2 + 3 / 1) / 2,
        "bnpo": (1 + 2 + 3) / 3,              # token mean of the micro-batch
        "dr_grpo": (1 + 2 + 3) / (2 * L),     # sum over N · gen_length
        "dapo": (1 + 2 + 3) / 3,              # without a window count: this micro-batch's tokens
        "cispo": (1 + 2 + 3) / 3,
        "vespo": (1 + 2 + 3) / 3,
        "luspo": ((1 + 2) + 3) / 2,           # each completion's token sum, mean over completions
    }
    assert set(expected) == set(LOSS_TYPES)
    for loss_type, value in expected.items():
        assert aggregate(per, m, loss_type, L).item() == pytest.approx(value), loss_type
    for loss_type in WINDOW_NORMALIZED:        # the step's token count, per process, as TRL's num_items_in_batch
        assert aggregate(per, m, loss_type, L, num_items=12.0).item() == pytest.approx(6 / 12)
    # one ratio per completion ([N, 1]) is broadcast over its tokens, as in TRL's sequence level
    seq = torch.tensor([[2.0], [5.0]])
    assert aggregate(seq, m, "grpo", L).item() == pytest.approx((2 + 5) / 2)
    assert aggregate(seq, m, "bnpo", L).item() == pytest.approx((2 * 2 + 5) / 3)
    assert aggregate(seq, m, "dr_grpo", L).item() == pytest.approx((2 * 2 + 5) / 6)
    assert aggregate(seq, m, "luspo", L).item() == pytest.approx((2 * 2 + 5) / 2)


def test_dapo_over_an_accumulation_window_is_the_token_mean_of_the_step():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(2, 4, generator=g) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool),
             torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)]
    tokens = sum(int(mk.sum()) for mk in masks)                     # 4 + 6
    summed = sum(aggregate(p, mk, "dapo", 4, num_items=tokens) for p, mk in zip(parts, masks, strict=True))
    by_hand = sum(float((p * mk).sum()) for p, mk in zip(parts, masks, strict=True)) / tokens
    assert summed.item() == pytest.approx(by_hand)
    # grpo's micro-batch means divided by the accumulation steps weigh the two micro-batches equally instead
    grpo = sum(aggregate(p, mk, "grpo", 4) for p, mk in zip(parts, masks, strict=True)) / 2
    assert grpo.item() != pytest.approx(by_hand)


def test_policy_objectives_by_hand():
    rho = torch.tensor([[1.5, 0.5]])
    A = torch.tensor([[1.0]])
    logp = torch.tensor([[-0.7, -0.2]], requires_grad=True)
    log_ratio = torch.log(rho)
    clipped = policy_objective("dapo", log_ratio, A, logp, eps_low=0.2, eps_high=0.2)
    assert clipped.tolist()[0] == pytest.approx([-1.2, -0.5])          # −min(ρA, clip(ρ)A)
    neg = policy_objective("grpo", log_ratio, -A, logp, eps_low=0.2, eps_high=0.2)
    assert neg.tolist()[0] == pytest.approx([1.5, 0.8])                # A < 0: −min(−ρ, −clip(ρ))
    cispo = policy_objective("cispo", log_ratio, 2 * A, logp, eps_low=0.2, eps_high=1.3)
    assert cispo.tolist()[0] == pytest.approx([-(1.3 * 2 * -0.7), -(0.5 * 2 * -0.2)])
    cispo.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.6, -1.0])        # the capped ratio carries no gradient
    sapo = policy_objective("sapo", log_ratio, A, logp, eps_low=0.2, eps_high=0.2, sapo_temperature_pos=1.0)
    sig = torch.sigmoid(torch.tensor([0.5, -0.5]))
    assert sapo.tolist()[0] == pytest.approx((-sig * 4).tolist())
    sapo_neg = policy_objective("sapo", log_ratio, -A, logp, eps_low=0.2, eps_high=0.2, sapo_temperature_neg=1.05)
    sig = torch.sigmoid(1.05 * torch.tensor([0.5, -0.5]))
    assert sapo_neg.tolist()[0] == pytest.approx((sig * 4 / 1.05).tolist())
    # vespo: φ(w) = exp(λ + k log w − λ w) of the completion's summed log-ratio, here log w = log 1.5 + log 0.5
    mask = torch.ones(1, 2, dtype=torch.bool)
    vespo = policy_objective("vespo", log_ratio, A, logp.detach(), mask, eps_low=0.2, eps_high=0.2)
    w = 1.5 * 0.5
    phi = math.exp(3.0 + 2.0 * math.log(w) - 3.0 * w)                  # TRL's defaults for A ≥ 0: k = 2, λ = 3
    assert vespo.tolist()[0] == pytest.approx([phi * 0.7, phi * 0.2])


def test_loss_type_options_are_checked_when_loaded():
    from align.options import FieldError
    from align.trainers.grpo_config import GRPOOptions

    assert GRPOOptions().loss_type == "grpo"                            # dlm-align's default (TRL's is dapo)
    assert GRPOOptions(loss_type="sapo").loss_args == {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}
    assert GRPOOptions(loss_type="vespo", vespo_k_pos=1.0).loss_args["vespo_k_pos"] == 1.0
    assert GRPOOptions(loss_type="dapo").loss_args == {}
    with pytest.raises(FieldError, match="'sapo_temperature_pos' only applies with 'loss_type' sapo"):
        GRPOOptions(loss_type="dapo", sapo_temperature_pos=2.0)
    with pytest.raises(FieldError, match="'vespo_lambda_neg' must be > 0"):
        GRPOOptions(loss_type="vespo", vespo_lambda_neg=0.0)
    with pytest.raises(FieldError, match="'epsilon_high' is required with 'loss_type' cispo"):
        GRPOOptions(loss_type="cispo")
    assert GRPOOptions(loss_type="cispo", epsilon_high=5.0).epsilon_high == 5.0


# ---------------------------------------------------------------------------------------------- metrics
def test_metric_names_are_trls_and_values_by_hand():
    names = ("acc",)
    per_fn = torch.tensor([[1.0], [0.0], [float("nan")], [1.0]])
    total = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    lengths = torch.tensor([2, 5, 0, 5])                   # tokens before the first stop; 5 = none within L = 5
    has_stop = lengths < 5
    out = rollout_metrics(names, per_fn, total, torch.tensor([0.5, -0.5, 0.0, 0.0]), lengths, has_stop, 2)
    assert out["completions/mean_length"] == pytest.approx((3 + 5 + 1 + 5) / 4)   # len(completion_ids)
    assert (out["completions/min_length"], out["completions/max_length"]) == (1, 5)
    assert out["completions/mean_terminated_length"] == pytest.approx(2.0)
    assert (out["completions/min_terminated_length"], out["completions/max_terminated_length"]) == (1, 3)
    assert out["completions/clipped_ratio"] == pytest.approx(0.5)
    assert out["rewards/acc/mean"] == pytest.approx(2 / 3) and out["reward"] == pytest.approx(2 / 3)
    assert out["frac_reward_zero_std"] == pytest.approx(0.5)    # the group (nan, 1) has one value: no signal

    log_ratio = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.0, 1.0]]))
    A = torch.tensor([[1.0], [-1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    pol = policy_metrics("grpo", log_ratio, A, mask, eps_low=0.2, eps_high=0.2, kl=torch.zeros(2, 3))
    assert pol["clip_ratio/high_mean"] == pytest.approx(1 / 5)     # ρ > 1.2 with A > 0
    assert pol["clip_ratio/low_mean"] == pytest.approx(1 / 5)      # ρ < 0.8 with A < 0
    assert pol["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert pol["clip_ratio/low_min"] == 0.0 and pol["clip_ratio/high_max"] == pytest.approx(1 / 3)
    assert pol["kl"] == 0.0
    cispo = policy_metrics("cispo", log_ratio, A, mask, eps_low=0.2, eps_high=1.2)
    assert set(cispo) == {"cispo_clip_ratio"} and cispo["cispo_clip_ratio"] == pytest.approx(1 / 5)
    vespo = policy_metrics("vespo", log_ratio, A, mask, eps_low=0.2, eps_high=0.2,
                           loss_args={"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0,
                                      "vespo_lambda_neg": 2.0})
    w = (1.5 * 1.0 * 0.5, 0.5 * 1.0)                      # each completion's ratio over its masked tokens
    phi = (math.exp(3 + 2 * math.log(w[0]) - 3 * w[0]), math.exp(2 + 3 * math.log(w[1]) - 2 * w[1]))
    assert set(vespo) == {"vespo/phi_seq_mean"} and vespo["vespo/phi_seq_mean"] == pytest.approx(sum(phi) / 2)

    trl = _trl_source()
    logged_by_trl = set(re.findall(r'_metrics\[mode\]\["([^"]+)"\]', trl))
    ours = {k for k in [*out, *pol, *cispo, *vespo] if not k.startswith(("advantages/", "rewards/"))}
    assert ours <= logged_by_trl, sorted(ours - logged_by_trl)
    assert 'f"rewards/{reward_func_name}/mean"' in trl and 'f"rewards/{reward_func_name}/std"' in trl


# ---------------------------------------------------------------------------------------------- μ > 1
def test_repeated_window_sampler_yields_each_window_mu_times():
    from align.trainers.grpo_buffer import RepeatedWindowSampler, repeated_window_sampler

    sampler = RepeatedWindowSampler(10, 4, 3, seed=7)
    sampler.set_epoch(0)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 * 4 * 3                  # two whole windows; the last 2 rows wait
    windows = [first[i:i + 4] for i in range(0, len(first), 4)]
    assert windows[0] == windows[1] == windows[2] and windows[3] == windows[4] == windows[5]
    assert len(set(windows[0]) | set(windows[3])) == 8               # distinct rows, none twice in an epoch
    sampler.set_epoch(0)
    assert list(sampler) == first                                    # a resumed epoch sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    ordered = RepeatedWindowSampler(8, 4, 2, seed=0, shuffle=False)
    assert list(ordered) == [0, 1, 2, 3] * 2 + [4, 5, 6, 7] * 2
    with pytest.raises(ValueError, match="fewer than one optimizer step uses"):
        repeated_window_sampler(3, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"'grpo\.train_sampling_strategy' 'group_by_length' cannot be combined"):
        repeated_window_sampler(8, 4, 2, seed=0, strategy="group_by_length")

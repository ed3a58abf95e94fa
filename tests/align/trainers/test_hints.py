"""IGPO-style hints (align/trainers/hints.py): the sampler's fixed positions, the hint draw, which groups get hints and
which completions they replace, the recipe checks, and a GRPO run in which hints turn all-wrong groups into groups
with signal."""

import json

import pytest
import torch

from align.options import FieldError
from align.rng import make_generator
from align.trainers.grpo_config import GRPOOptions
from align.trainers.grpo_rollout import Sampled
from align.trainers.hints import all_wrong_groups, hint_ids, splice

MASK = 5


@pytest.fixture(scope="module")
def tiny_model(tiny_init_config):
    from align.build import build_model_and_tokenizer
    from align.config.sections import ModelConfig

    return build_model_and_tokenizer(ModelConfig(init_config=tiny_init_config(), tokenizer="builtin:arithmetic"),
                                     seed=1)[0].eval()


def test_sampler_keeps_fixed_positions_and_decodes_the_rest(tiny_model):
    from align.sampling import generate

    prompts = torch.randint(6, 20, (2, 5), generator=make_generator(0))
    fixed = torch.full((2, 8), MASK)
    fixed[0, 1:3] = torch.tensor([7, 8])
    fixed[1, 6] = 9
    out = generate(tiny_model, prompts, gen_length=8, steps=8, block_length=4, temperature=1.0, num_generations=2,
                   fixed=fixed, generator=make_generator(1))
    comp, given = out.completion_ids, fixed.repeat_interleave(2, 0) != MASK
    assert torch.equal(comp[given], fixed.repeat_interleave(2, 0)[given])     # hints kept as given
    assert (out.commit_step[given] == -1).all()                                # never committed by a step
    assert (comp != MASK).all() and (out.commit_step[~given] >= 0).all()       # everything else decoded
    with pytest.raises(Exception, match="fixed must be integer ids"):
        generate(tiny_model, prompts, gen_length=8, steps=8, block_length=4, fixed=torch.full((3, 8), MASK))


def test_hint_ids_fix_a_share_of_the_reference_at_its_own_positions():
    refs = [list(range(10, 30)), list(range(40, 44)), []]
    out = hint_ids(refs, 16, MASK, (0.25, 0.5), make_generator(3))
    assert out.shape == (3, 16)
    for ref, row in zip(refs, out.tolist(), strict=True):
        kept = [k for k, t in enumerate(row) if t != MASK]
        assert all(row[k] == ref[k] for k in kept)                 # a hint token sits where the reference has it
        n = min(len(ref), 16)
        if n:
            assert len(kept) >= -(-n // 4)                          # at least ⌈0.25·n⌉ tokens
            assert len(kept) < n or n <= 4                          # never the whole reference when n > 4 ...
    assert (out[2] == MASK).all()                                   # an empty reference gives no hint
    assert torch.equal(out, hint_ids(refs, 16, MASK, (0.25, 0.5), make_generator(3)))    # same generator, same draw
    whole = hint_ids(refs[:1], 12, MASK, (1.0, 1.0), make_generator(4))
    assert whole[0].tolist() == refs[0][:12]                        # ratio 1: the reference cut to L


def _sampled(acc, tag):
    n = len(acc)
    return Sampled(sequences=torch.full((n, 4), tag), commit_step=torch.zeros(n, 2, dtype=torch.long),
                   given=torch.zeros(n, 2, dtype=torch.bool), lengths=torch.full((n,), 2),
                   texts=[f"{tag}-{i}" for i in range(n)], comp_ids=[[tag, i] for i in range(n)],
                   per_function=torch.tensor(acc, dtype=torch.float32)[:, None],
                   total=torch.tensor(acc, dtype=torch.float32), names=("task_accuracy",))


def test_all_wrong_groups_and_splice_replace_the_last_completions_with_correct_hinted_ones():
    s = _sampled([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, float("nan"), 0], tag=1)     # G = 4: groups 0 and 2 are all wrong
    groups = all_wrong_groups(s, "task_accuracy", 4)
    assert groups.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="hint_reward 'nope'"):
        all_wrong_groups(s, "nope", 4)
    idx = groups.nonzero().flatten()
    hinted = _sampled([1, 0, 1, 1, 0, 0, 0, 1], tag=2)                          # 3 right for group 0, 1 for group 2
    hinted = Sampled(**{**hinted.__dict__, "given": torch.ones(8, 2, dtype=torch.bool)})
    out, n = splice(s, hinted, idx, "task_accuracy", 4, 0.5)                   # at most ⌊0.5·4⌋ = 2 per group
    assert n == 3
    assert out.total.tolist()[:4] == [0, 0, 1, 1] and out.total.tolist()[8:10] == [0, 0]
    assert out.total[11].item() == 1 and torch.isnan(out.total[10])
    assert out.texts[3] == "2-0" and out.texts[2] == "2-2" and out.texts[11] == "2-7" and out.texts[0] == "1-0"
    assert out.given[[2, 3, 11]].all() and not out.given[[0, 1, 4, 10]].any()
    assert s.total[3].item() == 0                                               # the input is not modified
    assert splice(s, _sampled([0] * 8, tag=2), idx, "task_accuracy", 4, 0.5)[1] == 0


@pytest.mark.parametrize("fields,key", [
    ({"hint_ratio": [0.5, 0.2], "hint_column": "completion"}, "hint_ratio"),
    ({"hint_ratio": [0.0, 0.5]}, "hint_ratio"),
    ({"hint_ratio": 0.5}, "hint_ratio"),
    ({"hint_replace": 0.0}, "hint_replace"),
    ({"hint_reward": "task_accuracy"}, "hint_reward"),
])
def test_hint_settings_are_checked(fields, key):
    with pytest.raises(FieldError) as err:
        GRPOOptions(**fields)
    assert err.value.key == key


def test_hints_give_all_wrong_groups_signal_end_to_end(tmp_path, tiny_init_config):
    """The untrained tiny model gets every problem wrong; with the whole reference fixed (ratio 1) every hinted
    completion is the reference solution, right, and replaces half of its group: advantages become non-zero."""
    from align.config import config_from_dict
    from align.pipeline import run_recipe

    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["grpo"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 16, "num_test": 4, "seed": 0}, "max_length": 128},
           "grpo": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "gen_length": 48,
                    "denoising_steps": 12, "block_length": 16, "logging_steps": 1, "log_completions": 8,
                    "rewards": [{"name": "task_accuracy"}], "hint_column": "completion", "hint_ratio": [1.0, 1.0]},
           "eval": {"enabled": False}}
    run_recipe(config_from_dict(raw))
    logs = [h for h in json.loads((tmp_path / "run" / "grpo" / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["hints/all_wrong_groups"] == 1.0                  # every group wrong before the hints
        assert h["hints/replaced_completions"] == 0.5              # 2 of each group's 4 replaced
        assert h["reward"] == 0.5 and h["advantages/abs_max"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert sum(r["reward"] == 1.0 for r in rows) == len(rows) // 2

"""The ``countdown`` reward: 1.0 exactly when the Countdown checker accepts the completion's boxed expression."""

from __future__ import annotations

import json
import pickle

import pytest

from align.config import ConfigError, apply_overrides, config_from_dict
from align.evaluate import build_checker
from align.rewards import CountdownAccuracy, CountdownChecker, MissingColumnError, countdown_accuracy, resolve_reward
from align.rewards.registry import RewardSpecError, check_reward_specs

CD = json.dumps({"numbers": [3, 5, 7], "target": 22})
FRACTION = json.dumps({"numbers": [1, 3, 4, 6], "target": 24})       # 6 / (1 - 3/4) = 24
HALF = json.dumps({"numbers": [2, 7, 9], "target": 12})              # 7/2 + 9 = 12.5, not 12


@pytest.mark.parametrize("completion,reference,expected", [
    ("3 * 5 = 15 and 15 + 7 = 22, so \\boxed{3 * 5 + 7}", CD, 1.0),          # correct
    ("\\boxed{(7 + 5) * 3 - 14}", CD, 0.0),                                   # 14 is not one of the numbers
    ("\\boxed{5 * 5 - 3}", CD, 0.0),                                          # 5 used twice, 7 left out
    ("\\boxed{3 * 7 + 1}", CD, 0.0),                                          # 5 missing (and 1 is not a number)
    ("\\boxed{3 * 7}", CD, 0.0),                                              # 5 missing
    ("\\boxed{3 + 5 + 7}", CD, 0.0),                                          # every number once, but 15
    ("\\boxed{3 * 5 + 7 = 22}", CD, 1.0),                                     # an '= target' tail is allowed
    ("\\boxed{7 \\times 3 + 5 - 4}", CD, 0.0),                                # 4 is extra
    ("\\boxed{6 / (1 - 3 / 4)}", FRACTION, 1.0),                              # fractions on the way, 24 exactly
    ("\\boxed{7 / 2 + 9}", HALF, 0.0),                                        # 12.5: no rounding to the target
    ("3 * 5 + 7 = 22", CD, 0.0),                                              # no \boxed{} (nor tag, nor phrase)
    ("\\boxed{}", CD, 0.0),
    ("\\boxed{__import__('os').system('true')}", CD, 0.0),                   # not arithmetic: refused, not run
    ("\\boxed{3 ** 5 + 7}", CD, 0.0),                                         # only + - * /
    ("", CD, 0.0),
])
def test_countdown_scores_one_only_for_a_solution(completion, reference, expected):
    assert countdown_accuracy(prompts=["q"], completions=[completion], answer=[reference]) == [expected]
    assert countdown_accuracy(prompts=["q"], completions=[[{"role": "assistant", "content": completion}]],
                              answer=[reference]) == [expected]
    # the same decision as the evaluation checker, which the reward reuses
    assert CountdownChecker()(completion, reference)[1] is (expected == 1.0)
    assert build_checker("countdown")(completion, reference)[1] is (expected == 1.0)


def test_batches_references_and_columns():
    completions = ["\\boxed{3 * 5 + 7}", "\\boxed{6 / (1 - 3 / 4)}", "\\boxed{1}"]
    refs = [CD, {"numbers": [1, 3, 4, 6], "target": 24}, None]            # JSON text, a mapping, missing
    assert countdown_accuracy(None, completions, None, answer=refs, difficulty=[1, 2, 3]) == [1.0, 1.0, None]
    assert countdown_accuracy(None, [], None, answer=[]) == []
    other = CountdownAccuracy("problem", name="cd")
    assert other.__name__ == "cd" and other(None, completions[:1], problem=[CD], answer=["22"]) == [1.0]
    with pytest.raises(MissingColumnError, match=r"countdown needs the column 'answer'.*the batch has \['solution'\]"):
        countdown_accuracy(None, completions[:1], solution=[CD])
    with pytest.raises(ValueError, match="has 2 values for 1 completions"):
        countdown_accuracy(None, completions[:1], answer=[CD, CD])
    for bad in ("22", "#### 22", json.dumps({"numbers": [3, 5], "target": "22"}), json.dumps([3, 5, 7])):
        with pytest.raises(ValueError, match="is not a Countdown problem"):
            countdown_accuracy(None, completions[:1], answer=[bad])
    with pytest.raises(ValueError, match="answer_column must name a column"):
        CountdownAccuracy("")
    clone = pickle.loads(pickle.dumps(countdown_accuracy))
    assert clone(None, completions[:1], answer=[CD]) == [1.0] and clone.__name__ == "countdown"


def test_registered_as_countdown_with_its_arguments_checked(tiny_init_config):
    reward = resolve_reward("countdown")
    assert isinstance(reward, CountdownAccuracy) and reward.__name__ == "countdown"
    assert resolve_reward("countdown", answer_column="problem").answer_column == "problem"
    with pytest.raises(RewardSpecError, match=r"unknown argument\(s\) \['column'\]"):
        check_reward_specs([{"name": "countdown", "column": "x"}])
    raw = {"model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"}, "stages": ["grpo"],
           "grpo": {"num_generations": 2, "per_device_train_batch_size": 2}}
    raw = apply_overrides(raw, ["grpo.rewards=[{name: countdown, weight: 2.0}]"])
    assert config_from_dict(raw).stage_options("grpo")[0].rewards == [{"name": "countdown", "weight": 2.0}]
    with pytest.raises(ConfigError, match="unknown argument"):
        config_from_dict(apply_overrides(raw, ["grpo.rewards=[{name: countdown, numbers: 3}]"]))

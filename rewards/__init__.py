"""Rewards for policy-optimisation training (``align.rewards``).

Every reward is a picklable callable with TRL's signature
``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``; completions may
be strings or chat-style message lists. :func:`build_rewards` turns recipe entries into rewards
and weights, :class:`RewardRunner` scores batches with failure isolation, and
:func:`detect_loops` finds repetition loops in token ids.
"""

from align.loops import LoopCoverage, LoopParams, LoopReport, LoopSpan, detect_loops, loop_coverage

from .accuracy import AnswerAccuracy, MissingColumnError, math_accuracy, task_accuracy
from .answers import answers_match, extract_answer, normalize_answer, parse_number
from .countdown import CountdownAccuracy, CountdownChecker, countdown_accuracy
from .formats import RegexFormat, answer_phrase_format, answer_tag_format, boxed_format, think_answer_format
from .length import SoftOverlongPunishment
from .loop_reward import LoopPenalty, loop_penalty
from .registry import (
    BoundReward,
    RewardSpec,
    RewardSpecError,
    UnknownRewardError,
    available_rewards,
    build_rewards,
    check_reward_specs,
    parse_reward_spec,
    register_reward,
    resolve_reward,
    reward_name,
)
from .reward_model import SequenceClassificationReward
from .runner import (
    RewardAbortError,
    RewardFunctionError,
    RewardOutput,
    RewardRunner,
    RewardStats,
    check_runner_settings,
)
from .steps import StepAccuracy, equations

__all__ = [
    "AnswerAccuracy",
    "BoundReward",
    "CountdownAccuracy",
    "CountdownChecker",
    "LoopCoverage",
    "LoopParams",
    "LoopPenalty",
    "LoopReport",
    "LoopSpan",
    "MissingColumnError",
    "RegexFormat",
    "RewardAbortError",
    "RewardFunctionError",
    "RewardOutput",
    "RewardRunner",
    "RewardSpec",
    "RewardSpecError",
    "RewardStats",
    "SequenceClassificationReward",
    "SoftOverlongPunishment",
    "StepAccuracy",
    "UnknownRewardError",
    "answer_phrase_format",
    "answer_tag_format",
    "answers_match",
    "available_rewards",
    "boxed_format",
    "build_rewards",
    "check_reward_specs",
    "check_runner_settings",
    "countdown_accuracy",
    "detect_loops",
    "equations",
    "extract_answer",
    "loop_coverage",
    "loop_penalty",
    "math_accuracy",
    "normalize_answer",
    "parse_number",
    "parse_reward_spec",
    "register_reward",
    "resolve_reward",
    "reward_name",
    "task_accuracy",
    "think_answer_format",
]

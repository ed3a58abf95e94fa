"""Reward functions written for TRL's conversational format, in the style of the GSM8K GRPO reward files people
publish: each reads ``completion[0]["content"]`` and the question as ``prompts[0][-1]["content"]``, and the gold
answer is the number after ``####`` in GSM8K's ``answer`` column. They work only when completions arrive as
``[{"role": "assistant", "content": ...}]`` and prompts as message lists; a plain string would make them raise.

``test_trl_conventions.py`` imports this module by its path (``gsm8k_rewards:correctness_reward``) in a GRPO
run, with this folder on ``PYTHONPATH``. ``conversation_shape`` is that test's probe: it scores 1.0 exactly when
a sample arrives in TRL's conversational form with the recipe's system prompt in front.
"""

import re

HASH_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def hash_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's final-answer marker), without thousands separators."""
    found = HASH_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def predicted_answer(text: str) -> str:
    """A completion's answer: its ``#### N`` if it has one, else the inside of its last ``<answer>`` tag."""
    marked = hash_answer(text)
    if marked is not None:
        return marked
    tags = ANSWER_TAG.findall(text)
    return tags[-1].strip() if tags else ""


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """2.0 when the completion's answer equals the ``#### N`` of the reference solution, else 0.0."""
    responses = [completion[0]["content"] for completion in completions]
    question = prompts[0][-1]["content"]
    assert isinstance(question, str) and question, "the last prompt message must be the question"
    return [2.0 if predicted_answer(r) == hash_answer(a) else 0.0 for r, a in zip(responses, answer, strict=True)]


def int_reward(completions, **kwargs) -> list[float]:
    """0.5 when the extracted answer is a whole number."""
    responses = [completion[0]["content"] for completion in completions]
    return [0.5 if predicted_answer(r).lstrip("-").isdigit() else 0.0 for r in responses]


def tag_format_reward(completions, **kwargs) -> list[float]:
    """0.5 for ``<reasoning>...</reasoning>`` followed by ``<answer>...</answer>``, anywhere in the text."""
    pattern = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
    return [0.5 if pattern.search(completion[0]["content"]) else 0.0 for completion in completions]


def conversation_shape(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a sample in TRL's conversational form: the prompt a message list that starts with the system
    message and ends with the user's question, the completion one assistant message with string content."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ok = (isinstance(prompt, list) and prompt[0]["role"] == "system" and prompt[-1]["role"] == "user"
              and isinstance(completion, list) and len(completion) == 1 and completion[0]["role"] == "assistant"
              and isinstance(completion[0]["content"], str))
        scores.append(1.0 if ok else 0.0)
    return scores

"""Turn dataset rows into token ids: prompt/completion pairs, chat ``messages``, or plain ``text``.

Supported row shapes (TRL's dataset formats):

* **prompt-completion**: ``prompt`` and ``completion`` columns, each a string or a list of chat messages
  (``{"role": ..., "content": ...}``).
* **conversational**: a ``messages`` column; the last assistant message is the completion, everything
  before it is the prompt.
* **language modelling**: a ``text`` column (pre-training; empty prompt).

With a chat template, the completion is the suffix of the templated full conversation after the
templated prompt (so it carries the end-of-turn token); otherwise the completion text gets the EOS
token appended. Bad rows raise :class:`DataFormatError` naming the source, row and field.

A recipe's ``data.system_prompt`` is put in front of every prompt by :func:`add_system_prompt`: as a system
message before a message list, and before a plain-string prompt (which becomes the user message) when the prompt
is tokenized. Without a chat template, message prompts are rendered as their contents joined by newlines
(:func:`encode_prompt`), so the system prompt is then the first line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("auto", "prompt_completion", "messages", "text")


class DataFormatError(ValueError):
    """A dataset row does not have the expected fields or types."""


@dataclass(frozen=True)
class ColumnNames:
    """Names of the columns read from each row."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"
    answer: str = "answer"


def detect_format(columns: Sequence[str], names: ColumnNames = ColumnNames()) -> str:
    """Guess the row format from the dataset's column names."""
    if names.prompt in columns and names.completion in columns:
        return "prompt_completion"
    if names.messages in columns:
        return "messages"
    if names.text in columns:
        return "text"
    raise DataFormatError(
        f"cannot tell the dataset format from columns {list(columns)}: expected "
        f"'{names.prompt}'+'{names.completion}', '{names.messages}' or '{names.text}'"
    )


def _check_messages(msgs: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataFormatError(
            f"{where}: field '{field}' must be a non-empty list of messages, got {type(msgs).__name__}")
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataFormatError(f"{where}: field '{field}'[{j}] must be a dict with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def is_conversational(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (TRL's test: a list whose first item has a ``role``)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], Mapping) and "role" in prompt[0]


def add_system_prompt(prompt: list[dict[str, str]] | str, system_prompt: str | None, where: str = "prompt"
                      ) -> list[dict[str, str]] | str:
    """``prompt`` with ``system_prompt`` in front (unchanged when ``system_prompt`` is None).

    A message list gets ``{"role": "system", "content": system_prompt}`` as its first message; a string becomes
    ``[system message, {"role": "user", "content": prompt}]``. A prompt that already starts with a system message
    raises :class:`DataFormatError` (``where`` names the row): two system prompts would be ambiguous.
    """
    if system_prompt is None:
        return prompt
    system = {"role": "system", "content": system_prompt}
    if isinstance(prompt, str):
        return [system, {"role": "user", "content": prompt}]
    if prompt and prompt[0].get("role") == "system":
        raise DataFormatError(f"{where}: the prompt already starts with a system message, and data.system_prompt "
                              "is set; remove one of them")
    return [system, *prompt]


def _as_prompt_messages(prompt: Any, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _check_messages(prompt, where, field)


def split_row(row: Mapping[str, Any], fmt: str, where: str, names: ColumnNames = ColumnNames()
              ) -> tuple[list[dict[str, str]] | str, str]:
    """Return ``(prompt, completion_text)`` of one row; the prompt is chat messages or a raw string.

    Args:
        row: the dataset row.
        fmt: one of ``prompt_completion``, ``messages``, ``text``.
        where: a location used in error messages (e.g. ``"train.jsonl row 17"``).
    """
    if fmt == "prompt_completion":
        for f in (names.prompt, names.completion):
            if f not in row or row[f] is None:
                raise DataFormatError(f"{where}: missing field '{f}'")
        prompt, completion = row[names.prompt], row[names.completion]
        if isinstance(completion, list):
            msgs = _check_messages(completion, where, names.completion)
            completion = "".join(m["content"] for m in msgs if m["role"] == "assistant")
        if not isinstance(completion, str):
            raise DataFormatError(
                f"{where}: field '{names.completion}' must be a string, got {type(completion).__name__}")
        if not isinstance(prompt, (str, list)):
            raise DataFormatError(
                f"{where}: field '{names.prompt}' must be a string or messages, got {type(prompt).__name__}")
        return (_as_prompt_messages(prompt, where, names.prompt) if isinstance(prompt, list) else prompt), completion
    if fmt == "messages":
        msgs = _check_messages(row.get(names.messages), where, names.messages)
        if msgs[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: the last message of '{names.messages}' must be from the assistant, "
                                  f"got role {msgs[-1]['role']!r}")
        return msgs[:-1], msgs[-1]["content"]
    if fmt == "text":
        text = row.get(names.text)
        if not isinstance(text, str):
            raise DataFormatError(f"{where}: field '{names.text}' must be a string, got {type(text).__name__}")
        return "", text
    raise DataFormatError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def encode_prompt(tokenizer: Any, prompt: list[dict[str, str]] | str, *, use_chat_template: bool) -> list[int]:
    """Token ids of a prompt, ending with the assistant header when a chat template is used."""
    if use_chat_template:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_pair(tokenizer: Any, prompt: list[dict[str, str]] | str, completion: str, *,
                use_chat_template: bool) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``; the completion ends with end-of-turn (chat) or EOS (plain)."""
    prompt_ids = encode_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
    if use_chat_template:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        full_text = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": completion}],
                                                  tokenize=False)
        full = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataFormatError("the chat template does not render the prompt as a prefix of the full "
                                  "conversation; cannot split prompt from completion")
        completion_ids = full[len(prompt_ids):]
    else:
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise DataFormatError("the tokenizer has no eos_token; set one (it terminates completions)")
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids

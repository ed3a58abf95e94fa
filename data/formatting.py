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
    """A dataset row does not have the expected fields or types.

    Attributes:
        field: the column at fault (None when the row as a whole is).
        kind: the category counted in reports (one of :data:`PROBLEM_KINDS`).
        reason: the message without the place in front of it.
    """

    def __init__(self, message: str, *, field: str | None = None, kind: str = "invalid row",
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.kind = kind
        self.reason = reason if reason is not None else message


#: categories of bad rows, as counted in reports (``data.bad_rows``).
PROBLEM_KINDS = ("malformed JSON", "not a JSON object", "missing field", "null field", "wrong type", "empty string",
                 "malformed messages", "longer than max_length", "chosen equals rejected", "invalid row")


def row_error(where: str, reason: str, *, field: str | None = None, kind: str = "invalid row") -> DataFormatError:
    """A :class:`DataFormatError` for the row at ``where`` (message ``"<where>: <reason>"``)."""
    return DataFormatError(f"{where}: {reason}", field=field, kind=kind, reason=reason)


def required(row: Mapping[str, Any], field: str, where: str, note: str = "") -> Any:
    """The value of ``field`` in ``row``; a missing field or a null value raises :class:`DataFormatError`."""
    if field not in row:
        raise row_error(where, f"missing field '{field}'{note}", field=field, kind="missing field")
    value = row[field]
    if value is None:
        raise row_error(where, f"field '{field}' is null{note}", field=field, kind="null field")
    return value


def check_text(value: Any, where: str, field: str, expected: str = "a string") -> str:
    """``value`` when it is a string with a non-space character; else :class:`DataFormatError` naming ``field``."""
    if not isinstance(value, str):
        raise row_error(where, f"field '{field}' must be {expected}, got {type(value).__name__}", field=field,
                        kind="wrong type")
    if not value.strip():
        raise row_error(where, f"field '{field}' is {'empty' if not value else 'whitespace only'}", field=field,
                        kind="empty string")
    return value


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
    if msgs is None:
        raise row_error(where, f"field '{field}' is null", field=field, kind="null field")
    if not isinstance(msgs, list):
        raise row_error(where, f"field '{field}' must be a non-empty list of messages, got {type(msgs).__name__}",
                        field=field, kind="wrong type")
    if not msgs:
        raise row_error(where, f"field '{field}' is an empty list of messages", field=field, kind="empty string")
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise row_error(where, f"field '{field}'[{j}] must be a dict with string 'role' and 'content'",
                            field=field, kind="malformed messages")
        if not m["content"].strip():
            raise row_error(where, f"field '{field}'[{j}] has an empty or whitespace-only 'content'", field=field,
                            kind="empty string")
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
        prompt = required(row, names.prompt, where)
        completion = required(row, names.completion, where)
        if isinstance(completion, list):
            msgs = _check_messages(completion, where, names.completion)
            completion = "".join(m["content"] for m in msgs if m["role"] == "assistant")
            if not completion.strip():
                raise row_error(where, f"field '{names.completion}' has no assistant message", field=names.completion,
                                kind="malformed messages")
        check_text(completion, where, names.completion, "a string or messages")
        return _prompt_value(prompt, where, names.prompt), completion
    if fmt == "messages":
        msgs = _check_messages(required(row, names.messages, where), where, names.messages)
        if msgs[-1]["role"] != "assistant":
            raise row_error(where, f"the last message of '{names.messages}' must be from the assistant, "
                                   f"got role {msgs[-1]['role']!r}", field=names.messages, kind="malformed messages")
        return msgs[:-1], msgs[-1]["content"]
    if fmt == "text":
        return "", check_text(required(row, names.text, where), where, names.text)
    raise DataFormatError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def _prompt_value(prompt: Any, where: str, field: str) -> list[dict[str, str]] | str:
    """A prompt read from ``field``: a non-blank string, or a non-empty list of messages."""
    if isinstance(prompt, list):
        return _as_prompt_messages(prompt, where, field)
    return check_text(prompt, where, field, "a string or messages")


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

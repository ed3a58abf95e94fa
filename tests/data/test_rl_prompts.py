"""Prompts of RL and evaluation rows in TRL's forms (strings, chat messages, ``messages`` datasets) and
``data.system_prompt`` on each form, with and without a chat template."""

import pytest
from datasets import Dataset

from align.data.formatting import ColumnNames, DataFormatError, add_system_prompt, encode_prompt, is_conversational
from align.data.loading import rl_prompt, tokenize_dataset, tokenize_prompts

SYSTEM = "Answer with the number."
QUESTION = "Tom has 3 apples. He finds 4 more. How many apples does Tom have now?"


@pytest.fixture(scope="module")
def tok():
    from align.data.task import corpus_for_tokenizer
    from align.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(corpus_for_tokenizer())


def _templated(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_string_prompts_get_the_system_message_when_tokenized_and_stay_strings_for_rewards(tok):
    ds = Dataset.from_list([{"prompt": QUESTION, "answer": "7"}])
    out = tokenize_prompts(ds, tok, use_chat_template=True, system_prompt=SYSTEM)
    expected = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert out[0]["prompt_ids"] == _templated(tok, expected)
    assert out[0]["prompt"] == QUESTION                     # rewards get the dataset's string
    assert out[0]["answer"] == "7"
    plain = tokenize_prompts(ds, tok, use_chat_template=False, system_prompt=SYSTEM)
    assert plain[0]["prompt_ids"] == tok(f"{SYSTEM}\n{QUESTION}", add_special_tokens=False)["input_ids"]
    unchanged = tokenize_prompts(ds, tok, use_chat_template=True)
    assert unchanged[0]["prompt_ids"] == _templated(tok, [{"role": "user", "content": QUESTION}])


def test_conversational_prompts_get_a_system_message_first(tok):
    user = [{"role": "user", "content": QUESTION}]
    ds = Dataset.from_list([{"prompt": user, "solution": "7"}])
    out = tokenize_prompts(ds, tok, use_chat_template=True, system_prompt=SYSTEM)
    expected = [{"role": "system", "content": SYSTEM}, *user]
    assert out[0]["prompt"] == expected                     # rewards get the messages, system first
    assert out[0]["prompt_ids"] == _templated(tok, expected)
    plain = tokenize_prompts(ds, tok, use_chat_template=False, system_prompt=SYSTEM)
    assert plain[0]["prompt_ids"] == tok(f"{SYSTEM}\n{QUESTION}", add_special_tokens=False)["input_ids"]
    assert tokenize_prompts(ds, tok, use_chat_template=True)[0]["prompt"] == user


def test_messages_rows_drop_the_last_assistant_turn(tok):
    msgs = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}]
    ds = Dataset.from_list([{"messages": msgs, "answer": "7"}])
    out = tokenize_prompts(ds, tok, use_chat_template=True, system_prompt=SYSTEM)
    assert out[0]["prompt"] == [{"role": "system", "content": SYSTEM}, msgs[0]]
    with pytest.raises(DataFormatError, match="row 0: 'messages' has no message before its last assistant turn"):
        tokenize_prompts(Dataset.from_list([{"messages": msgs[1:]}]), tok, use_chat_template=True)


def test_a_row_with_its_own_system_message_is_an_error(tok):
    rows = [{"prompt": [{"role": "user", "content": QUESTION}]},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]}]
    with pytest.raises(DataFormatError, match=r"train\.jsonl row 1: the prompt already starts with a system message"):
        tokenize_prompts(Dataset.from_list(rows), tok, system_prompt=SYSTEM, source="train.jsonl")
    # without data.system_prompt the row's own system message is kept
    assert tokenize_prompts(Dataset.from_list(rows), tok)[1]["prompt"][0]["role"] == "system"


def test_sft_rows_get_the_system_prompt_too(tok):
    ds = Dataset.from_list([{"prompt": QUESTION, "completion": "3 + 4 = 7. The answer is 7."}])
    out = tokenize_dataset(ds, tok, use_chat_template=True, system_prompt=SYSTEM)
    expected = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert out[0]["prompt_ids"] == _templated(tok, expected)
    with pytest.raises(DataFormatError, match="system_prompt is set, but the rows are plain text"):
        tokenize_dataset(Dataset.from_list([{"text": "3 + 4 = 7."}]), tok, system_prompt=SYSTEM)


def test_helpers():
    names = ColumnNames()
    assert rl_prompt({"prompt": QUESTION}, names, "r") == QUESTION
    assert rl_prompt({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                     names, "r") == [{"role": "user", "content": "a"}]
    with pytest.raises(DataFormatError, match="r: has neither a 'prompt' nor a 'messages' column"):
        rl_prompt({"text": "x"}, names, "r")
    assert is_conversational([{"role": "user", "content": "a"}]) and not is_conversational("a")
    assert not is_conversational([]) and not is_conversational(["a"])
    assert add_system_prompt(QUESTION, None) == QUESTION
    assert add_system_prompt([{"role": "user", "content": "a"}], "s")[0] == {"role": "system", "content": "s"}


def test_system_prompt_is_checked_when_the_recipe_loads_and_reaches_evaluation(tok, tiny_init_config):
    from align.config import ConfigError, config_from_dict
    from align.pipeline.recipe import _eval_rows

    def raw(**data):
        return {"model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"}, "stages": ["sft"],
                "data": {"task": "arithmetic", **data}}

    with pytest.raises(ConfigError, match=r"'data\.system_prompt' is empty"):
        config_from_dict(raw(system_prompt="  "))
    with pytest.raises(ConfigError, match=r"'data\.system_prompt' cannot apply with 'data\.format' text"):
        config_from_dict(raw(system_prompt=SYSTEM, format="text"))
    cfg = config_from_dict(raw(system_prompt=SYSTEM))
    expected = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    for prompt in (QUESTION, [{"role": "user", "content": QUESTION}]):
        prompts, answers = _eval_rows(cfg, Dataset.from_list([{"prompt": prompt, "answer": "7"}]))
        assert prompts == [expected] and answers == ["7"]
    assert encode_prompt(tok, expected, use_chat_template=False) == tok(f"{SYSTEM}\n{QUESTION}",
                                                                        add_special_tokens=False)["input_ids"]

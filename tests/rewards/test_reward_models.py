"""Reward-model plug-ins (sequence-classification checkpoints, import paths) and the reward registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from align.rewards import (
    BoundReward,
    LoopPenalty,
    RewardRunner,
    RewardSpecError,
    SequenceClassificationReward,
    UnknownRewardError,
    available_rewards,
    build_rewards,
    parse_reward_spec,
    register_reward,
    resolve_reward,
)

WORDS = [
    "hello",
    "world",
    "the",
    "answer",
    "is",
    "42",
    "user",
    "assistant",
    ":",
    "what",
    "two",
    "plus",
    "sum",
    "good",
    "bad",
]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"


def constant_reward(prompts, completions, completion_ids=None, scale=1.0, **kwargs):
    """A module-level reward reachable by import path, ``f"{__name__}:constant_reward"``."""
    return [scale] * len(completions)


def make_constant(value: float = 0.5):
    """A factory reachable by import path (no reward parameters in its signature)."""
    return BoundReward(constant_reward, {"scale": value}, name="constant")


def _save_checkpoint(path: Path, chat_template: str | None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    with torch.random.fork_rng():  # deterministic init without touching the global RNG of other tests
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("rm_plain"), None)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("rm_chat"), TEMPLATE)


def _direct_scores(path: Path, texts: list[str], label: int = 0, special: bool = True) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt", add_special_tokens=special)).logits[0, label].item() for t in texts]


# ---------------------------------------------------------------- sequence-classification checkpoints


def test_scores_prompt_plus_completion_batched(plain_ckpt: Path) -> None:
    prompts = ["what is two plus two ?", "hello", "the sum"]
    completions = ["the answer is 42", [{"role": "assistant", "content": "good"}], ""]
    rm = SequenceClassificationReward(plain_ckpt, device="cpu", batch_size=2)
    scores = rm(prompts=prompts, completions=completions, completion_ids=None, answer=[1, 2, 3])
    expected = _direct_scores(plain_ckpt, ["what is two plus two ?the answer is 42", "hellogood", "the sum"])
    assert scores == pytest.approx(expected, abs=1e-5)
    # batching and padding do not change the scores
    assert SequenceClassificationReward(plain_ckpt, batch_size=1)(prompts, completions) == pytest.approx(
        scores, abs=1e-5
    )
    assert rm([], []) == []


def test_uses_the_chat_template_when_there_is_one(chat_ckpt: Path) -> None:
    rm = SequenceClassificationReward(chat_ckpt, label_index=1)
    text, templated = rm.render([{"role": "user", "content": "what is two plus two"}], "the answer is 42")
    assert templated and text == "user : what is two plus two assistant : the answer is 42 "
    assert rm.render("hello", "world")[0] == "user : hello assistant : world "
    scores = rm(["what is two plus two"], ["the answer is 42"])
    assert scores == pytest.approx(_direct_scores(chat_ckpt, [text], label=1, special=False), abs=1e-5)
    plain = SequenceClassificationReward(chat_ckpt, use_chat_template=False)
    assert plain.render("hello", "world") == ("helloworld", False)


def test_device_and_pickling(plain_ckpt: Path) -> None:
    rm = SequenceClassificationReward(plain_ckpt, device="auto")
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert rm.resolved_device() == expected
    before = rm(["hello"], ["world"])
    assert next(rm._model.parameters()).device.type == expected.type
    clone = pickle.loads(pickle.dumps(rm))  # the loaded model is not pickled; it reloads on use
    assert clone._model is None and clone(["hello"], ["world"]) == pytest.approx(before, abs=1e-6)


def test_reward_model_from_the_registry(plain_ckpt: Path) -> None:
    funcs, weights = build_rewards([{"name": "reward_model", "path": str(plain_ckpt), "weight": 0.5, "batch_size": 4}])
    assert isinstance(funcs[0], SequenceClassificationReward) and weights == [0.5]
    out = RewardRunner(funcs, weights)(["hello"] * 2, ["world", "good"])
    assert out.per_function.shape == (2, 1) and torch.isfinite(out.total).all()


def test_reward_model_bad_arguments(plain_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SequenceClassificationReward(tmp_path / "missing")
    with pytest.raises(ValueError, match="label_index"):
        SequenceClassificationReward(plain_ckpt, label_index=5)(["a"], ["b"])
    with pytest.raises(ValueError, match="dtype"):
        SequenceClassificationReward(plain_ckpt, dtype="float33")
    with pytest.raises(RewardSpecError, match="reward_model"):
        build_rewards([{"name": "reward_model", "path": str(plain_ckpt), "batchsize": 4}])


# ---------------------------------------------------------------- registry


def test_yaml_style_specs_build_rewards_and_weights() -> None:
    funcs, weights = build_rewards(
        [{"name": "accuracy", "weight": 2.0}, {"name": "loop_penalty", "weight": 1.0, "p_max": 8}, "boxed_format"]
    )
    assert weights == [2.0, 1.0, 1.0]
    assert funcs[0].__name__ == "math_accuracy"
    assert isinstance(funcs[1], LoopPenalty) and funcs[1].p_max == 8
    for f in funcs:
        pickle.loads(pickle.dumps(f))


def test_unknown_names_and_arguments_raise_with_the_name() -> None:
    with pytest.raises(UnknownRewardError, match=r"'acuracy'.*did you mean \['accuracy'"):
        build_rewards([{"name": "acuracy"}])
    with pytest.raises(RewardSpecError, match=r"'loop_penalty'.*\['pmax'\]"):
        build_rewards([{"name": "loop_penalty", "pmax": 8}])
    with pytest.raises(RewardSpecError, match=r"'boxed_format'.*\['strict'\]"):
        build_rewards([{"name": "boxed_format", "strict": True}])
    with pytest.raises(RewardSpecError, match="soft_overlong_punishment"):
        build_rewards([{"name": "soft_overlong_punishment"}])  # required arguments missing
    with pytest.raises(RewardSpecError, match=r"loop_penalty.*shaping"):
        build_rewards([{"name": "loop_penalty", "shaping": "cubic"}])
    with pytest.raises(RewardSpecError, match="weight"):
        parse_reward_spec({"name": "accuracy", "weight": "high"})
    with pytest.raises(RewardSpecError, match="no 'name'"):
        parse_reward_spec({"weight": 1.0})
    with pytest.raises(RewardSpecError, match="list"):
        build_rewards({"name": "accuracy"})  # type: ignore[arg-type]


def test_import_paths() -> None:
    # this module's own name: pytest imports it as "tests.rewards.test_reward_models" (importlib mode)
    f = resolve_reward(f"{__name__}:constant_reward", scale=3.0)
    assert isinstance(f, BoundReward) and f(None, ["a", "b"]) == [3.0, 3.0]
    assert resolve_reward(f"{__name__}:make_constant", value=0.25)(None, ["a"]) == [0.25]
    lp = resolve_reward("align.rewards.loop_reward:LoopPenalty", p_max=4)
    assert isinstance(lp, LoopPenalty) and lp.p_max == 4
    assert resolve_reward("align.rewards:boxed_format")(None, [r"\boxed{1}"]) == [1.0]
    with pytest.raises(RewardSpecError, match="cannot import module"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(RewardSpecError, match="has no attribute"):
        resolve_reward("align.rewards:no_such_reward")
    with pytest.raises(RewardSpecError, match="unknown argument"):
        resolve_reward(f"{__name__}:constant_reward", bogus=1)


def test_register_custom_reward() -> None:
    from align.rewards import registry

    register_reward("test.constant", constant_reward, overwrite=True)
    try:
        assert "test.constant" in available_rewards()
        assert build_rewards([{"name": "test.constant", "scale": 2.0}])[0][0](None, ["x"]) == [2.0]
        with pytest.raises(RewardSpecError, match="already registered"):
            register_reward("test.constant", constant_reward)
    finally:  # the registry is process-wide: leave it as other tests expect it
        registry._REGISTRY.pop("test.constant", None)


# ---------------------------------------------------------------- TRL's own rewards, unchanged


def test_trl_rewards_plug_in_unchanged() -> None:
    import trl.rewards

    names = [n for n in available_rewards() if n.startswith("trl.")]
    assert len(names) == 6
    funcs, _ = build_rewards(
        [
            "trl.think_format_reward",
            {"name": "trl.soft_overlong_punishment", "max_completion_len": 10, "soft_punish_cache": 4},
            {"name": "trl.repetition_penalty", "ngram_size": 2},
            {"name": "trl.reasoning_accuracy_reward", "reasoning_delimiters": ["</think>"]},
            "trl.accuracy_reward",
            {"name": "trl.cosine_scaled_reward", "max_len": 20},
        ]
    )
    assert funcs[0] is trl.rewards.think_format_reward
    completions = [
        [{"role": "assistant", "content": "<think>\nhm\n</think>\n\\boxed{2}"}],
        [{"role": "assistant", "content": "no"}],
    ]
    runner = RewardRunner(funcs, max_error_rate=None)
    out = runner(["q", "q"], completions, completion_ids=[[1] * 8, [2, 2, 2]], solution=["2", "3"])
    assert out.per_function[:, 0].tolist() == [1.0, 0.0]  # think format
    assert out.per_function[:, 1].tolist() == pytest.approx([-0.5, 0.0])  # DAPO over-long
    assert out.per_function[1, 2].item() == pytest.approx(-0.5)  # 2-gram repetition of [2, 2, 2]
    assert out.per_function[:, 3].tolist() == [1.0, 0.0]  # reasoning accuracy
    assert out.per_function[:, 4].tolist() == [1.0, 0.0]  # accuracy (math_verify)
    assert all(st.errors == 0 for st in runner.stats.values())
    with pytest.raises(RewardSpecError, match=r"trl\.repetition_penalty.*\['ngram'\]"):
        build_rewards([{"name": "trl.repetition_penalty", "ngram": 2}])

"""Word-level tokenizer for the embedded default model.

Built with the ``tokenizers`` library and saved as a :class:`transformers.PreTrainedTokenizerFast`
with mask, EOS, pad and chat tokens plus a chat template, so the tiny model goes through exactly the
code paths of a released LLaDA checkpoint (``AutoTokenizer.from_pretrained``, ``apply_chat_template``).

Digits are split one per token so that arithmetic is learnable by a tiny model; spaces are kept with a
metaspace marker so that decoding restores the original text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
MASK_TOKEN = "<|mdm_mask|>"
UNK_TOKEN = "<|unk|>"

# Order fixes the ids: EOS/pad = 0, mask = 5 (as in iLLaDA).
SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN, START_HEADER, END_HEADER, EOT_TOKEN, MASK_TOKEN, UNK_TOKEN]

# LLaDA-style chat template: header tokens around the role, a blank line, the content, end of turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Spaces become "▁" and stay attached to the next piece: a newline, one digit, a word, or one
    # punctuation mark ("▁7", "▁The", "▁=", "."), which keeps arithmetic short and digit-aligned.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
            pre_tokenizers.Split(Regex(r"\n|▁?[0-9]|▁?[A-Za-z]+|▁?[^A-Za-z0-9▁\n]|▁"), behavior="isolated"),
        ]
    )


def build_word_tokenizer(corpus: Iterable[str], *, extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        corpus: texts whose words (and punctuation, and digits) form the vocabulary.
        extra_words: additional texts to include (e.g. role names used by the chat template).

    Returns:
        A fast tokenizer with ``eos_token``/``pad_token`` = ``<|endoftext|>`` (id 0), ``mask_token`` =
        ``<|mdm_mask|>`` (id 5), ``<|eot_id|>`` as end of turn, and :data:`CHAT_TEMPLATE`.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    texts = [*corpus, "user assistant system", *extra_words]
    # A word gets a different token at the start of a line (bare) than after a space ("▁word"); make
    # both forms of every word known, plus the newline and every digit, so nothing decodes to <|unk|>.
    words = sorted({w for text in texts for w in text.split()})
    texts += ["\n".join(words), " " + " ".join(words), " ".join("0123456789")]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT_TOKEN],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Save ``tokenizer`` in Hugging Face format (``tokenizer.json``, config, chat template)."""
    tokenizer.save_pretrained(str(directory))

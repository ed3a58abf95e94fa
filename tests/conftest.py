"""Test-session settings that must be in place before any module imports triton or wandb, and shared fixtures.

Test files mirror the package layout (``tests/align/sampling/`` tests ``align/sampling/``, ``tests/rewards/``
tests ``align.rewards``, ...) and are imported with ``--import-mode=importlib`` (pyproject.toml), so they cannot
import each other or this file: shared setup lives here as fixtures. Heavy imports (torch, align) happen inside
the fixtures, after the environment below is set.
"""

import os

import pytest

# Triton kernels run in the interpreter on machines without a GPU; triton reads this at import time, and
# several libraries (trl, deepspeed) import triton early, so it is set for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ``init_config`` of the tiny native LLaDA that end-to-end recipes build from scratch (with the
# ``builtin:arithmetic`` tokenizer, whose mask id is 5 and EOS/pad id 0).
_TINY_INIT_CONFIG = {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
                     "max_sequence_length": 128, "mask_token_id": 5, "eos_token_id": 0, "pad_token_id": 0}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one thread (``usefixtures`` per module)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_tiny_llada():
    """Factory ``make_tiny_llada(seed=0, **config_overrides)``: a tiny native LLaDA in eval mode.

    The config is ``tiny_llada_config(**config_overrides)`` (vocab 256, d_model 64, 2 layers, 4 heads unless
    overridden); the weights are initialised right after ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng()``, so the same arguments give the same weights every time and the global RNG of
    the other tests is left as it was.
    """
    import torch

    from align.models import LLaDAModelLM, tiny_llada_config

    def make(seed: int = 0, **overrides) -> LLaDAModelLM:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LLaDAModelLM(tiny_llada_config(**overrides)).eval()

    return make


@pytest.fixture(scope="session")
def tiny_init_config():
    """Factory ``tiny_init_config(**overrides)``: a fresh ``model.init_config`` dict for end-to-end recipes.

    A tiny LLaDA (d_model 32, 2 layers, 2 heads) sized for the ``builtin:arithmetic`` tokenizer (mask 5, EOS 0).
    """

    def make(**overrides) -> dict:
        return {**_TINY_INIT_CONFIG, **overrides}

    return make


@pytest.fixture(scope="session")
def save_word_tokenizer():
    """Factory ``save_word_tokenizer(path, vocab_size, mask_token)``: save a whitespace word-level tokenizer.

    Words ``w0 .. w{vocab_size-2}`` have ids ``0 .. vocab_size-2`` (``w0`` is also the unknown token) and
    ``mask_token`` is the last id, ``vocab_size - 1``, like a checkpoint directory's tokenizer files.
    """

    def save(path, vocab_size: int, mask_token: str) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {mask_token: vocab_size - 1}
        raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=raw, mask_token=mask_token, unk_token="w0").save_pretrained(path)

    return save


@pytest.fixture(scope="session")
def add_to_hub_cache():
    """Factory ``add_to_hub_cache(cache, repo_id, commit, files_from, ref="main") -> snapshot dir``.

    Lays the files under ``files_from`` out as huggingface_hub does in a cache directory: content-addressed blobs,
    a snapshot directory of relative symlinks named by the commit, and ``refs/<ref>`` holding the commit hash. With
    ``HF_HUB_CACHE`` pointing at ``cache`` and ``HF_HUB_OFFLINE=1``, the repo id then resolves with no network.
    """
    import hashlib
    from pathlib import Path

    def add(cache: Path, repo_id: str, commit: str, files_from: Path, ref: str = "main") -> Path:
        repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(files_from).rglob("*")):
            if src.is_dir():
                continue
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / src.relative_to(files_from)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as the Hub client writes it
        return snapshot

    return add


@pytest.fixture
def offline_stand_in(tmp_path, monkeypatch, add_to_hub_cache):
    """Factory ``offline_stand_in(repo_id, commit, texts) -> checkpoint dir``: a tiny native LLaDA (2 layers,
    d_model 32, seed 0) with a word-level tokenizer that knows every word of ``texts`` and LLaDA's chat template,
    saved under ``tmp_path/checkpoint`` and laid out in an offline Hugging Face cache under ``repo_id``
    (``HF_HUB_CACHE`` set, ``HF_HUB_OFFLINE=1``, the other cache variables unset), standing in for a released
    checkpoint that the code under test names by its Hub id."""
    import torch

    from align.data.tokenizer import build_word_tokenizer, save_tokenizer
    from align.models import LLaDAModelLM, tiny_llada_config

    def make(repo_id: str, commit: str, texts: list[str]):
        tok = build_word_tokenizer(texts)
        cfg = tiny_llada_config(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                                max_sequence_length=256, mask_token_id=tok.mask_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        files = tmp_path / "checkpoint"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            LLaDAModelLM(cfg).save_pretrained(files)
        save_tokenizer(tok, files)
        cache = tmp_path / "hf" / "hub"
        add_to_hub_cache(cache, repo_id, commit, files)
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                     "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return files

    return make

"""One resolver for model and tokenizer specs: ``builtin:<name>``, local directories, Hub ids (offline cache)."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from align.data.tokenizer import build_word_tokenizer, save_tokenizer
from align.models import LLaDAModelLM, load_model, load_model_and_tokenizer, load_tokenizer, tiny_llada_config
from align.models.resolve import (
    ResolvedModel,
    builtin_checkpoints,
    hub_cache_dir,
    parse_hub_id,
    resolve_model,
    resolve_model_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "tiny-org/tiny-llada"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CORPUS = ["What is two plus three ?", "The answer is five ."]
HUB_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE")


def save_tiny_llada(path: Path) -> None:
    tok = build_word_tokenizer(CORPUS)
    cfg = tiny_llada_config(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64,
                            mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LLaDAModelLM(cfg).save_pretrained(path)
    save_tokenizer(tok, path)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, add_to_hub_cache) -> Path:
    """A Hugging Face Hub cache holding one tiny LLaDA checkpoint (``tiny-org/tiny-llada``, main = COMMIT)."""
    files = tmp_path_factory.mktemp("files")
    save_tiny_llada(files)
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_to_hub_cache(cache, REPO, COMMIT, files)
    return cache


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline mode with ``HF_HUB_CACHE`` pointing at :func:`hub_cache`, set after huggingface_hub's import."""
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def snapshot_of(cache: Path, commit: str = COMMIT) -> Path:
    return cache / "models--tiny-org--tiny-llada" / "snapshots" / commit


# ------------------------------------------------------------------------------------------------ Hub ids
def test_cache_layout_is_the_hub_clients(hub_cache: Path) -> None:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_hub_id_resolves_to_the_cached_snapshot(offline: Path) -> None:
    resolved = resolve_model(REPO)
    assert resolved == ResolvedModel(spec=REPO, path=snapshot_of(offline), kind="hub", repo_id=REPO,
                                     revision=None, commit=COMMIT)
    assert os.fspath(resolved) == str(snapshot_of(offline)) and resolve_model_dir(REPO) == resolved.path
    assert resolve_model(resolved) is resolved
    for rev in ("main", COMMIT):
        pinned = resolve_model(f"{REPO}@{rev}")
        assert (pinned.path, pinned.revision, pinned.commit, pinned.repo_id) == (resolved.path, rev, COMMIT, REPO)


def test_hub_id_loads_model_and_tokenizer(offline: Path) -> None:
    model, tok = load_model_and_tokenizer(REPO, dtype=torch.float32)
    assert isinstance(model, LLaDAModelLM) and model.config.n_layers == 1
    assert tok.mask_token_id == model.mask_token_id == 5 and len(tok) <= model.config.vocab_size
    reference = load_model(snapshot_of(offline))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load_tokenizer(f"{REPO}@main").get_vocab() == tok.get_vocab()


def test_missing_hub_id_names_the_id_and_the_cache(offline: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model("tiny-org/absent")
    message = str(exc.value)
    for part in ("tiny-org/absent", "not in the local Hugging Face cache", str(offline), "HF_HUB_OFFLINE",
                 "hf download tiny-org/absent", "local checkpoint directory"):
        assert part in message, part
    with pytest.raises(FileNotFoundError, match=r"tiny-org/tiny-llada@v2: .*hf download tiny-org/tiny-llada "
                                                r"--revision v2"):
        resolve_model(f"{REPO}@v2")  # a revision that was never downloaded
    with pytest.raises(FileNotFoundError, match="tiny-org/absent"):
        load_model_and_tokenizer("tiny-org/absent")


def test_cache_and_offline_flag_are_read_at_call_time(offline: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "other-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert hub_cache_dir() == other
    with pytest.raises(FileNotFoundError, match="other-cache"):
        resolve_model(REPO)
    # HF_HOME/hub when HF_HUB_CACHE is unset
    home = tmp_path / "hf-home"
    shutil.copytree(offline, home / "hub", symlinks=True)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == home / "hub"
    assert resolve_model(REPO).path == snapshot_of(home / "hub")


def test_online_mode_asks_the_hub_client(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "org/missing":
            raise ValueError("404 Repository Not Found")
        if repo_id == "org/unreachable":
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("long explanation") from ConnectionError("network down")
        path = tmp_path / "models--org--name" / "snapshots" / COMMIT
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model("org/name@v1")
    assert (resolved.kind, resolved.revision, resolved.commit) == ("hub", "v1", COMMIT)
    assert calls == [("org/name", {"revision": "v1", "cache_dir": tmp_path, "local_files_only": False})]
    with pytest.raises(FileNotFoundError, match=r"org/missing: not a local directory, and not available from "
                                                r"the Hugging Face Hub \(ValueError: 404"):
        resolve_model("org/missing")
    with pytest.raises(FileNotFoundError, match=r"org/unreachable: not a local directory; as a Hub id, the Hub could "
                                                r"not be reached \(ConnectionError: network down\) and it is not in "
                                                r"the local Hugging Face cache at "):
        resolve_model("org/unreachable")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # the other offline switch counts too
    resolve_model("org/name")
    assert calls[-1][1]["local_files_only"] is True


def test_parse_hub_id() -> None:
    assert parse_hub_id("GSAI-ML/LLaDA-8B-Instruct") == ("GSAI-ML/LLaDA-8B-Instruct", None)
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in ("name", "a/b/c", "./a", "/abs/path", "../x/y", "org/na--me", "org/name@", "~/x"):
        assert parse_hub_id(not_an_id) is None, not_an_id


# --------------------------------------------------------------------------------------------- built-ins
def test_builtin_checkpoint_resolves_and_loads(offline: Path) -> None:
    assert "quickstart-base" in builtin_checkpoints()
    resolved = resolve_model("builtin:quickstart-base")
    assert resolved.kind == "builtin" and resolved.path.parts[-2:] == ("checkpoints", "quickstart-base")
    assert (resolved.path / "config.json").is_file()
    model, tok = load_model_and_tokenizer("builtin:quickstart-base")
    assert model.config.n_layers == 4 and tok.mask_token_id == model.mask_token_id
    assert tok.chat_template  # so `dlm-align generate` needs no --raw


def test_unknown_builtin_lists_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match=r"no built-in checkpoint 'nope'; available: .*builtin:quickstart-base"):
        resolve_model("builtin:nope")
    with pytest.raises(FileNotFoundError, match="builtin:arithmetic is a built-in tokenizer, not a checkpoint"):
        load_model("builtin:arithmetic")


def test_tokenizer_specs() -> None:
    from align.build import build_tokenizer

    tok = load_tokenizer("builtin:arithmetic")
    assert tok.mask_token_id == 5 and tok.chat_template
    assert build_tokenizer("builtin:arithmetic").get_vocab() == tok.get_vocab()
    assert load_tokenizer("builtin:quickstart-base").mask_token_id == 5


def test_recipe_model_section_accepts_a_hub_id(offline: Path) -> None:
    from align.build import build_model_and_tokenizer
    from align.config import ModelConfig

    model, tok = build_model_and_tokenizer(ModelConfig(path=REPO))
    assert model.config.n_layers == 1 and tok.mask_token_id == 5
    assert resolve_model(REPO).path == snapshot_of(offline)
    model, _ = build_model_and_tokenizer(ModelConfig(path="builtin:quickstart-base", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ local paths
def test_local_paths(offline: Path, tmp_path: Path) -> None:
    snap = snapshot_of(offline)
    assert resolve_model(snap) == ResolvedModel(spec=str(snap), path=snap, kind="local")
    assert resolve_model(str(snap)).kind == "local"
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"weights\.bin: expected a checkpoint directory, found a file"):
        resolve_model(str(file))
    missing = tmp_path / "runs" / "sft" / "final"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: checkpoint directory does not exist")):
        load_model_and_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_local_directory_wins_over_a_hub_id(offline: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org").mkdir()
    (tmp_path / "tiny-org" / "tiny-llada").symlink_to(snapshot_of(offline), target_is_directory=True)
    assert resolve_model(REPO).kind == "local"
    # a missing two-part relative path is tried as a Hub id; the message says it is not a local directory either
    with pytest.raises(FileNotFoundError, match=r"runs/final: not a local directory; as a Hub id"):
        resolve_model("runs/final")


# ------------------------------------------------------------------------------------------- the CLI
def test_generate_cli_with_builtin_and_hub_models(offline: Path, capsys) -> None:
    from align.cli import main

    small = ["--gen-length", "8", "--denoising-steps", "8", "--block-length", "8", "--device", "cpu"]
    assert main(["generate", "--model", "builtin:quickstart-base", "--prompt", "What is 7 + 5?", *small]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", "--model", REPO, "--prompt", "What is two plus three ?", "--raw", *small]) == 0
    assert main(["generate", "--model", "tiny-org/absent", "--prompt", "x", *small]) == 2
    err = capsys.readouterr().err
    assert "error: tiny-org/absent: " in err and "not in the local Hugging Face cache" in err
    assert main(["generate", "--model", "builtin:nope", "--prompt", "x", *small]) == 2
    assert "available: builtin:quickstart-base" in capsys.readouterr().err

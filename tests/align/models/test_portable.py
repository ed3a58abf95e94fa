"""Portable checkpoints: a run's ``final/`` opens with plain transformers where dlm-align cannot be imported, with
the same logits and no warning, while dlm-align's own loaders keep the native classes and never run the copies."""

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

import align.models.configuration_llada as configuration_module
import align.models.llada as modeling_module
from align.cli import main
from align.models import LLaDAConfig, LLaDAModelLM, load_model, load_model_and_tokenizer, tiny_llada_config
from align.models.configuration_llada import LLADA_AUTO_MAP

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_FILES = ("llada.py", "configuration_llada.py")
# A fixed input for the logit comparisons: the second row is left-padded (attention_mask 0 on its first two ids).
IDS = [[7, 8, 9, 10, 5, 5, 5, 0], [0, 0, 11, 12, 13, 5, 5, 0]]
MASK = [[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]]
TEXT = "What is 7 + 5 ?"

# Runs in a fresh interpreter where ``import align`` fails: loads the directory through plain transformers with
# ``trust_remote_code=True``, saves each Auto class's logits on IDS/MASK, and records every transformers log
# record of level WARNING or above and every Python warning raised while loading. The control directory
# (config.json without auto_map, no modules: what dlm-align wrote before) shows the failure and the warning.
REMOTE_LOAD = """
import sys
sys.modules["align"] = None
import json, logging, warnings
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

torch.set_num_threads(1)
portable, legacy, out, ids, mask, text = sys.argv[1:7]
ids, mask = torch.tensor(json.loads(ids)), torch.tensor(json.loads(mask))
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}: {record.getMessage()}")

logging.getLogger("transformers").addHandler(Keep(level=logging.WARNING))
result = {"classes": {}}
try:
    import align  # noqa: F401
    result["align_importable"] = True
except ImportError:
    result["align_importable"] = False
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result["config"] = type(AutoConfig.from_pretrained(portable, trust_remote_code=True)).__module__
    for auto in (AutoModelForMaskedLM, AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(portable, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(ids, attention_mask=mask).logits, f"{out}/{auto.__name__}.pt")
        result["classes"][auto.__name__] = f"{type(model).__module__}.{type(model).__name__}"
    result["tokens"] = AutoTokenizer.from_pretrained(portable, trust_remote_code=True)(text)["input_ids"]
result["warnings"] = records + [f"{w.category.__name__}: {w.message}" for w in caught]
records.clear()
try:
    AutoModelForMaskedLM.from_pretrained(legacy, trust_remote_code=True)
    result["legacy_model_error"] = None
except ValueError as err:
    result["legacy_model_error"] = str(err)
AutoTokenizer.from_pretrained(legacy, trust_remote_code=True)
result["legacy_warnings"] = list(records)
with open(f"{out}/result.json", "w") as f:
    json.dump(result, f)
"""


def run_cli_recipe(path: Path, raw: dict) -> None:
    """Write ``raw`` as a recipe file (JSON is YAML) and run it through ``dlm-align run``."""
    path.write_text(json.dumps(raw))
    assert main(["run", str(path)]) == 0


def sft_recipe(output_dir: Path, model_path: str) -> dict:
    """Two SFT steps from ``model_path`` on the built-in arithmetic task, evaluation off."""
    return {"seed": 0, "output_dir": str(output_dir), "stages": ["sft"], "model": {"path": model_path},
            "data": {"task": "arithmetic", "task_args": {"num_train": 16, "num_test": 4, "seed": 0},
                     "max_length": 128},
            "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
            "eval": {"enabled": False}}


@pytest.fixture(scope="module")
def final_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sft/final`` of a two-step SFT run from the shipped ``builtin:quickstart-base``, run through the CLI."""
    root = tmp_path_factory.mktemp("portable")
    run_cli_recipe(root / "recipe.yaml", sft_recipe(root / "run", "builtin:quickstart-base"))
    return root / "run" / "sft" / "final"


def native_logits(model_dir: Path) -> torch.Tensor:
    model = load_model(model_dir).eval()
    assert type(model) is LLaDAModelLM
    with torch.no_grad():
        return model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits


def test_final_dir_carries_auto_map_and_the_modules(final_dir):
    config = json.loads((final_dir / "config.json").read_text())
    assert config["auto_map"] == LLADA_AUTO_MAP
    # The released field names stay as they are (no transformers-style renames in the file).
    assert {"d_model", "n_heads", "n_layers", "mlp_hidden_size", "max_sequence_length", "mask_token_id"} <= set(config)
    assert not {"hidden_size", "num_attention_heads", "num_hidden_layers"} & set(config)
    for name, module in zip(MODULE_FILES, (modeling_module, configuration_module)):
        assert (final_dir / name).read_bytes() == Path(module.__file__).read_bytes(), name


def test_modules_import_only_torch_transformers_and_each_other():
    """transformers copies a module and its relative imports; any other import must be installed where it loads."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for module in (modeling_module, configuration_module):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                assert (node.level, node.module) == (1, "configuration_llada"), ast.unparse(node)
                continue
            else:
                continue
            assert set(tops) <= allowed, f"{module.__name__}: {ast.unparse(node)}"


def test_final_dir_loads_without_dlm_align_with_identical_logits_and_no_warning(final_dir, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(final_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["auto_map"]
    (legacy / "config.json").write_text(json.dumps(config))
    for name in MODULE_FILES:
        (legacy / name).unlink()
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(final_dir), str(legacy), str(out), json.dumps(IDS), json.dumps(MASK),
         TEXT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["align_importable"] is False
    assert result["config"].startswith("transformers_modules.")
    assert set(result["classes"]) == {"AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM"}
    assert all(c.startswith("transformers_modules.") and c.endswith(".llada.LLaDAModelLM")
               for c in result["classes"].values()), result["classes"]
    assert result["warnings"] == []
    expected = native_logits(final_dir)
    for name in result["classes"]:
        assert torch.equal(torch.load(out / f"{name}.pt"), expected), name  # bit for bit, one thread each side
    _, tokenizer = load_model_and_tokenizer(final_dir)
    assert result["tokens"] == tokenizer(TEXT)["input_ids"]
    # Control: what dlm-align wrote before cannot be opened, and loading its tokenizer logs the model-type warning.
    assert "llada" in result["legacy_model_error"]
    assert any("model of type `llada` to instantiate a model of type ``" in w for w in result["legacy_warnings"])


def test_native_load_prints_no_warning(final_dir):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Keep(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_model_and_tokenizer(final_dir)
            AutoModelForMaskedLM.from_pretrained(final_dir, trust_remote_code=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert records + [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_native_loaders_never_run_the_copied_modules(final_dir, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(final_dir, tampered)
    for name in MODULE_FILES:
        (tampered / name).write_text('raise RuntimeError("the copied module was executed")\n')
    expected = native_logits(final_dir)
    assert torch.equal(native_logits(tampered), expected)
    model, _ = load_model_and_tokenizer(tampered)
    assert type(model) is LLaDAModelLM
    # With dlm-align imported, the Auto classes pick the native classes even when remote code is allowed.
    assert type(AutoConfig.from_pretrained(tampered, trust_remote_code=True)) is LLaDAConfig
    assert type(AutoModelForMaskedLM.from_pretrained(tampered, trust_remote_code=True)) is LLaDAModelLM
    assert main(["generate", "--model", str(tampered), "--prompt", TEXT, "--gen-length", "8",
                 "--denoising-steps", "8", "--block-length", "8"]) == 0
    assert capsys.readouterr().out.strip()
    # model.path in a recipe: the run starts from the tampered directory and writes a fresh, working final/.
    run_cli_recipe(tmp_path / "recipe.yaml", sft_recipe(tmp_path / "run", str(tampered)))
    again = tmp_path / "run" / "sft" / "final"
    for name, module in zip(MODULE_FILES, (modeling_module, configuration_module)):
        assert (again / name).read_bytes() == Path(module.__file__).read_bytes(), name


def test_own_auto_map_is_kept_and_the_released_one_dropped():
    own = tiny_llada_config(auto_map=dict(LLADA_AUTO_MAP))
    assert own.auto_map == LLADA_AUTO_MAP
    hub = {k: f"org/name--{v}" for k, v in LLADA_AUTO_MAP.items()}
    assert tiny_llada_config(auto_map=hub).auto_map == hub
    released = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    assert not hasattr(tiny_llada_config(auto_map=released), "auto_map")


def test_resaving_a_released_style_config_writes_the_own_auto_map(tmp_path):
    released = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"}
    model = LLaDAModelLM(tiny_llada_config(auto_map=released))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == LLADA_AUTO_MAP
    assert sorted(p.name for p in tmp_path.glob("*.py")) == sorted(MODULE_FILES)

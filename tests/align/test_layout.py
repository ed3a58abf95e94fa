"""The package's architecture rules, checked on the source: who may import whom, and module size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: folders that make up the installed package (``align``, ``align.rewards``, ``align.kernels``, ``align.data``).
PACKAGE_DIRS = ("align", "rewards", "kernels", "data")
MAX_LINES = 420


def _imports(path: Path) -> set[str]:
    """Modules imported anywhere in ``path`` (also inside functions), as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder,forbidden", [
    ("align/sampling", ("align.rewards", "align.config", "align.pipeline", "align.trainers")),
    ("align/likelihood", ("align.rewards", "align.config", "align.pipeline", "align.trainers", "align.sampling")),
    ("align/trainers", ("align.config", "align.pipeline", "align.cli")),
    ("align/models", ("align.config", "align.pipeline", "align.trainers", "align.rewards")),
])
def test_lower_layers_do_not_import_higher_ones(folder, forbidden):
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in _modules(folder) for m in sorted(_imports(p))
                 if m.startswith(forbidden)]
    assert not offenders, offenders


def test_options_and_loops_import_nothing_from_the_package():
    for name in ("align/options.py", "align/loops.py"):
        assert not [m for m in _imports(ROOT / name) if m.startswith("align")], name


def test_modules_stay_readable_in_one_sitting():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for d in PACKAGE_DIRS for p in _modules(d)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long


def test_import_align_registers_the_auto_classes():
    code = ("import align\nfrom transformers import AutoConfig, AutoModelForMaskedLM\n"
            "cfg = AutoConfig.for_model('llada', vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,"
            " max_sequence_length=32, mask_token_id=3)\n"
            "print(type(AutoModelForMaskedLM.from_config(cfg)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "LLaDAModelLM"


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's list works in an editable install but not from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"align." + ".".join(p.parent.relative_to(ROOT / "align").parts) if p.parent != ROOT / "align" else "align"
             for p in (ROOT / "align").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)

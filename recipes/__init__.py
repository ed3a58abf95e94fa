"""Recipes shipped with dlm-align (YAML files in this package), found by name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: folders of launcher configs (accelerate's YAML, DeepSpeed's JSON) shipped beside the recipes
NOT_RECIPES = ("accelerate",)


def _root() -> Path:
    return Path(str(resources.files("align.recipes")))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``quickstart``, ``llada/sft-lora``, ...); the launcher configs under
    ``accelerate/`` are shipped beside them but are not recipes."""
    root = _root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if p.relative_to(root).parts[0] not in NOT_RECIPES)


def recipe_path(name_or_path: str) -> Path:
    """The YAML file of a shipped recipe name, or ``name_or_path`` itself when it is an existing file.

    Raises:
        FileNotFoundError: neither a file nor a shipped recipe; the message lists the shipped names.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    candidate = _root() / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no recipe file or shipped recipe named {name_or_path!r}; "
                            f"shipped recipes: {', '.join(list_recipes())}")


def shipped_file(relative: str) -> Path | None:
    """A file shipped beside the recipes (``accelerate/zero3.json``), or None; a leading ``recipes/`` is
    ignored, so ``recipes/accelerate/zero3.json`` names the same file from anywhere."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    if rel.parts and rel.parts[0] == "recipes":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    candidate = _root() / rel
    return candidate if rel.parts and candidate.is_file() else None


def recipe_description(path: Path) -> str:
    """The first comment line after the run command, used by ``dlm-align ls``."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines()[:6] if ln.startswith("#")]
    rest = [ln for ln in lines if not ln.startswith("dlm-align ") and ln]
    return rest[0] if rest else ""

"""MkDocs hook that generates the "Recipes and the CLI" page (``recipes.md``) when the site is built.

The page is made from the code it documents, so it cannot drift from it: every field of every recipe section comes
from the section dataclasses (:mod:`align.config.sections`) and the stage options classes
(:mod:`align.trainers.sft_config`, :mod:`align.trainers.grpo_config`, :mod:`align.trainers.vrpo_config`): its type
and default from the dataclass, its meaning from the ``Attributes:`` section of the class docstring. A field without
a description there, or a description of a field that does not exist, stops the build. The ``--help`` of every
``dlm-align`` subcommand comes from the argument parser itself.

``mkdocs.yml`` names this file under ``hooks:``; :func:`recipes_page` is usable without MkDocs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from typing import Any

#: the path of the generated page inside the site.
PAGE = "recipes.md"

_ENTRY = re.compile(r"^([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*):\s*(.*)$", re.S)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


class FieldDocError(RuntimeError):
    """A config class whose docstring does not describe exactly its fields."""


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of ``cls``'s own docstring, one per field name (``a, b: text`` gives both).

    Continuation lines (indented deeper than the entry) are joined to their entry; reST roles and double
    backticks become Markdown code spans.
    """
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    entries: list[str] = []
    base_indent: int | None = None
    for line in lines[start:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if base_indent is None:
            base_indent = indent
        if indent < base_indent:
            break
        if indent == base_indent:
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    out: dict[str, str] = {}
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None:
            raise FieldDocError(f"{cls.__qualname__}: cannot read the Attributes entry {entry[:60]!r}")
        for name in re.split(r",\s*", match.group(1)):
            out[name] = markdown_text(match.group(2))
    return out


def markdown_text(text: str) -> str:
    """Docstring prose as Markdown: reST roles and ````code```` become code spans; table pipes are escaped."""
    text = _ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (dict, list)) and not value:
        return "`{}`" if isinstance(value, dict) else "`[]`"
    return f"`{value!r}`".replace("|", "\\|") if not isinstance(value, str) else f"`{value}`"


def _type(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return "`" + text.replace("|", "\\|") + "`"


def field_docs(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, meaning)`` of every dataclass field of ``cls`` but ``skip``.

    A field's meaning is its entry in the docstring of the class that declares it; an inherited field grouped
    with others in the subclass's docstring (``gen_length, ...: sampler settings``) takes the base class's
    entry, which describes it alone. Raises :class:`FieldDocError` when a field has no entry or an entry names
    no field.
    """
    own = attribute_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    stale = sorted(set(own) - set(names))
    if stale:
        raise FieldDocError(f"{cls.__qualname__}: the docstring describes {', '.join(stale)}, which are not fields")
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meaning = own.get(f.name)
        grouped = meaning is not None and sum(v == meaning for v in own.values()) > 1
        for base in cls.__mro__[1:]:
            if (meaning is None or grouped) and f.name in getattr(base, "__dataclass_fields__", {}):
                inherited = attribute_docs(base).get(f.name)
                if inherited is not None:
                    meaning = inherited
                    break
        if meaning is None:
            raise FieldDocError(f"{cls.__qualname__}.{f.name} has no entry in the docstring's Attributes section")
        rows.append((f.name, _type(f), _default(f), meaning))
    return rows


def _table(rows: list[tuple[str, str, str, str]], prefix: str) -> str:
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    out += [f"| `{prefix}{name}` | {typ} | {default} | {meaning} |" for name, typ, default, meaning in rows]
    return "\n".join(out) + "\n"


def cli_help(width: int = 100) -> dict[str, str]:
    """``dlm-align --help`` and the ``--help`` of every subcommand, keyed by the command line that prints it."""
    from align.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)            # argparse wraps help text to the terminal width
    try:
        parser = build_parser()
        out = {"dlm-align --help": parser.format_help()}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[f"dlm-align {name} --help"] = sub.format_help()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out


def recipes_page() -> str:
    """The Markdown of the "Recipes and the CLI" page."""
    from align.config.sections import (
        TASK_SPLIT_ARGS,
        DataConfig,
        EvalConfig,
        ModelConfig,
        PeftConfig,
        RecipeConfig,
    )
    from align.data.task import ArithmeticTaskSpec
    from align.sampling.loop_guard import LoopGuardConfig
    from align.trainers.grpo_config import GRPOOptions
    from align.trainers.sft_config import DiffusionSFTOptions
    from align.trainers.vrpo_config import VRPOOptions

    sections = ("model", "data", "peft", "eval", "pretrain", "sft", "grpo", "vrpo")
    parts = [
        "# Recipes and the CLI\n",
        "Every run is a YAML recipe; `dlm-align run RECIPE key.sub=value ...` runs it with overrides and "
        "`dlm-align validate` checks it without loading a model. This page lists every key a recipe accepts, "
        "generated from the configuration classes when the site is built (their fields, defaults and docstrings), "
        "so it always matches the installed code. An unknown key, a wrong type or a value out of range is an error "
        "naming the dotted key, raised when the recipe is loaded. How recipes are found, overridden and re-run: "
        "[the README](index.md#recipes-and-the-cli).\n",
        "## Top level\n",
        _table(field_docs(RecipeConfig, skip=sections), ""),
        "## `model`\n",
        _table(field_docs(ModelConfig), "model."),
        "## `data`\n",
        _table(field_docs(DataConfig), "data."),
        "### `data.task_args` (the built-in `arithmetic` task)\n",
        f"The difficulty settings below, plus the split settings {', '.join(f'`{k}`' for k in TASK_SPLIT_ARGS)} "
        "(training and held-out problem counts, and the seed the problems are drawn with).\n",
        _table(field_docs(ArithmeticTaskSpec), "data.task_args."),
        "## `peft`\n",
        "LoRA through PEFT; leave the section out to train every weight.\n",
        _table(field_docs(PeftConfig), "peft."),
        "## `eval`\n",
        _table(field_docs(EvalConfig), "eval."),
        "## `pretrain` and `sft`\n",
        "The masked-diffusion options below, plus any `transformers.TrainingArguments` field (`learning_rate`, "
        "`max_steps`, `per_device_train_batch_size`, `gradient_accumulation_steps`, `deepspeed`, ...) in the same "
        "section.\n",
        _table(field_docs(DiffusionSFTOptions), "sft."),
        "## `grpo`\n",
        "Diffusion policy optimization ([GRPO](grpo.md)), plus `transformers.TrainingArguments` fields; "
        "`per_device_train_batch_size` counts completions.\n",
        _table(field_docs(GRPOOptions), "grpo."),
        "## `vrpo`\n",
        "Preference optimization on ELBO estimates ([preference](preference.md)), plus "
        "`transformers.TrainingArguments` fields; `per_device_train_batch_size` counts pairs.\n",
        _table(field_docs(VRPOOptions), "vrpo."),
        "## `loop_guard` (in `eval` and `grpo`)\n",
        "The decode-time loop guard of the sampler ([sampling](sampling.md)).\n",
        _table(field_docs(LoopGuardConfig), "eval.loop_guard."),
        "## The command line\n",
        "`python -m align.cli` is the same command as `dlm-align`.\n",
    ]
    for command, text in cli_help().items():
        parts.append(f"### `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def readme_section(readme: str, title: str) -> str:
    """The ``## title`` section of the README (up to the next ``##`` heading), as a page of its own.

    Its headings move up one level, so the section's title is the page title; links to the README's own sections
    point at the home page.
    """
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if match is None:
        raise FieldDocError(f"README.md has no section '## {title}'")
    body = re.sub(r"^#(#+) ", r"\1 ", match.group(1), flags=re.M)
    body = re.sub(r"\]\(#", "](index.md#", body)
    return f"# {title}\n{body}"


def site_links(markdown: str, from_readme: bool) -> str:
    """Links as the site needs them: the README's ``docs/x.md`` are ``x.md`` there, and the pages' links to
    ``../README.md`` go to the home page, which is the README."""
    if from_readme:
        return re.sub(r"\]\(docs/", "](", markdown)
    return re.sub(r"\]\(\.\./README\.md", "](index.md", markdown)


#: pages made from README.md: site path -> README section (None: the whole README).
README_PAGES: dict[str, str | None] = {"index.md": None, "install.md": "Installing", "sft.md": "Masked-diffusion SFT"}


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: add the generated pages to the site's files."""
    from pathlib import Path

    from mkdocs.structure.files import File

    readme = (Path(config["config_file_path"]).parent / "README.md").read_text(encoding="utf-8")
    for path, section in README_PAGES.items():
        text = readme if section is None else readme_section(readme, section)
        files.append(File.generated(config, path, content=text))
    files.append(File.generated(config, PAGE, content=recipes_page()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: rewrite the links of a page for the site (:func:`site_links`)."""
    return site_links(markdown, from_readme=page.file.src_uri in README_PAGES)

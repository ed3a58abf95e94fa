"""Every fenced code block of README.md and docs/*.md is run by a test or marked with why it is not.

The conventions are those of docs/contributing.md: a block's language says what it is (``text`` for formulas,
layouts and other non-code); an HTML comment on the line before a block marks it (``<!-- docs: KIND (why) -->``).
Unmarked blocks run here: Python in a subprocess (each block alone, in a fresh namespace and an empty directory),
``dlm-align`` command lines through ``align.cli.main``, JSON and JSONL parsed, YAML recipe fragments merged into
the ``quickstart`` recipe and loaded (so every key is checked). ``long`` blocks have each ``dlm-align run`` in them
checked with ``dlm-align validate`` of the same recipe and overrides instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: marks that need a reason in parentheses, and those that do not.
REASONED = ("gpu", "weights", "network", "long", "excerpt")
PLAIN = ("output",)
MARK = re.compile(r"^<!--\s*docs:\s*(\S+)\s*(.*?)\s*-->$")
#: a mark that covers some lines of a block only: ``(lines 3-4: why)`` or ``(line 6: why)``.
LINES = re.compile(r"^\(lines? (\d+)(?:-(\d+))?: .+\)$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})([^\s`]*)\s*$")
LANGUAGES = ("text", "bash", "python", "json", "jsonl", "yaml")
#: subcommands an unmarked bash block may hold: quick on a CPU, with shipped recipes and checkpoints.
RUNNABLE = ("ls", "validate", "cp", "generate", "eval", "--help")
PYTHON_TIMEOUT_S = 300


@dataclass
class Block:
    """One fenced code block: its page, 1-based line of the opening fence, language, text, the mark that covers
    the whole block (``mark``, ``reason``) and the marks that cover some of its lines (``line_marks``: line of the
    block -> kind)."""

    page: Path
    line: int
    lang: str
    body: str
    mark: str | None
    reason: str
    line_marks: dict[int, str]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the ``docs:`` mark on the line before it, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:j])
        marks, k = [], i - 1
        while k >= 0 and (not lines[k].strip() or MARK.match(lines[k].strip())):
            if lines[k].strip():
                marks.append(MARK.match(lines[k].strip()).groups())
            k -= 1
        whole = [(kind, why) for kind, why in marks if not LINES.match(why)]
        line_marks = {}
        for kind, why in marks:
            if m := LINES.match(why):
                first = int(m.group(1))
                line_marks.update(dict.fromkeys(range(first, int(m.group(2) or first) + 1), kind))
        mark, reason = whole[0] if whole else (None, "")
        out.append(Block(page, i + 1, lang, body, mark, reason, line_marks))
        i = j + 1
    return out


BLOCKS = [b for page in PAGES for b in read_blocks(page)]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def numbered_commands(body: str) -> list[tuple[int, str]]:
    """The command lines of a shell block with the block line each starts on: continuations joined, comments and
    blank lines dropped."""
    out, pending, start = [], "", 0
    for n, line in enumerate(body.splitlines(), 1):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        pending = ""
        if line:
            out.append((start, line))
    return out


def commands(body: str) -> list[str]:
    """The command lines of a shell block (:func:`numbered_commands` without the numbers)."""
    return [c for _, c in numbered_commands(body)]


def _is_runnable(cmd: str) -> bool:
    words = shlex.split(cmd)
    return len(words) >= 2 and words[0] == "dlm-align" and (words[1] in RUNNABLE or "--help" in words)


UNMARKED = [b for b in BLOCKS if b.mark is None]
PYTHON = [b for b in UNMARKED if b.lang == "python" and not b.line_marks]
SHELL = [b for b in UNMARKED if b.lang == "bash" and any(n not in b.line_marks for n, _ in numbered_commands(b.body))]
DATA = [b for b in UNMARKED if b.lang in ("json", "jsonl")]
YAML = [b for b in UNMARKED if b.lang == "yaml"]


def test_blocks_found() -> None:
    """The parser sees the pages' blocks (a broken fence pattern would make every other test vacuous)."""
    assert len(BLOCKS) > 50
    assert {b.lang for b in BLOCKS} >= {"text", "bash", "python"}


@pytest.mark.parametrize("block", BLOCKS, ids=_ids(BLOCKS))
def test_block_is_run_or_marked(block: Block) -> None:
    """Every block has a language; a mark is a known kind with its reason; an unmarked block is one this file runs."""
    assert block.lang in LANGUAGES, (f"{block.where}: a code block needs a language ({', '.join(LANGUAGES)}); "
                                     f"got {block.lang!r}")
    for kind in block.line_marks.values():
        assert kind in REASONED, f"{block.where}: 'docs: {kind}' of some lines must be one of {', '.join(REASONED)}"
    assert not block.line_marks or block.lang == "bash", f"{block.where}: only shell blocks take marks of some lines"
    if block.mark is not None:
        assert block.mark in (*REASONED, *PLAIN, "tested-by"), f"{block.where}: unknown mark 'docs: {block.mark}'"
        if block.mark in REASONED:
            assert re.fullmatch(r"\(.+\)", block.reason), f"{block.where}: 'docs: {block.mark}' needs (a reason)"
        if block.mark == "tested-by":
            assert block.reason and (ROOT / block.reason).is_file(), (
                f"{block.where}: 'docs: tested-by {block.reason}': no such test file")
        return
    if block.lang == "bash":
        bad = [c for n, c in numbered_commands(block.body) if n not in block.line_marks and not _is_runnable(c)]
        assert not bad, (f"{block.where}: {bad[0]!r} is not run by this test; mark the block "
                         "(docs/contributing.md)")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from align.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:                               # --help exits through argparse
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("block", SHELL, ids=_ids(SHELL))
def test_shell_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``dlm-align`` command of an unmarked shell block (but lines marked alone) exits 0, in order, in an empty
    directory."""
    monkeypatch.chdir(tmp_path)
    for n, cmd in numbered_commands(block.body):
        if n in block.line_marks:
            continue
        rc, out = _cli(shlex.split(cmd)[1:], capsys)
        assert rc == 0, f"{block.where}: `{cmd}` exited {rc}:\n{out[-2000:]}"


def make_runs(target: str) -> list[str]:
    """The ``dlm-align run ...`` lines of a Makefile target's recipe."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", text, re.M)
    return [] if m is None else re.findall(r"dlm-align run [^\n]+", m.group(1))


def long_runs(body: str) -> list[list[str]]:
    """The ``dlm-align run`` commands of a block, and those of the Makefile targets it runs (``make quickstart``),
    as argument lists for ``dlm-align validate``; ``--restart`` options are dropped."""
    out = []
    body = body.replace("\\\n", " ")
    body += "".join(f"\n{run}" for target in re.findall(r"^make (\S+)", body, re.M) for run in make_runs(target))
    for m in re.finditer(r"(?:-m align\.cli|dlm-align) run ([^#\n]+)", body):
        args = [a for a in shlex.split(m.group(1)) if a not in ("--restart",) and not a.startswith("--restart-from")]
        if ["validate", *args] not in out:
            out.append(["validate", *args])
    return out


def _long_text(block: Block) -> str:
    """The lines of a block marked ``long``: all of them, or those a mark of some lines names."""
    if block.mark == "long":
        return block.body
    return "\n".join(c for n, c in numbered_commands(block.body) if block.line_marks.get(n) == "long")


LONG = [b for b in BLOCKS if (b.mark == "long" and "validate" in b.reason) or long_runs(_long_text(b))]


@pytest.mark.parametrize("block", LONG, ids=_ids(LONG))
def test_long_block_validates(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """A long run is not run here: ``dlm-align validate`` of its recipe and overrides passes instead."""
    monkeypatch.chdir(tmp_path)
    runs = long_runs(_long_text(block))
    if "validate" in block.reason:
        assert runs, f"{block.where}: the mark says `dlm-align validate` is run, but the block has no dlm-align run"
    for argv in runs:
        rc, out = _cli(argv, capsys)
        assert rc == 0, f"{block.where}: `dlm-align {' '.join(argv)}` exited {rc}:\n{out[-2000:]}"


@pytest.mark.parametrize("block", DATA, ids=_ids(DATA))
def test_data_block_parses(block: Block) -> None:
    """JSON blocks are one JSON value; JSONL blocks are one JSON object a line."""
    if block.lang == "json":
        json.loads(block.body)
    else:
        for n, line in enumerate(block.body.splitlines(), 1):
            assert isinstance(json.loads(line), dict), f"{block.where}: line {n} is not a JSON object"


def _merge(base: dict, extra: dict) -> dict:
    """``extra``'s sections over ``base``'s, key by key within a section (a key's value is replaced whole)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("block", YAML, ids=_ids(YAML))
def test_yaml_block_loads(block: Block, tmp_path: Path) -> None:
    """A YAML recipe fragment, merged into the ``quickstart`` recipe, loads: every key and value is accepted."""
    from align.config import config_from_dict
    from align.recipes import recipe_path

    fragment = yaml.safe_load(block.body)
    assert isinstance(fragment, dict), f"{block.where}: not a YAML mapping"
    base = yaml.safe_load(recipe_path("quickstart").read_text(encoding="utf-8"))
    config_from_dict(_merge(base, fragment), source=block.where, base_dir=tmp_path)


_RUNNER = """
import json, os, sys, tempfile, traceback
blocks = json.load(sys.stdin)
results = {}
for where, code in blocks:
    cwd = tempfile.mkdtemp()
    os.chdir(cwd)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
        results[where] = None
    except BaseException:
        results[where] = traceback.format_exc()[-3000:]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def python_results() -> dict[str, str | None]:
    """Run every unmarked Python block in one subprocess (one import of torch), each in a fresh namespace."""
    if not PYTHON:
        return {}
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([(b.where, b.body) for b in PYTHON]),
                          capture_output=True, text=True, timeout=PYTHON_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"the Python blocks' runner failed:\n{proc.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs(block: Block, python_results: dict[str, str | None]) -> None:
    """An unmarked Python block runs without an exception."""
    assert block.where in python_results
    assert python_results[block.where] is None, f"{block.where} raised:\n{python_results[block.where]}"


def test_marks_are_read(tmp_path: Path) -> None:
    """The mark parser finds a mark and its reason, and the command parser joins continuations and drops comments."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- docs: gpu (needs CUDA) -->\n```bash\ndlm-align run x \\\n  a=1  # c\n```\n\n"
                    "<!-- docs: weights (line 2: a) -->\n<!-- docs: long (lines 3-4: b) -->\n"
                    "```bash\nx\ny\nz\nw\n```\n")
    block, partly = read_blocks(page)
    assert (partly.mark, partly.line_marks) == (None, {2: "weights", 3: "long", 4: "long"})
    assert numbered_commands("a \\\n b\n\n# c\nd  # e\n") == [(1, "a   b"), (5, "d")]
    assert (block.mark, block.reason, block.lang, block.line) == ("gpu", "(needs CUDA)", "bash", 4)
    assert commands(block.body) == ["dlm-align run x    a=1"]
    assert long_runs("dlm-align run --restart quickstart sft.max_steps=3  # c\n") == [
        ["validate", "quickstart", "sft.max_steps=3"]]
    assert long_runs("make quickstart-loops\nmake test\n") == [["validate", "quickstart-loops"]]


def _hooks():
    """docs/hooks.py, the generator of the recipes page, imported from its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_page_lists_every_field() -> None:
    """The generated page has a row for every field of every section and options class, with its default, and the
    --help of every subcommand."""
    from align.config.sections import DataConfig, EvalConfig, ModelConfig, PeftConfig
    from align.trainers.grpo_config import GRPOOptions
    from align.trainers.sft_config import DiffusionSFTOptions
    from align.trainers.vrpo_config import VRPOOptions

    page = _hooks().recipes_page()
    for prefix, cls in (("model", ModelConfig), ("data", DataConfig), ("peft", PeftConfig), ("eval", EvalConfig),
                        ("sft", DiffusionSFTOptions), ("grpo", GRPOOptions), ("vrpo", VRPOOptions)):
        for f in dataclasses.fields(cls):
            assert f"| `{prefix}.{f.name}` |" in page, f"{prefix}.{f.name} missing from the recipes page"
    assert "| `grpo.temperature` | `float` | `1.0` |" in page          # GRPO's own default, not the sampler's
    assert "| `eval.temperature` | `float` | `0.0` |" in page
    for command in ("run", "validate", "ls", "cp", "generate", "merge"):
        assert f"### `dlm-align {command} --help`" in page


def test_recipes_page_refuses_undocumented_and_stale_fields() -> None:
    """A field without a docstring entry, or an entry for no field, stops the generator naming the class and key."""
    hooks = _hooks()

    @dataclasses.dataclass
    class Undocumented:
        """Options.

        Attributes:
            a, b: two documented fields.
        """

        a: int = 1
        b: str = "x"
        c: float = 0.5

    @dataclasses.dataclass
    class Stale:
        """Options.

        Attributes:
            a: documented.
            gone: a field that was removed.
        """

        a: int = 1

    with pytest.raises(hooks.FieldDocError, match=r"Undocumented\.c has no entry"):
        hooks.field_docs(Undocumented)
    with pytest.raises(hooks.FieldDocError, match=r"Stale: the docstring describes gone"):
        hooks.field_docs(Stale)
    assert hooks.attribute_docs(Undocumented) == {"a": "two documented fields.", "b": "two documented fields."}


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (every warning an error) builds the site, with the generated pages in it."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    assert "grpo.estimator_args" in (site / "recipes" / "index.html").read_text(encoding="utf-8")
    assert "Installing" in (site / "install" / "index.html").read_text(encoding="utf-8")
    assert "align.sampling.sampler.generate" in (site / "reference" / "sampling" / "index.html").read_text(
        encoding="utf-8")

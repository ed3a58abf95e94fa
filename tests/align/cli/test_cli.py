"""The dlm-align command line: ls, validate, cp, run errors, and no top-level package squatting."""

import subprocess
import sys

from align.cli import main


def test_ls_lists_shipped_recipes(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "quickstart " in out and "llada/sft-lora" in out


def test_validate_ok_and_bad_key(capsys):
    assert main(["validate", "quickstart"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", "quickstart", "sft.max_stepz=3"]) == 2
    assert "'sft.max_stepz' (did you mean 'max_steps'?)" in capsys.readouterr().err


def test_cp_copies_and_refuses_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "quickstart", str(dest)]) == 0
    assert dest.read_text().startswith("# dlm-align run quickstart")
    assert main(["cp", "quickstart", str(dest)]) == 1
    assert main(["validate", str(dest)]) == 0


def test_run_missing_recipe(capsys):
    assert main(["run", "no-such-recipe"]) == 2
    assert "shipped recipes:" in capsys.readouterr().err


def test_no_top_level_rewards_or_kernels(tmp_path):
    code = ("import importlib.util as u, align.rewards, align.kernels, align.data; "
            "print(u.find_spec('rewards') is None, u.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_console_script_help():
    import shutil

    exe = shutil.which("dlm-align") or str(__import__("pathlib").Path(sys.executable).parent / "dlm-align")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "run" in out.stdout and "validate" in out.stdout and "examples:" in out.stdout

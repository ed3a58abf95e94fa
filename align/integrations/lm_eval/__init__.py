"""lm-evaluation-harness model ``dlm-align`` (the ``[eval]`` extra: ``pip install 'dlm-align[eval]'``).

lm-eval 0.4 finds models only in its own registry (it loads no plug-ins), so the model is registered by
:func:`register` and the harness is run through this package, which hands every argument to lm-eval's CLI
unchanged::

    python -m align.integrations.lm_eval --model dlm-align \\
        --model_args pretrained=builtin:quickstart-base,gen_length=32,steps=32,mc_num=32 \\
        --tasks my_task --include_path tasks/ --device cpu

From Python, call :func:`register` before ``lm_eval.simple_evaluate(model="dlm-align", ...)``, or pass a
:class:`~align.integrations.lm_eval.model.DLMAlignLM` instance as ``model``. The settings are
:class:`~align.integrations.lm_eval.settings.HarnessModelArgs`; see ``docs/evaluation.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

#: The name given to lm-eval's ``--model``.
MODEL_NAME = "dlm-align"

__all__ = ["MODEL_NAME", "main", "register"]


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError("the dlm-align model for lm-evaluation-harness needs lm-eval: "
                          "pip install 'dlm-align[eval]'") from err


def register() -> type:
    """Register :class:`~align.integrations.lm_eval.model.DLMAlignLM` in lm-eval as ``dlm-align`` (idempotent);
    returns the class."""
    _require_lm_eval()
    # the harness's own models first: lm-eval fills its registry with them only while the registry is empty
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    from align.integrations.lm_eval.model import DLMAlignLM

    model_registry.register(MODEL_NAME)(DLMAlignLM)
    return DLMAlignLM


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line with ``dlm-align`` registered; ``argv`` are lm-eval's own arguments."""
    register()
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def __getattr__(name: str) -> Any:
    if name in ("DLMAlignLM", "HarnessModelArgs"):
        if name == "DLMAlignLM":
            return register()
        from align.integrations.lm_eval.settings import HarnessModelArgs

        return HarnessModelArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Bridges to other tools; each one is imported only by those who use it, so the core package never needs them.

* :mod:`align.integrations.lm_eval` — a model for lm-evaluation-harness (the ``[eval]`` extra):
  ``python -m align.integrations.lm_eval --model dlm-align --model_args pretrained=...``.
"""

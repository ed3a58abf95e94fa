"""Kernels of dlm-align (``align.kernels``), each with a torch twin and one dispatching entry point.

- :mod:`align.kernels.sampling_step`: fused denoising sampling step (chosen token + confidence in one
  pass over the vocabulary); entry point :func:`align.kernels.sampling_step.sample_step`.
- :mod:`align.kernels.logprob`: selective log-softmax at gathered positions (likelihood estimators).

Submodules are imported on demand so that ``import align.kernels`` does not import triton.
"""

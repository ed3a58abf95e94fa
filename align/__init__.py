"""dlm-align: alignment toolkit for masked diffusion language models.

Importing ``align`` registers the native LLaDA architecture with transformers' Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForMaskedLM``), so ``AutoModelForMaskedLM.from_pretrained`` opens
a LLaDA checkpoint in any process that has imported the package.
"""

__version__ = "0.1.0"

from align import models as models  # registers the Auto classes

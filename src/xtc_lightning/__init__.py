"""xtc-lightning: XTC extreme compression of BERT-style encoders on Lightning + Hydra.

Importing the package registers the ``xtc`` quantization method with transformers
(``export/hf_packed.py``), so ``from_pretrained`` loads exported folders with packed weights.
"""

__version__ = "0.1.0"

from xtc_lightning.export import hf_packed as _hf_packed  # noqa: E402,F401 (registers quant_method "xtc")

"""Quantization library: XTC's binary / ternary / k-bit weights and 8/4-bit activations.

    config.py      QuantConfig (``cfg.quant``), WeightSpec, ActivationSpec: validation
    quantizers.py  pure quantizers with straight-through gradients; weight codes + dequantize
    layers.py      QuantLinear / QuantEmbedding, drop-in replacements keeping parameter names
    int8.py        the integer GEMM of a quantized linear (int8 codes x codes + rescale), shared
                   by training and the CPU runtime
    apply.py       finding the target modules of an HF encoder, swapping them in, the on/off switch
    summary.py     what is quantized, and parameters per bit-width

Typical use::

    cfg = QuantConfig.from_dict(cfg.quant)
    apply_quantization(student, cfg)
    log.info(quantization_summary(student).text)
    # each training step:
    set_quantization_enabled(student, cfg.active_at(global_step))
"""

from xtc_lightning.quant.apply import (
    QuantTarget,
    apply_quantization,
    clip_latent_weights,
    find_quant_targets,
    latent_weights,
    pull_latent_weights,
    set_quantization_enabled,
    set_weight_form,
)
from xtc_lightning.quant.config import ActivationSpec, QuantConfig, WeightSpec
from xtc_lightning.quant.layers import QuantEmbedding, QuantLinear
from xtc_lightning.quant.quantizers import (
    WeightCodes,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    weight_codes,
)
from xtc_lightning.quant.summary import QuantSummary, quantization_summary

__all__ = [
    "ActivationSpec",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSummary",
    "QuantTarget",
    "WeightCodes",
    "WeightSpec",
    "apply_quantization",
    "clip_latent_weights",
    "dequantize_weight",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "find_quant_targets",
    "latent_weights",
    "pull_latent_weights",
    "quantization_summary",
    "set_quantization_enabled",
    "set_weight_form",
    "weight_codes",
]

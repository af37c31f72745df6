"""Quantized layers restored from a packed file: the stored codes are used as they are.

``PackedLinear`` / ``PackedEmbedding`` subclass ``QuantLinear`` / ``QuantEmbedding`` (so
``quantization_summary`` and ``set_quantization_enabled`` see them) but their weight is
already the dequantized weight ``dequantize_weight(codes)``: the forward does **not**
quantize it again. Re-quantizing is not a no-op in floating point: the per-group scale
``mean(|w|)`` (binary, ternary) or ``range / (2^k - 1)`` (asymmetric) of a dequantized
group is off by an ulp in about half the groups when scales are fp32 (the sum of ``n``
copies of ``s`` is not exactly ``n*s``), so re-quantizing would not reproduce the
original model bit for bit. Activations are quantized exactly as in ``QuantLinear``
(same static-range buffer, same dynamic per-token quantizer).

``quant_enabled = False`` turns the activation quantization off; the weight stays the
dequantized one. These layers are for inference: training them would move the latent
weights away from the codes they were loaded from (``codes`` keeps those for re-export).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xtc_lightning.quant import ActivationSpec, QuantEmbedding, QuantLinear, WeightCodes, WeightSpec
from xtc_lightning.quant.quantizers import fake_quantize_activation


class PackedLinear(QuantLinear):
    """A ``QuantLinear`` whose weight holds its dequantized codes (``codes``; None if the weight is unquantized)."""

    def __init__(
        self, linear: nn.Linear, weight: WeightSpec, activation: ActivationSpec, codes: WeightCodes | None
    ):
        super().__init__(linear, weight, activation)
        self.codes = codes

    def forward(self, x: Tensor) -> Tensor:
        if self.has_static_range and self.training:
            self._observe(x)
        if self.quant_enabled:
            static = self._static_range(x) if self.has_static_range else None
            x = fake_quantize_activation(x, self.activation_spec, static)
        return F.linear(x, self.weight, self.bias)


class PackedEmbedding(QuantEmbedding):
    """A ``QuantEmbedding`` whose table holds its dequantized codes: a plain lookup."""

    def __init__(self, embedding: nn.Embedding, weight: WeightSpec, codes: WeightCodes):
        super().__init__(embedding, weight)
        self.codes = codes

    def forward(self, input: Tensor) -> Tensor:
        return self._lookup(input, self.weight)

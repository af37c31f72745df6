"""Quantized drop-in replacements for ``nn.Linear`` and ``nn.Embedding``.

They subclass the torch modules and reuse the very same Parameter objects, so the
parameter names (``...query.weight``, ``...query.bias``, ``...word_embeddings.weight``)
and the optimizer's view of them do not change: the latent full-precision weights
are trained, the forward uses their fake-quantized values.

The only extra state-dict entry is ``<linear>.act_range`` (a ``[min, max]`` buffer) on
linears with a static activation range; without those entries the state dict loads into the
plain Hugging Face model with ``strict=True``.

``quant_enabled`` switches quantization off and on (the schedule,
``apply.set_quantization_enabled``). While it is off the forward is the plain full
precision one, but static ranges are still observed in training mode, so they are
calibrated when quantization starts.

``mix`` (default 1.0) is the quantized share of the forward weight: ``w + mix * (Q(w) - w)``
(``torch.lerp``), so the gradient to ``w`` stays the identity; the progressive recipe
(``recipe.py``) ramps it to 1. ``set_weight_spec`` changes the quantizer in place (the
ternary -> binary hand-off). ``scale_grad`` (default False) lets the gradient flow through a
binary or ternary weight's scale too (``quantizers.scale_gradient``). All three are training
state only: the state dict and the forward values are unchanged.

Training forwards of linears with integer-coded weights (binary, ternary, symmetric
k-bit, scales constant along rows) and dynamic symmetric inputs run through an int8 x int8
GEMM (``quant/int8.py``: the same codes and scales, summed exactly instead of in fp32;
the same straight-through gradients). Eval forwards always take the fp32 fake-quant path,
the reference the packed export reproduces bit for bit. ``int8_training = False`` on a
layer forces the fp32 path in training too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtc_lightning.quant.config import ActivationSpec, WeightSpec
from xtc_lightning.quant.int8 import int8_linear, int8_training_supported, int_mm_usable
from xtc_lightning.quant.quantizers import (
    activation_qrange,
    ema_update,
    fake_quantize_activation,
    fake_quantize_weight,
)

RANGE_BUFFER = "act_range"


class QuantLinear(nn.Linear):
    """``nn.Linear`` with a fake-quantized weight and input.

    Static activation range: in training mode each forward updates the EMA of the
    per-tensor [min, max] of the input (the first batch initialises it); in eval mode the
    stored range is frozen. Before any training batch was seen (e.g. Lightning's sanity
    validation) the range is NaN and the batch's own per-tensor range is used instead.
    """

    role: str | None = None  # its role (config.TARGETS, pooler) when apply_quantization made it

    def __init__(self, linear: nn.Linear, weight: WeightSpec, activation: ActivationSpec):
        # Build on the meta device, then take over the original Parameters.
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_spec = weight
        self.activation_spec = activation
        self.quant_enabled = True
        self.mix = 1.0
        self.scale_grad = False
        self.int8_training = int8_training_supported(weight, activation, linear.out_features)
        if activation.enabled and activation.range == "static":
            nan = torch.full((2,), float("nan"), device=linear.weight.device)
            self.register_buffer(RANGE_BUFFER, nan)

    def set_weight_spec(self, weight: WeightSpec) -> None:
        self.weight_spec = weight
        self.int8_training = int8_training_supported(weight, self.activation_spec, self.out_features)

    @property
    def has_static_range(self) -> bool:
        return hasattr(self, RANGE_BUFFER)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        current = torch.stack(_tensor_range(x)).to(self.act_range.dtype)
        self.act_range.copy_(ema_update(self.act_range, current, self.activation_spec.ema_momentum))

    def _static_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = self.act_range
        if torch.isnan(r).any():  # never calibrated (eval before training): this batch's range
            return _tensor_range(x)
        return r[0], r[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.has_static_range and self.training:
            self._observe(x)
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        if self.training and self.int8_training and self.mix == 1.0 and int_mm_usable(x, self.weight):
            qmax = activation_qrange(self.activation_spec)[1]
            return int8_linear(x, self.weight, self.bias, self.weight_spec, qmax, self.scale_grad)
        w = _mixed(
            self.weight, fake_quantize_weight(self.weight, self.weight_spec, self.scale_grad), self.mix
        )
        static = self._static_range(x) if self.has_static_range else None
        x = fake_quantize_activation(x, self.activation_spec, static)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight={self.weight_spec.describe()}, "
            f"activation={self.activation_spec.describe()}, enabled={self.quant_enabled}"
        )


def _mixed(w: Tensor, w_q: Tensor, mix: float) -> Tensor:
    """``w + mix * (w_q - w)``: exactly ``w_q`` at ``mix == 1``."""
    return w_q if mix == 1.0 else torch.lerp(w, w_q, mix)


def _tensor_range(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach()
    return x.amin(), x.amax()  # two plain reductions: faster than torch.aminmax on CPU


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with fake-quantized rows (weights only; the input is indices).

    With ``groups="row"`` only the looked-up rows are quantized: per-row quantization
    commutes with the lookup, so this equals looking up in the quantized table while
    touching B*T rows instead of the whole vocabulary each step.
    """

    role: str | None = None  # word_embeddings when apply_quantization made it

    def __init__(self, embedding: nn.Embedding, weight: WeightSpec):
        super().__init__(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            device="meta",
        )
        self.weight = embedding.weight
        self.weight_spec = weight
        self.quant_enabled = True
        self.mix = 1.0
        self.scale_grad = False

    def set_weight_spec(self, weight: WeightSpec) -> None:
        self.weight_spec = weight

    def _lookup(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(
            input,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def forward(self, input: Tensor) -> Tensor:
        if not (self.quant_enabled and self.weight_spec.enabled):
            return self._lookup(input, self.weight)
        if self.weight_spec.groups == "row":
            rows = self._lookup(input, self.weight)
            flat = rows.reshape(-1, self.embedding_dim)
            w_q = fake_quantize_weight(flat, self.weight_spec, self.scale_grad)
            return _mixed(flat, w_q, self.mix).reshape(rows.shape)
        w = _mixed(
            self.weight, fake_quantize_weight(self.weight, self.weight_spec, self.scale_grad), self.mix
        )
        return self._lookup(input, w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight_spec.describe()}, enabled={self.quant_enabled}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)

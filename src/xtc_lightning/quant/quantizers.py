"""Weight and activation quantizers: pure functions with straight-through gradients.

Weights (one ``WeightSpec``)
    Every method is integer **codes + a per-group scale (+ an integer zero point)**::

        binary      codes in {-1, +1}          w_q = code * mean(|w|)          (BWN)
        ternary     codes in {-1, 0, +1}       w_q = code * alpha              (TWN)
                    delta = 0.7 * mean(|w|); code = sign(w) where |w| > delta, else 0;
                    alpha = mean(|w|) over the entries with |w| > delta
        symmetric   codes in [-Q, Q], Q = 2^(k-1) - 1,  scale = max|w| / Q,   w_q = code * scale
        asymmetric  codes in [0, 2^k - 1],  range [min(w, 0), max(w, 0)],
                    scale = range / (2^k - 1),  zp = round(-min / scale),  w_q = (code - zp) * scale

    Exact zeros: binary maps them to +scale, so exactly two values exist per group and one
    bit per weight suffices. A group with nothing above the ternary threshold (only an
    all-zero group) gets alpha = 0. An all-zero group has scale 0 in the uniform methods
    (codes 0, zero point 0): never NaN.

    ``fake_quantize_weight(w) == dequantize_weight(weight_codes(w))`` bit for bit: both
    go through the same float codes (``float_weight_codes``), so a packed export rebuilt from
    the codes reproduces the training-time forward exactly.

Granularity (``WeightSpec.groups``)
    "tensor" one scale; "row" one scale per first-dimension row (a Linear's output row,
    an Embedding's token row); N: N contiguous groups of the row-major flattened weight
    (N must divide numel; N = out_features is the same as "row").

Activations (one ``ActivationSpec``)
    symmetric:  scale = max|x| / Q,  Q = 2^(k-1) - 1,  x_q = clamp(round(x / scale), -Q, Q) * scale
    asymmetric: range [min(x, 0), max(x, 0)] (zero stays exact), codes in [0, 2^k - 1]
    ``dynamic`` computes the range per token (each row of the last dimension) on the fly;
    ``static`` uses a given per-tensor (min, max), the EMA kept by the layer.

Gradients (STE, as ``torch.autograd.Function``: no graph is built through the rounding)
    Weights: identity to the latent full-precision weight.
    Dynamic activations: identity (the range covers every value: nothing is clipped).
    Static activations: identity inside the clipping range, zero outside it (values the
    frozen range clips get no gradient, as in PyTorch's fake quantization).
    Scales and zero points get no gradient, except a binary or ternary scale with
    ``scale_grad`` (``scale_gradient``: the recipe's ``scale_gradient`` lever).

Rounding is ``torch.round`` (half to even). Scales and codes are computed in the
dtype of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xtc_lightning.errors import UserError
from xtc_lightning.quant.config import LOW_BIT_METHODS, ActivationSpec, WeightSpec

TERNARY_THRESHOLD = 0.7


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight: ``dequantize_weight`` rebuilds the fake-quantized tensor exactly.

    codes       integer codes, same shape as the weight: int8 for binary / ternary /
                symmetric, uint8 for asymmetric
    scale       one scale per group, shape (num_groups,), the weight's dtype
    zero_point  uint8 per group (asymmetric) or None
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None
    method: str
    bits: int
    num_groups: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def num_groups(shape: torch.Size | tuple[int, ...], groups: str | int, what: str = "weight") -> int:
    """Number of quantization groups of a tensor of ``shape``; raises UserError if N does not divide it."""
    numel = math.prod(shape)
    if groups == "tensor":
        return 1
    if groups == "row":
        return shape[0]
    if numel % groups:
        raise UserError(
            f"quant.weight.groups={groups} does not divide the {numel} elements of {what} "
            f"{tuple(shape)}: use tensor, row or a divisor of {numel}"
        )
    return groups


def float_weight_codes(w: Tensor, spec: WeightSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer-valued float codes ``(G, n)``, scale ``(G, 1)``, zero point ``(G, 1)`` or None."""
    wg = w.detach().reshape(num_groups(w.shape, spec.groups), -1)
    if spec.method == "binary":
        scale = wg.abs().mean(dim=1, keepdim=True)
        # +1 for w >= 0 (adding +0.0 turns -0.0 into +0.0), -1 below. Elementwise arithmetic,
        # not torch.where / comparisons, which are several times slower on CPU.
        one = torch.ones((), dtype=wg.dtype, device=wg.device)
        return torch.copysign(one, wg + 0.0), scale, None
    if spec.method == "ternary":
        a = wg.abs()
        delta = TERNARY_THRESHOLD * a.mean(dim=1, keepdim=True)
        above = (a - delta).sign_().clamp_(min=0)  # 1.0 where |w| > delta, else 0.0
        count = above.sum(dim=1, keepdim=True).clamp_(min=1)  # all-zero group: alpha = 0 / 1
        alpha = a.mul_(above).sum(dim=1, keepdim=True) / count
        return torch.sign(wg).mul_(above).add_(0.0), alpha, None  # + 0.0: no -0.0 codes
    if spec.method == "symmetric":
        qmax = 2 ** (spec.bits - 1) - 1
        scale = wg.abs().amax(dim=1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, 1)
        return torch.round(wg / safe).clamp_(-qmax, qmax).add_(0.0), scale, None  # + 0.0: no -0.0 codes
    if spec.method == "asymmetric":
        qmax = 2**spec.bits - 1
        lo = wg.amin(dim=1, keepdim=True).clamp_max(0)
        hi = wg.amax(dim=1, keepdim=True).clamp_min(0)
        scale = (hi - lo) / qmax
        safe = torch.where(scale > 0, scale, 1)
        zero_point = torch.round(-lo / safe).clamp_(0, qmax)
        return (torch.round(wg / safe) + zero_point).clamp_(0, qmax), scale, zero_point
    raise ValueError(f"no weight quantizer for method {spec.method!r}")


def _dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    if zero_point is None:
        return codes * scale
    return (codes - zero_point) * scale


def weight_codes(w: Tensor, spec: WeightSpec) -> WeightCodes:
    """Integer codes and per-group scale (+ zero point) of ``w`` (no gradient)."""
    with torch.no_grad():
        codes, scale, zero_point = float_weight_codes(w, spec)
    int_dtype = torch.uint8 if spec.method == "asymmetric" else torch.int8
    return WeightCodes(
        codes=codes.to(int_dtype).reshape(w.shape),
        scale=scale.reshape(-1),
        zero_point=None if zero_point is None else zero_point.to(torch.uint8).reshape(-1),
        method=spec.method,
        bits=spec.bits,
        num_groups=scale.shape[0],
    )


def dequantize_weight(wc: WeightCodes) -> Tensor:
    """The fake-quantized weight rebuilt from its codes (equals ``fake_quantize_weight`` exactly)."""
    codes = wc.codes.reshape(wc.num_groups, -1).to(wc.scale.dtype)
    zero_point = None if wc.zero_point is None else wc.zero_point.to(wc.scale.dtype).unsqueeze(1)
    return _dequantize(codes, wc.scale.unsqueeze(1), zero_point).reshape(wc.codes.shape)


def scale_gradient(codes: Tensor, grad: Tensor, num_groups: int) -> Tensor:
    """The part of ``dL/dw`` that flows through a binary or ternary group's scale.

    Both scales are the mean ``|w|`` over the group's nonzero codes (binary: all ``n``; ternary:
    the ``c`` entries above the threshold, the set held fixed), so ``d scale / d w_i =
    code_i / c`` and, with ``grad = dL/dw_q`` and ``w_q = code * scale``::

        term_i = code_i / c * sum_j grad_j * code_j        (c = max(1, nonzero codes))

    ``codes`` and ``grad`` have the weight's shape; the term has it too.
    """
    cg = codes.reshape(num_groups, -1).to(grad.dtype)
    gg = grad.reshape(num_groups, -1)
    count = cg.ne(0).sum(dim=1, keepdim=True).clamp_(min=1)
    return (cg * ((gg * cg).sum(dim=1, keepdim=True) / count)).reshape(grad.shape)


class _WeightSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, spec: WeightSpec, with_scale: bool) -> Tensor:
        codes, scale, zero_point = float_weight_codes(w, spec)
        if with_scale:
            ctx.save_for_backward(codes)
        ctx.with_scale, ctx.num_groups = with_scale, scale.shape[0]
        return _dequantize(codes, scale, zero_point).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.with_scale:
            return grad, None, None
        (codes,) = ctx.saved_tensors
        return grad + scale_gradient(codes, grad, ctx.num_groups), None, None


def fake_quantize_weight(w: Tensor, spec: WeightSpec, scale_grad: bool = False) -> Tensor:
    """Quantize-dequantize ``w``. The gradient passes to ``w`` unchanged (STE); with
    ``scale_grad`` (binary and ternary only) it also flows through the scale
    (``scale_gradient``), which then moves with the loss instead of only with ``mean|w|``."""
    if not spec.enabled:
        return w
    return _WeightSTE.apply(w, spec, scale_grad and spec.method in LOW_BIT_METHODS)


# ----------------------------------------------------------------------- activations


def activation_qrange(spec: ActivationSpec) -> tuple[int, int]:
    """Integer code range: symmetric [-(2^(k-1)-1), 2^(k-1)-1], asymmetric [0, 2^k-1]."""
    if spec.method == "symmetric":
        q = 2 ** (spec.bits - 1) - 1
        return -q, q
    return 0, 2**spec.bits - 1


def activation_qparams(lo: Tensor, hi: Tensor, spec: ActivationSpec) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point (None when symmetric) for the range [lo, hi] (any matching shape)."""
    qmin, qmax = activation_qrange(spec)
    if spec.method == "symmetric":
        scale = torch.maximum(-lo, hi) / qmax
        return torch.where(scale > 0, scale, 1), None
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, 1)
    return scale, torch.round(-lo / scale).clamp_(qmin, qmax)


class _DynamicActivationSTE(torch.autograd.Function):
    """Per-token range: nothing is clipped, so the gradient is the identity."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: ActivationSpec) -> Tensor:
        qmin, qmax = activation_qrange(spec)
        if spec.method == "symmetric":
            # max|x| from two read-only reductions (no |x| temporary); |x| / (max|x| / Q) <= Q
            # up to rounding error (< Q + 0.5), so no clamp is needed.
            absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
            scale = absmax.div_(qmax)
            scale = torch.where(scale > 0, scale, 1)
            return torch.div(x, scale).round_().mul_(scale)
        scale, zero_point = activation_qparams(
            x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), spec
        )
        return torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _StaticActivationSTE(torch.autograd.Function):
    """Fixed per-tensor range: identity gradient inside it, zero where values are clipped."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
        q = torch.div(x, scale).round_()
        if zero_point is not None:
            q.add_(zero_point)
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        q.clamp_(qmin, qmax)
        if zero_point is not None:
            q.sub_(zero_point)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_activation(
    x: Tensor, spec: ActivationSpec, static_range: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Quantize-dequantize an activation (STE). ``static_range=(lo, hi)`` is required for static."""
    if not spec.enabled:
        return x
    if spec.range == "dynamic":
        return _DynamicActivationSTE.apply(x, spec)
    if static_range is None:
        raise ValueError("static activation quantization needs static_range=(lo, hi)")
    lo, hi = (t.to(x.dtype) for t in static_range)
    scale, zero_point = activation_qparams(lo, hi, spec)
    return _StaticActivationSTE.apply(x, scale, zero_point, *activation_qrange(spec))


def ema_update(running: Tensor, current: Tensor, momentum: float) -> Tensor:
    """``momentum * running + (1 - momentum) * current``; a NaN (never observed) running value takes ``current``."""
    return torch.where(torch.isnan(running), current, momentum * running + (1 - momentum) * current)

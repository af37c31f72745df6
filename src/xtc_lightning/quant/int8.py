"""Integer GEMM for quantized linears: training (``int8_linear``) and the CPU runtime share it.

When a linear's weight scale is constant along each output row (groups "tensor", "row",
or N groups with N dividing ``out_features``) and its input is quantized symmetrically
per token, the fake-quant forward is, exactly::

    y[t, o] = a_scale[t] * w_scale[o] * sum_i a_code[t, i] * w_code[o, i] + b[o]

The sum is exact (``integer_gemm``), then the two scales and the bias are applied in fp32. It
runs as ``torch._int_mm`` (int8 x int8 -> int32; |sum| <= K * 127 * 127 fits int32 for any BERT
width) where that is the faster GEMM: with VNNI or AMX, oneDNN's int8 kernel is ~4.5x faster
than the fp32 GEMM. On a CPU without them (AVX2 only, e.g. AMD EPYC before Zen 4) ``_int_mm``
is ~25x *slower* than fp32 (384 x 1536, 4096 rows, 1 thread: 2.6 s against 0.11 s), so there
the same integer codes are multiplied by a float GEMM, which is exact too: every product and
partial sum is an integer below 2**24 (fp32; fp64 past that bound), whatever the summation
order. Both routes give the same sums, so the route changes the speed, never a value. The
activation codes are those of ``fake_quantize_activation`` (same absmax, same ``div`` +
``round``); the only difference to the fake-quant forward is fp32 rounding: this one sums
exactly and rounds twice.

``int8_linear`` is the training op: forward through the integer GEMM, backward the
straight-through gradients of the fake-quant layer computed from the saved int8 codes
(``grad_x = grad_y @ w_q``, ``grad_w = grad_y^T @ x_q``, with ``w_q``, ``x_q`` the very
values the fake-quant path multiplies), so the backward pass is unchanged and the saved
input takes 1 byte per element instead of 4.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from xtc_lightning.quant.config import LOW_BIT_METHODS, ActivationSpec, WeightSpec
from xtc_lightning.quant.quantizers import float_weight_codes, scale_gradient

INT8_MAX = 127
# Weight methods whose codes are signed integers within int8 (symmetric: |code| <= 2^(k-1) - 1).
INT8_WEIGHT_METHODS = ("binary", "ternary", "symmetric")
# fp32 holds every integer up to 2**24 exactly, fp64 up to 2**53.
FP32_EXACT = 2**24


def quantize_per_token(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """int8 codes and per-row scale of ``x (M, K)``: the float ops of the dynamic fake quantizer.

    ``max|x|`` is one ``inf``-norm pass (equal to ``max(amax, -amin)`` exactly); the codes
    are ``round(x / scale)`` with the same ``div``, so they equal the fake quantizer's.
    |x| / (max|x| / Q) <= Q up to rounding (< Q + 0.5): no clamp is needed.
    """
    scale = token_scale(torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True), qmax)
    return torch.div(x, scale).round_().to(torch.int8), scale


def token_scale(amax: Tensor, qmax: int) -> Tensor:
    """The per-token scale of rows whose ``max|x|`` is ``amax``: ``amax / qmax``, 1 for an all-zero row."""
    scale = amax / qmax
    return torch.where(scale > 0, scale, 1)


def rescale(acc: Tensor, w_scale: Tensor, a_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``acc * w_scale[col] * a_scale[row] + bias[col]`` in fp32 (int32 ``acc``)."""
    y = torch.mul(acc, w_scale)  # int32 * fp32 -> fp32
    if bias is None:
        return y.mul_(a_scale)
    return torch.addcmul(bias, y, a_scale)


def int8_training_supported(weight: WeightSpec, activation: ActivationSpec, out_features: int) -> bool:
    """True if a ``QuantLinear`` with these specs can train through ``int8_linear``."""
    groups_ok = weight.groups in ("tensor", "row") or out_features % int(weight.groups) == 0
    return (
        weight.method in INT8_WEIGHT_METHODS
        and weight.bits <= 8
        and groups_ok
        and activation.method == "symmetric"
        and activation.range == "dynamic"
        and activation.bits <= 8
    )


def int_mm_usable(x: Tensor, weight: Tensor) -> bool:
    """``torch._int_mm`` runs these shapes and dtypes here (fp32 outside autocast; CUDA: its tile rules)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device != weight.device:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if x.device.type == "cpu":
        return True
    m = x.numel() // x.shape[-1]
    return x.device.type == "cuda" and m > 16 and weight.shape[0] % 8 == 0 and weight.shape[1] % 8 == 0


@functools.cache
def int_mm_faster(device_type: str) -> bool:
    """Whether ``torch._int_mm`` beats an fp32 GEMM over the same codes on this device (once per
    process): on CUDA always (int8 tensor cores); on CPU measured on one BERT-sized GEMM, 256 rows
    of 384 -> 384, best of 3, since torch exposes no VNNI / AMX flag. Only the speed depends on it."""
    if device_type != "cpu":
        return True
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (256, 384), generator=g, dtype=torch.int8)
    w = torch.randint(-1, 2, (384, 384), generator=g, dtype=torch.int8)
    xf, wf = x.float(), w.float()

    def best(gemm) -> float:
        gemm()  # the first call may set up kernels
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gemm()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        return best(lambda: torch._int_mm(x, w.t())) < best(lambda: xf @ wf.t())


def integer_gemm(x_codes: Tensor, w_codes: Tensor, bound: int, int_mm: bool | None = None) -> Tensor:
    """``torch._int_mm(x_codes, w_codes.t())``: the exact int32 sums of int8 ``x_codes (M, K)`` times
    int8 ``w_codes (N, K)``, from ``_int_mm`` or from a float GEMM over the same codes (fp32 when
    ``bound``, the largest possible |sum|, is at most 2**24, else fp64), whichever is faster here.
    ``int_mm``: that route (None: the faster, ``int_mm_faster``; torch.export needs ``_int_mm``)."""
    if int_mm is None:
        int_mm = int_mm_faster(x_codes.device.type)
    if int_mm:
        return torch._int_mm(x_codes, w_codes.t())
    dtype = torch.float32 if bound <= FP32_EXACT else torch.float64
    return torch.mm(x_codes.to(dtype), w_codes.to(dtype).t()).to(torch.int32)


def weight_code_max(method: str, bits: int) -> int:
    """The largest |code| of a weight quantizer's int8 codes: 1 for binary and ternary, 2^(k-1) - 1
    for symmetric k bits, 2^k - 1 for asymmetric ones minus their zero point (at most 128: int8)."""
    if method in ("binary", "ternary"):
        return 1
    return min(2 ** (bits - 1) - 1 if method == "symmetric" else 2**bits - 1, 128)


class _Int8LinearSTE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, spec: WeightSpec, qmax: int, scale_grad: bool
    ) -> Tensor:
        out_features, in_features = weight.shape
        codes, scale, _ = float_weight_codes(weight, spec)  # (G, n) codes, (G, 1) scale
        ctx.scale_groups = scale.shape[0] if scale_grad and spec.method in LOW_BIT_METHODS else 0
        w_codes = codes.reshape(out_features, in_features).to(torch.int8)
        w_scale = scale.reshape(-1).repeat_interleave(out_features // scale.shape[0])
        x_codes, a_scale = quantize_per_token(x.detach().reshape(-1, in_features), qmax)
        y = rescale(
            integer_gemm(x_codes, w_codes, in_features * qmax * weight_code_max(spec.method, spec.bits)),
            w_scale,
            a_scale,
            bias,
        )
        ctx.save_for_backward(x_codes, a_scale, w_codes, w_scale)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_codes, a_scale, w_codes, w_scale = ctx.saved_tensors
        g = grad.reshape(-1, w_codes.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_q = w_codes.to(g.dtype).mul_(w_scale.unsqueeze(1))  # = the fake-quantized weight
            grad_x = (g @ w_q).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x_codes.to(g.dtype).mul_(a_scale)  # x_q = the fake-quantized input
            if ctx.scale_groups:
                grad_w += scale_gradient(w_codes, grad_w, ctx.scale_groups)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def int8_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, spec: WeightSpec, qmax: int, scale_grad: bool = False
) -> Tensor:
    """The fake-quant linear (``spec`` weights, symmetric per-token ``qmax`` inputs) through the integer GEMM.

    Straight-through gradients to ``x`` and to the latent ``weight``, as the fake-quant layer
    (with ``scale_grad``, also through a binary or ternary weight's scale).
    """
    return _Int8LinearSTE.apply(x, weight, bias, spec, qmax, scale_grad)

"""The integer linear: int8 activations x low-bit weight codes through an int8 GEMM, and its epilogues.

For a quantized linear whose weight scale is constant along each output row (groups
"tensor", "row", or N groups with N dividing ``out_features``: every group is whole
rows) and whose input is quantized symmetrically (dynamic per token, or a calibrated
static per-tensor range), ``Int8Linear`` computes the fake-quant forward as an int8 x int8
-> int32 GEMM plus an fp32 rescale (``quant/int8.py``, shared with training): the
integer codes are identical to the fake-quant model's, the only difference is fp32
rounding. Weight codes: binary {-1, +1}, ternary {-1, 0, 1}, symmetric k-bit, and
asymmetric k <= 7 bits (``code - zero_point`` still fits int8) are all stored as one
int8 matrix built once at load (or bit-packed, ``Int8Linear.compact``).

The GEMM runs on oneDNN's prepacked weight with the per-row scale in its epilogue
(``onednn_gemm``) where this torch build has it and it is exact for the layer's weight codes,
else as ``integer_gemm`` (``torch._int_mm``, or the same exact sums from a float GEMM where that
is faster: CPUs without VNNI / AMX). On such an AVX2-only CPU oneDNN's int8 kernel adds pairs of
products in int16 with saturation (``vpmaddubsw``): exact for codes up to |64| (binary, ternary,
4 bits), not for 8-bit weights, so ``_can_prepack`` checks the layer's code range. What follows it
runs in one compiled epilogue (inductor, ``kernels.py``) (``epilogue``): the per-token scale and bias, and
the exact GELU (``fold_gelu``) or the residual add and LayerNorm of HF's output blocks
(``Int8ResidualNorm``, ``fold_residual_norm``). Where that output is the input of the next int8
linear, the same kernel also computes that linear's int8 codes (``epilogue_codes``,
``fold_quantize``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtc_lightning.inference.bitrows import SIGNED_METHODS, pack_rows, unpack_rows
from xtc_lightning.inference.kernels import Precompiled
from xtc_lightning.quant import QuantLinear, WeightCodes, weight_codes
from xtc_lightning.quant.int8 import INT8_MAX, integer_gemm, quantize_per_token, token_scale, weight_code_max
from xtc_lightning.quant.quantizers import activation_qparams, activation_qrange

if TYPE_CHECKING:
    from xtc_lightning.inference.qkv import FusedSiblings


def int8_weight(wc: WeightCodes, out_features: int) -> tuple[Tensor, Tensor] | None:
    """``(codes int8 (out, in), per-row scale fp32 (out,))`` of a weight, or None if unsupported."""
    g = wc.num_groups
    if wc.codes.dim() != 2 or g <= 0 or out_features % g:
        return None  # a group would split a row
    rows_per_group = out_features // g
    codes = wc.codes.to(torch.int16)
    if wc.zero_point is not None:
        zp = wc.zero_point.to(torch.int16).repeat_interleave(rows_per_group).unsqueeze(1)
        codes = codes - zp
    if codes.numel() and (codes.abs().amax() > INT8_MAX):
        return None  # e.g. 8-bit asymmetric: code - zero point needs 9 bits
    scale = wc.scale.to(torch.float32).repeat_interleave(rows_per_group)
    return codes.to(torch.int8).contiguous(), scale.contiguous()


def quantize_static(x: Tensor, scale: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """int8 codes of ``x`` for a fixed per-tensor scale (clamped to [-Q, Q])."""
    return torch.div(x, scale).round_().clamp_(-qmax, qmax).to(torch.int8), scale


def epilogue(
    y: Tensor,
    w_scale: Tensor | None,
    a_scale: Tensor,
    bias: Tensor | None,
    gelu: bool = False,
    residual: Tensor | None = None,
    norm: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """The GEMM's fp32 output ``z = y * w_scale[col] * a_scale[row] + bias[col]``, then what followed it.

    ``y`` is the int32 sum (``w_scale`` given: the products of ``rescale``, in its order) or
    the fp32 ``sum * w_scale`` the oneDNN GEMM already computed (``w_scale`` None; the same
    fp32 product, bit for bit). ``gelu`` returns ``gelu(z)`` (exact erf GELU, ``fold_gelu``);
    ``residual`` (shaped as ``y``) and ``norm = (weight, bias, eps)`` return ``layer_norm(z + residual)`` over the
    last dimension (``Int8ResidualNorm``; tensors, not the module, so that one compiled kernel
    serves every layer).
    """
    if w_scale is not None:
        y = torch.mul(y, w_scale)  # int32 * fp32 -> fp32
    y = y * a_scale if bias is None else torch.addcmul(bias, y, a_scale)
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = y + residual
    if norm is not None:
        y = F.layer_norm(y, (y.shape[-1],), norm[0], norm[1], norm[2])
    return y


def epilogue_codes(
    y: Tensor,
    w_scale: Tensor | None,
    a_scale: Tensor,
    bias: Tensor | None,
    gelu: bool,
    residual: Tensor | None,
    norm: tuple[Tensor, Tensor, float] | None,
    qmax: int,
    keep: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``z = epilogue(...)`` and the per-token int8 codes of ``z`` for the next linear, in one pass.

    Returns ``(z if keep else None, codes, scale)``: exactly ``quantize_per_token(z, qmax)`` (the
    same ``max|z|``, ``div`` and ``round``; inductor keeps a true division on CPU, so the scale
    computed in the kernel is the eager one). The compiled kernel quantizes each row of ``z``
    while it is in cache instead of writing ``z`` and reading it back twice (``keep=False``: ``z``
    is never written to memory), and returns the scale itself: computing it from the row maxima
    afterwards took two eager ops per call (~5% of a batch-1 forward for the 8 handoffs).
    """
    z = epilogue(y, w_scale, a_scale, bias, gelu, residual, norm)
    scale = token_scale(torch.linalg.vector_norm(z, float("inf"), dim=-1, keepdim=True), qmax)
    codes = torch.div(z, scale).round_().to(torch.int8)
    return (z if keep else None), codes, scale


_COMPILED: dict[str, object] = {}

# The compiled functions, with inductor options. ``epilogue_codes``: realize ``z`` (the GELU's
# ~12 ops; by default inductor recomputes a pointwise result for each of its readers, here
# ``max|z|`` and the codes, i.e. the erf twice); realized inside one row loop, ``z`` becomes a
# one-row local buffer (measured on 4096 x 1536 GELU: 9.1 ms vs 11.6 ms epilogue + quantize).
_KERNELS = {
    "quantize": (quantize_per_token, {}),
    "epilogue": (epilogue, {}),
    "epilogue_codes": (epilogue_codes, {"realize_opcount_threshold": 10}),
}


def _compiled(name: str) -> Precompiled:
    """The inductor kernels of a ``_KERNELS`` function (``Precompiled``), built once per signature.

    The row count (tokens) of every 2-D tensor argument is dynamic, the feature widths are
    static: one kernel per layer width, with fixed-length vectorized inner loops (fully
    dynamic shapes made the GELU epilogue ~2x slower on 4096 x 1536). The kernels are called
    without dynamo (no guard checks per call: at batch 1 these calls were ~30% of the time).
    """
    fn = _COMPILED.get(name)
    if fn is None:
        function, options = _KERNELS[name]
        fn = _COMPILED[name] = Precompiled(function, options)
    return fn


_ONE = torch.ones(())


class Prepacked:
    """oneDNN's opaque prepacked weight. Read-only, so ``copy.deepcopy`` shares it (opaque
    tensors have no storage to copy)."""

    def __init__(self, weight: Tensor):
        self.weight = weight

    def __deepcopy__(self, memo) -> Prepacked:
        return self


def onednn_prepack(weight_int8: Tensor) -> Prepacked | None:
    """oneDNN's prepacked form of int8 codes ``(N, K)`` for ``onednn_gemm``, or None where that op is missing.

    The packed weight is reordered once for the CPU's int8 GEMM kernel (``torch._int_mm``
    reorders the plain matrix on every call). It is an opaque tensor (not a buffer: it is
    neither saved nor exported; ``weight_int8`` stays the model's weight).
    """
    op = getattr(torch.ops.onednn, "qlinear_prepack", None) if hasattr(torch.ops, "onednn") else None
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return Prepacked(op(weight_int8.contiguous(), None))
    except RuntimeError:  # an oneDNN build without int8 matmul on this CPU
        return None


def onednn_gemm(codes: Tensor, packed: Prepacked, w_scale: Tensor) -> Tensor:
    """``codes (M, K) int8 @ weight^T`` times ``w_scale[col]`` in fp32, in the GEMM's epilogue (oneDNN).

    The int32 sum is exact and the one fp32 product equals ``torch.mul(sum, w_scale)``
    (input scale 1, no zero points, no bias, no post-op).
    """
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, _ONE, None, packed.weight, w_scale, None, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _prepacked(packed):
    """The oneDNN prepacked weight to compute with, or None while torch.export / torch.compile
    traces (the prepacked tensor is opaque to tracing: the plain int8 codes and ``_int_mm`` then)."""
    return None if torch.compiler.is_compiling() else packed


class Handoff:
    """The int8 codes one linear's epilogue computed for the next linear's input (``fold_quantize``).

    The producer ``give``s the tensor it returns with its codes and scale for ``qmax``; the
    consumer ``take``s them for that very tensor object (``is``), once. A plain object, not a
    module: it links two modules without registering one inside the other.
    """

    def __init__(self, qmax: int):
        self.qmax = qmax
        self.slot: tuple[Tensor, Tensor, Tensor] | None = None

    def give(self, x: Tensor, codes: Tensor, scale: Tensor) -> None:
        self.slot = (x, codes, scale)

    def take(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(codes, scale)`` given for ``x``, or None; either way the slot is emptied."""
        slot, self.slot = self.slot, None
        return slot[1:] if slot is not None and slot[0] is x else None


class Int8Linear(nn.Module):
    """A quantized linear as an int8 x int8 -> int32 GEMM (same output as the fake-quant layer).

    ``weight_int8`` (out, in) holds the weight codes (minus zero point), ``weight_scale``
    (out,) the per-row scale; ``act_scale`` is None (dynamic per-token input scale) or a
    fixed per-tensor scale (calibrated static range).
    """

    def __init__(
        self,
        weight_int8: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        act_qmax: int,
        act_scale: Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("act_scale", act_scale)
        self.act_qmax = act_qmax
        self.code_max = 128  # the largest |weight code| (``weight_code_max``; unknown: int8's)
        self.compiled = False  # use the compiled (fused, ``Precompiled``) quantize / epilogue kernels
        self.gelu = False  # apply the exact GELU in the epilogue (``fold_gelu``)
        self.packed_weight: Prepacked | None = None  # oneDNN's prepacked weight_int8 (``onednn_prepack``)
        self.codes_spec: tuple[str, int] | None = None  # (method, bits) of codes that ``compact`` can pack
        self.siblings: FusedSiblings | None = None  # computed in one GEMM with its siblings
        self.columns = slice(None)  # this layer's output columns in the siblings' GEMM
        # ``fold_quantize``: our epilogue computes the next linear's input codes (feeds), or the
        # previous linear's epilogue computes ours (fed)
        self.feeds: Handoff | None = None
        self.fed: Handoff | None = None

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> Int8Linear | None:
        """The fast module for ``layer`` (a ``PackedLinear`` or a training ``QuantLinear``), or None."""
        a, w = layer.activation_spec, layer.weight_spec
        if not (layer.quant_enabled and w.enabled and a.enabled and a.method == "symmetric"):
            return None
        qmin, qmax = activation_qrange(a)
        if qmax > INT8_MAX:
            return None
        act_scale = None
        if a.range == "static":
            r = getattr(layer, "act_range", None)
            if r is None or torch.isnan(r).any():
                return None  # uncalibrated: the fake-quant layer uses each batch's own range
            act_scale, _ = activation_qparams(r[0].float(), r[1].float(), a)
            act_scale = act_scale.reshape(()).clone()
        codes = getattr(layer, "codes", None)
        if codes is None:  # a training QuantLinear: its codes are those of its fake-quantized weight
            codes = weight_codes(layer.weight.detach().float(), w)
        packed = int8_weight(codes, layer.out_features)
        if packed is None:
            return None
        new = cls(*packed, layer.bias, qmax, act_scale)
        new.code_max = weight_code_max(codes.method, codes.bits)
        if codes.zero_point is None and codes.method in SIGNED_METHODS:
            new.codes_spec = (codes.method, codes.bits)
        return new

    def compact(self) -> bool:
        """Keep the weight codes bit-packed (``weight_bits``, ``pack_rows``) instead of one int8 byte each.

        Without a prepacked oneDNN copy, every call then unpacks them (``codes``) for
        ``torch._int_mm``: less memory, some speed. Returns False (nothing changed) for codes ``pack_rows`` cannot restore as int8
        (asymmetric codes minus zero point) or a layer already compact.
        """
        if self.codes_spec is None or self.weight_int8 is None:
            return False
        self.register_buffer("weight_bits", pack_rows(self.weight_int8, *self.codes_spec))
        self.weight_int8 = None
        return True

    def codes(self) -> Tensor:
        """The int8 weight codes (N, K): ``weight_int8``, or unpacked from ``weight_bits`` (``compact``)."""
        if self.weight_int8 is not None:
            return self.weight_int8
        return unpack_rows(self.weight_bits, *self.codes_spec, self.in_features)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 codes ``(M, K)`` and scale ``(M, 1)`` or ``()``, as ``fake_quantize_activation`` computes them.

        If the previous linear's epilogue computed them for this very ``x`` (``fed``), they are used as given.
        """
        given = None if self.fed is None else self.fed.take(x)
        if given is not None:
            return given
        if x.dtype == torch.int8:
            raise RuntimeError(
                "int8 codes reached an Int8Linear without their scale (a handed-over output reused)"
            )
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.act_scale is None:
            fn = _compiled("quantize") if self._use_compiled() else quantize_per_token
            return fn(x2, self.act_qmax)
        return quantize_static(x2, self.act_scale, self.act_qmax)

    def matmul(
        self,
        x: Tensor,
        weight_int8: Tensor | None,
        weight_scale: Tensor,
        bias: Tensor | None,
        packed: Prepacked | None = None,
        residual: Tensor | None = None,
        norm: tuple[Tensor, Tensor, float] | None = None,
    ) -> Tensor:
        """Quantize ``x`` and multiply by int8 ``weight_int8`` (N, K): ``(..., N)`` in ``x``'s dtype.

        ``packed`` (oneDNN's prepacked codes; ``weight_int8`` is then unused and may be None)
        runs the GEMM with the per-row scale in its epilogue; otherwise ``torch._int_mm`` gives
        the int32 sums and the epilogue scales them. While torch.export traces, callers pass no
        ``packed`` (``_prepacked``): the prepacked tensor is opaque to it.
        ``residual`` / ``norm``: see ``epilogue``. With ``feeds`` set, the epilogue also computes
        the codes of the output for that linear (``epilogue_codes``) and hands them over; after a
        GELU, the output returned is then those int8 codes (the fp32 GELU output is never stored).
        """
        codes, a_scale = self.quantize_input(x)
        if packed is not None:
            y, w_scale = onednn_gemm(codes, packed, weight_scale), None
        else:  # (M, N) int32, exact; torch.export traces torch._int_mm
            bound = self.in_features * self.act_qmax * self.code_max
            y = integer_gemm(
                codes, weight_int8, bound, int_mm=True if torch.compiler.is_compiling() else None
            )
            w_scale = weight_scale
        if residual is not None:
            residual = residual.reshape(y.shape)
        shape = (*x.shape[:-1], weight_scale.shape[0])
        args = (y, w_scale, a_scale, bias, self.gelu, residual, norm)
        dtype = x.dtype if x.is_floating_point() else torch.float32  # int8: codes handed over for fp32
        handoff = self.feeds
        if handoff is None or not self._use_compiled() or dtype != torch.float32:
            fn = _compiled("epilogue") if self._use_compiled() else epilogue
            return fn(*args).to(dtype).reshape(shape)
        z, next_codes, scale = _compiled("epilogue_codes")(*args, handoff.qmax, not self.gelu)
        out = (next_codes if z is None else z).reshape(shape)
        handoff.give(out, next_codes, scale)
        return out

    def _use_compiled(self) -> bool:
        """The compiled kernels, except while torch.export / torch.compile traces the model (eager ops then)."""
        return self.compiled and not torch.compiler.is_compiling()

    def forward(self, x: Tensor) -> Tensor:
        if self.siblings is not None:
            return self.siblings.output(x)[..., self.columns]
        packed = _prepacked(self.packed_weight)
        codes = None if packed is not None else self.codes()
        return self.matmul(x, codes, self.weight_scale, self.bias, packed)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.act_scale is None else "static"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation=int{self.act_qmax.bit_length() + 1} {act}"
            + (", gelu" if self.gelu else "")
            + (", quantizes for the next linear" if self.feeds is not None else "")
            + (", onednn" if self.packed_weight is not None else "")
        )


# HF blocks whose forward is exactly ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``.
RESIDUAL_NORM_BLOCKS = ("BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput")


class Int8ResidualNorm(nn.Module):
    """An HF ``*SelfOutput`` / ``*Output`` block whose residual add and LayerNorm run in the int8 linear's epilogue.

    ``forward(hidden_states, input_tensor) = LayerNorm(dense(hidden_states) + input_tensor)``
    as the block it replaces computes it in eval mode (dropout is the identity); the
    submodules keep their names (``dense``, ``LayerNorm``), so state dict keys are unchanged.
    """

    def __init__(self, dense: Int8Linear, norm: nn.LayerNorm):
        super().__init__()
        self.dense, self.LayerNorm = dense, norm

    @staticmethod
    def supports(block: nn.Module) -> bool:
        dense = getattr(block, "dense", None)
        return (
            type(block).__name__ in RESIDUAL_NORM_BLOCKS
            and isinstance(dense, Int8Linear)
            and dense.siblings is None
            and not dense.gelu
            and type(getattr(block, "LayerNorm", None)) is nn.LayerNorm
            and block.LayerNorm.elementwise_affine
            and block.LayerNorm.bias is not None
            and len(block.LayerNorm.normalized_shape) == 1
            and isinstance(getattr(block, "dropout", None), nn.Dropout)
        )

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        d, ln = self.dense, self.LayerNorm
        norm = (ln.weight, ln.bias, ln.eps)
        packed = _prepacked(d.packed_weight)
        codes = None if packed is not None else d.codes()
        return d.matmul(hidden_states, codes, d.weight_scale, d.bias, packed, input_tensor, norm)


def fold_residual_norm(model: nn.Module) -> list[str]:
    """Swap each supported residual + LayerNorm block for an ``Int8ResidualNorm`` (in place); returns their names."""
    names = [n for n, m in model.named_modules() if n and Int8ResidualNorm.supports(m)]
    for name in names:
        block = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8ResidualNorm(block.dense, block.LayerNorm))
    return names


def fold_gelu(model: nn.Module) -> list[str]:
    """Move each exact GELU that directly follows an ``Int8Linear`` into that linear's epilogue (in place).

    Matches the HF intermediate block (``dense`` then ``intermediate_act_fn``, e.g.
    ``BertIntermediate``): when ``dense`` is an ``Int8Linear`` computed on its own (no
    siblings) and the activation is transformers' ``GELUActivation`` with the erf GELU
    (``nn.functional.gelu``), the linear applies it and the activation becomes
    ``nn.Identity``. Returns the names of the linears that took a GELU.
    """
    from transformers.activations import GELUActivation

    folded = []
    for name, module in model.named_modules():
        dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if (
            isinstance(dense, Int8Linear)
            and dense.siblings is None
            and not dense.gelu
            and type(act) is GELUActivation
            and act.act is F.gelu
        ):
            dense.gelu = True
            module.intermediate_act_fn = nn.Identity()
            folded.append(f"{name}.dense" if name else "dense")
    return folded


def _hands_off(producer: Int8Linear, consumer: object) -> bool:
    """True if ``producer``'s epilogue can compute ``consumer``'s input codes (both compiled, dynamic per-token input)."""
    return (
        isinstance(consumer, Int8Linear)
        and producer.compiled
        and consumer.compiled
        and producer.siblings is None
        and producer.feeds is None
        and consumer.fed is None
        and consumer.act_scale is None
        and consumer.in_features == producer.out_features
    )


def fold_quantize(model: nn.Module) -> list[str]:
    """Let each int8 epilogue whose output is the input of the next int8 linear compute that linear's codes (in place).

    Matches HF encoders (a ``layer`` list of layers with ``attention``, ``intermediate`` and
    ``output`` children, e.g. ``BertEncoder``), where three epilogues feed an int8 linear: the
    attention output block's residual + LayerNorm (``Int8ResidualNorm``) feeds the intermediate
    linear; the intermediate's GELU (``fold_gelu``) feeds the output block's linear, which reads
    nothing else of it (it gets the codes only); the output block's residual + LayerNorm feeds
    the next layer's query (and key and value: ``FusedSiblings``). A LayerNorm output is also the
    next residual, so it is still returned in fp32. Returns the names of the linears that
    quantize for the next one.
    """
    folded = []

    def link(name: str, producer: object, consumer: object) -> None:
        if isinstance(producer, Int8Linear) and _hands_off(producer, consumer):
            producer.feeds = consumer.fed = Handoff(consumer.act_qmax)
            folded.append(name)

    for name, encoder in model.named_modules():
        layers = getattr(encoder, "layer", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        for i, layer in enumerate(layers):
            prefix = f"{name}.layer.{i}" if name else f"layer.{i}"
            attention_output = getattr(getattr(layer, "attention", None), "output", None)
            dense = getattr(getattr(layer, "intermediate", None), "dense", None)
            output = getattr(layer, "output", None)
            if isinstance(attention_output, Int8ResidualNorm):
                link(f"{prefix}.attention.output.dense", attention_output.dense, dense)
            if not isinstance(output, Int8ResidualNorm):
                continue
            if isinstance(dense, Int8Linear) and dense.gelu:
                link(f"{prefix}.intermediate.dense", dense, output.dense)
            if i + 1 < len(layers):
                link(f"{prefix}.output.dense", output.dense, _query_gemm(layers[i + 1]))
    return folded


def _query_gemm(layer: nn.Module) -> Int8Linear | None:
    """The linear whose input quantizer reads a layer's input: its query, or the query's sibling group's lead."""
    query = getattr(getattr(getattr(layer, "attention", None), "self", None), "query", None)
    if not isinstance(query, Int8Linear):
        return None
    return query if query.siblings is None else query.siblings.lead


def _can_compile() -> bool:
    """True if inductor can build the fused kernels here (a C++ compiler exists and a tiny case compiles)."""
    if "ok" not in _COMPILED:
        try:
            with torch.inference_mode():
                x = torch.randn(3, 8)
                codes, scale = _compiled("quantize")(x, INT8_MAX)
                ok = torch.equal(codes, quantize_per_token(x, INT8_MAX)[0])
        except Exception:  # noqa: BLE001 - any compiler / inductor failure means: use eager ops
            ok = False
        _COMPILED["ok"] = ok
    return bool(_COMPILED["ok"])


def _can_prepack(code_max: int) -> bool:
    """True if ``onednn_gemm`` exists here and equals ``torch._int_mm`` times the row scale, bit for
    bit, for weight codes up to ``code_max`` in magnitude (probed with random codes and with every
    code at its extreme, where a kernel that adds product pairs in int16 saturates)."""
    key = f"prepack{code_max}"
    if key not in _COMPILED:
        ok = False
        g = torch.Generator().manual_seed(0)
        lo, hi = -min(code_max, 128), min(code_max, 127)  # int8
        w = torch.randint(lo, hi + 1, (24, 40), generator=g, dtype=torch.int8)
        codes = torch.randint(-127, 128, (6, 40), generator=g, dtype=torch.int8)
        w[0], w[1], codes[0], codes[1] = hi, lo, 127, -127
        scale = torch.rand(24, generator=g)
        packed = onednn_prepack(w)
        if packed is not None:
            try:
                with torch.inference_mode():
                    ok = torch.equal(onednn_gemm(codes, packed, scale), torch._int_mm(codes, w.t()) * scale)
            except RuntimeError:
                ok = False
        _COMPILED[key] = ok
    return bool(_COMPILED[key])

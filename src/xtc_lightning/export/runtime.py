"""Low-bit CPU inference: int8 activations x low-bit weight codes through an integer GEMM.

For a quantized linear whose weight scale is constant along each output row (groups
"tensor", "row", or N groups with N dividing ``out_features``: every group is whole
rows) and whose input is quantized symmetrically (dynamic per token, or a calibrated
static per-tensor range), ``Int8Linear`` computes the fake-quant forward as an int8 x int8
-> int32 GEMM plus an fp32 rescale (``quant/int8.py``, shared with training): the
integer codes are identical to the fake-quant model's, the only difference is fp32
rounding. Weight codes: binary {-1, +1}, ternary {-1, 0, 1}, symmetric k-bit, and
asymmetric k <= 7 bits (``code - zero_point`` still fits int8) are all stored as one
int8 matrix built once at load.

Padding is skipped (``unpad=True``, BERT-style classifiers: ``base_model`` with
``embeddings``, ``encoder`` and ``pooler``, a ``dropout`` + ``classifier`` head): the real
tokens of a right-padded batch run through the encoder as one packed sequence, so every
linear, LayerNorm and GELU touches only real tokens; attention alone scatters them back
to a ``(batch, heads, longest, head dim)`` grid masked to each sentence. Every per-token
operation is unchanged (activation scales are per token, so the codes are identical) and
the pooler reads each sentence's first token, as the padded model does. GLUE dev batches
padded to 128 hold ~20% real tokens on SST-2. Batches whose first column is padding (left
padding), ``inputs_embeds`` or extra outputs take the model's own (padded) forward.

Not supported (the layer is left as it is, i.e. the exact fp32 dequantized fallback):
groups that split a row (N not dividing ``out_features``: it would need per-group
partial sums), asymmetric activations, 8-bit asymmetric weights, unquantized weights,
an uncalibrated static range, ``quant_enabled = False``.

Typical use::

    model = load_runtime("out/model.safetensors")   # load_packed + optimize_for_inference
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_outputs import SequenceClassifierOutput

from xtc_lightning.quant import QuantLinear, WeightCodes, weight_codes
from xtc_lightning.quant.int8 import INT8_MAX, quantize_per_token, rescale
from xtc_lightning.quant.quantizers import activation_qparams, activation_qrange


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


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    """``torch.compile`` (inductor, dynamic shapes) of ``quantize_per_token`` or ``rescale``, built once."""
    fn = _COMPILED.get(name)
    if fn is None:
        eager = {"quantize": quantize_per_token, "rescale": rescale}[name]
        fn = _COMPILED[name] = torch.compile(eager, dynamic=True)
    return fn


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
        self.compiled = False  # use the torch.compile'd (fused) quantize / rescale kernels
        self.siblings: FusedSiblings | None = None  # computed in one GEMM with its siblings
        self.columns = slice(None)  # this layer's output columns in the siblings' GEMM

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
        return cls(*packed, layer.bias, qmax, act_scale)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 codes ``(M, K)`` and scale ``(M, 1)`` or ``()``, as ``fake_quantize_activation`` computes them."""
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.act_scale is None:
            fn = _compiled("quantize") if self._use_compiled() else quantize_per_token
            return fn(x2, self.act_qmax)
        return quantize_static(x2, self.act_scale, self.act_qmax)

    def matmul(self, x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
        """Quantize ``x`` and multiply by int8 ``weight_int8`` (N, K): ``(..., N)`` in ``x``'s dtype."""
        codes, a_scale = self.quantize_input(x)
        acc = torch._int_mm(codes, weight_int8.t())  # (M, N) int32, exact
        fn = _compiled("rescale") if self._use_compiled() else rescale
        y = fn(acc, weight_scale, a_scale, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight_int8.shape[0])

    def _use_compiled(self) -> bool:
        """The compiled kernels, except while torch.export / torch.compile traces the model (eager ops then)."""
        return self.compiled and not torch.compiler.is_compiling()

    def forward(self, x: Tensor) -> Tensor:
        if self.siblings is not None:
            return self.siblings.output(x)[..., self.columns]
        return self.matmul(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.act_scale is None else "static"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation=int{self.act_qmax.bit_length() + 1} {act}"
        )


UNPADDED_ATTENTION = "xtc_unpadded"


def unpadded_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention of packed tokens ``(1, heads, N, d)``: scattered to a padded grid, attended per sentence.

    ``kwargs["xtc_unpad"]`` (set by ``UnpaddedForward``) holds the token positions in the
    ``(batch, longest)`` grid, the key mask and whether to use sdpa or the eager formula.
    """
    grid: _PaddingGrid = kwargs["xtc_unpad"]
    heads, dim = query.shape[1], query.shape[3]

    def to_grid(x: Tensor) -> Tensor:
        out = x.new_zeros(grid.batch * grid.length, heads, dim)
        out.index_copy_(0, grid.index, x[0].transpose(0, 1))
        return out.view(grid.batch, grid.length, heads, dim).transpose(1, 2)

    q, k, v = to_grid(query), to_grid(key), to_grid(value)
    if grid.sdpa:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=grid.key_mask, scale=scaling)
    else:  # transformers' eager formula: additive mask, softmax, weighted sum
        scale = dim**-0.5 if scaling is None else scaling
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = scores.masked_fill(~grid.key_mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
    out = out.transpose(1, 2).reshape(grid.batch * grid.length, heads, dim).index_select(0, grid.index)
    return out.unsqueeze(0), None


AttentionInterface.register(UNPADDED_ATTENTION, unpadded_attention)


class _PaddingGrid:
    """Where the real tokens of a right-padded batch sit: ``index`` into the flattened ``(batch, length)`` grid."""

    def __init__(self, attention_mask: Tensor, sdpa: bool):
        real = attention_mask.bool()
        self.batch = real.shape[0]
        self.length = int(real.any(0).nonzero().max()) + 1  # up to the last column holding a real token
        real = real[:, : self.length]
        self.index = real.reshape(-1).nonzero().squeeze(1)
        self.key_mask = real[:, None, None, :]
        counts = real.sum(1)
        self.first = torch.cumsum(counts, 0) - counts  # each sentence's first token in the packed order
        self.sdpa = sdpa

    def pack(self, t: Tensor) -> Tensor:
        """``(batch, T)`` -> the real tokens as ``(1, N)``."""
        return t[:, : self.length].reshape(-1).index_select(0, self.index).unsqueeze(0)


class UnpaddedForward:
    """A BERT-style classifier's forward over the real tokens only (installed as ``model.forward``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @staticmethod
    def supports(model: nn.Module) -> bool:
        base = getattr(model, "base_model", None)
        return (
            base is not None
            and base is not model
            and all(
                isinstance(getattr(base, n, None), nn.Module) for n in ("embeddings", "encoder", "pooler")
            )
            and isinstance(getattr(model, "classifier", None), nn.Module)
            and isinstance(getattr(model, "dropout", None), nn.Module)
        )

    @property
    def __code__(self):
        """torch.export names its trace after ``model.forward.__code__``."""
        return type(self).__call__.__code__

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        usable = (
            not torch.compiler.is_compiling()  # torch.export traces the padded forward (no data-dependent shapes)
            and input_ids is not None
            and attention_mask is not None
            and not kwargs
            and bool(attention_mask[:, 0].all())  # right padding: the pooler's first token is real
            and not self.model.training
        )
        if not usable:  # the class's own (padded) forward
            return type(self.model).forward(
                self.model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                **kwargs,
            )
        model, base = self.model, self.model.base_model
        config = model.config
        grid = _PaddingGrid(attention_mask, sdpa=config._attn_implementation != "eager")
        positions = torch.arange(grid.length, device=input_ids.device).expand(grid.batch, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = base.embeddings(
            input_ids=grid.pack(input_ids),
            token_type_ids=grid.pack(token_type_ids),
            position_ids=grid.pack(positions),
        )
        chosen = config._attn_implementation
        config._attn_implementation = UNPADDED_ATTENTION
        try:
            hidden = base.encoder(hidden, xtc_unpad=grid).last_hidden_state
        finally:
            config._attn_implementation = chosen
        first = hidden[0].index_select(0, grid.first).unsqueeze(1)  # (batch, 1, hidden)
        logits = model.classifier(model.dropout(base.pooler(first)))
        return SequenceClassifierOutput(logits=logits)


class FusedSiblings:
    """Int8 linears of one parent reading the same input (query, key, value) as one GEMM.

    The first call with a new input tensor computes every sibling's output at once (one
    activation quantization, one int8 GEMM over the concatenated weight codes, one
    rescale); each sibling returns its columns. Integer sums are exact and the rescale is
    elementwise, so the outputs are bit-identical to separate GEMMs. The result is reused
    only for the very same input tensor object (``is``; the reference it holds keeps the id
    from being recycled).
    """

    def __init__(self, members: list[Int8Linear]):
        self.lead = members[0]
        self.weight_int8 = torch.cat([m.weight_int8 for m in members])
        self.weight_scale = torch.cat([m.weight_scale for m in members])
        self.bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
        start = 0
        for m in members:
            m.siblings, m.columns = self, slice(start, start + m.out_features)
            start += m.out_features
        self.x = self.y = None

    @staticmethod
    def key(m: Int8Linear) -> tuple:
        """Linears with equal keys can share a GEMM: same input width, input quantizer and bias presence."""
        scale = None if m.act_scale is None else float(m.act_scale)
        return (m.in_features, m.act_qmax, scale, m.bias is None)

    def output(self, x: Tensor) -> Tensor:
        if self.x is not x:
            self.y = self.lead.matmul(x, self.weight_int8, self.weight_scale, self.bias)
            self.x = x
        return self.y


def optimize_for_inference(
    model: nn.Module,
    attn_implementation: str | None = "sdpa",
    compile: bool = True,
    fuse_siblings: bool = True,
    unpad: bool = True,
) -> nn.Module:
    """Swap every supported quantized linear for an ``Int8Linear`` (in place); returns ``model`` in eval mode.

    Unsupported layers (see the module docstring) stay as they are: exact fake-quant /
    dequantized fp32 behaviour. ``attn_implementation`` ("sdpa", "eager" or None to keep
    the model's) switches the attention kernel; the fake-quant reference uses eager, sdpa
    gives the same logits up to float rounding and is faster. ``compile`` runs the
    activation quantizer and the int32 -> fp32 rescale as ``torch.compile``'d fused
    kernels (first call compiles, ~20 s; falls back to eager ops if compiling fails).
    ``fuse_siblings`` runs the int8 linears of one parent module that read the same input
    (query / key / value) as one GEMM (``FusedSiblings``). ``unpad`` installs ``UnpaddedForward`` (BERT-style
    classifiers; see the module docstring). ``model.int8_summary`` records
    ``{"int8": [...names], "fallback": [...names], "unpadded": bool}``.
    """
    use_compile = compile and _can_compile()
    fast, fallback = [], []
    groups: dict[tuple, list[Int8Linear]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        new = Int8Linear.from_quant_linear(module)
        if new is None:
            fallback.append(name)
            continue
        parent, _, child = name.rpartition(".")
        new.compiled = use_compile
        groups.setdefault((parent, *FusedSiblings.key(new)), []).append(new)
        setattr(model.get_submodule(parent), child, new)
        fast.append(name)
    if fuse_siblings:
        for members in groups.values():
            if len(members) > 1:
                FusedSiblings(members)
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn_implementation is not None and current is not None and current != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    unpadded = unpad and UnpaddedForward.supports(model)
    if unpadded and not isinstance(model.forward, UnpaddedForward):
        model.forward = UnpaddedForward(model)
    model.int8_summary = {"int8": fast, "fallback": fallback, "unpadded": unpadded}
    return model.eval()


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


def load_runtime(
    path: str | Path, attn_implementation: str | None = "sdpa", compile: bool = True, unpad: bool = True
) -> nn.Module:
    """``optimize_for_inference(load_packed(path))``: the fast CPU model of a packed file."""
    from xtc_lightning.export.packed import load_packed

    return optimize_for_inference(
        load_packed(path), attn_implementation=attn_implementation, compile=compile, unpad=unpad
    )

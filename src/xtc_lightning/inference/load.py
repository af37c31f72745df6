"""The loader: ``optimize_for_inference`` applies every optimization of this package; ``load_runtime``
reads a packed file into it; ``runtime_bytes`` measures what the loaded model holds."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xtc_lightning.inference.bitrows import compact_embeddings, held_bytes
from xtc_lightning.inference.linear import (
    Int8Linear,
    _can_compile,
    _can_prepack,
    fold_gelu,
    fold_quantize,
    fold_residual_norm,
    onednn_prepack,
)
from xtc_lightning.inference.qkv import FusedSiblings
from xtc_lightning.inference.unpad import UnpaddedForward
from xtc_lightning.quant import QuantLinear


def optimize_for_inference(
    model: nn.Module,
    attn_implementation: str | None = "sdpa",
    compile: bool = True,
    fuse_siblings: bool = True,
    unpad: bool = True,
    prepack: bool = True,
    low_memory: bool = False,
) -> nn.Module:
    """Swap every supported quantized linear for an ``Int8Linear`` (in place); returns ``model`` in eval mode.

    Unsupported layers (see the module docstring) stay as they are: exact fake-quant /
    dequantized fp32 behaviour. ``attn_implementation`` ("sdpa", "eager" or None to keep
    the model's) switches the attention kernel; the fake-quant reference uses eager, sdpa
    gives the same logits up to float rounding and is faster. ``compile`` runs the
    activation quantizer and the int32 -> fp32 rescale as fused inductor kernels
    (``Precompiled``: compiled at the first call of each signature and thread count, ~20 s;
    eager ops where compiling fails).
    ``fuse_siblings`` runs the int8 linears of one parent module that read the same input
    (query / key / value) as one GEMM (``FusedSiblings``). ``unpad`` installs ``UnpaddedForward`` (BERT-style
    classifiers; see the module docstring). ``prepack`` runs the GEMMs on oneDNN's prepacked
    weights with the per-row scale in the GEMM's epilogue (``onednn_gemm``; where this torch
    build has the op and it is exact here for the layer's codes), else ``integer_gemm``; the prepacked copies are
    plain attributes, outside the state dict (``prepack=False`` for ``torch.export``). The
    ``low_memory`` keeps the codes bit-packed (``Int8Linear.compact``, ``BitRowsEmbedding``
    tables whatever this flag) and unpacks each linear's codes at its call (no prepacked copy).
    The exact GELU after an int8 linear runs in that linear's epilogue (``fold_gelu``), and so do the
    residual add and LayerNorm of HF's output blocks (``fold_residual_norm``); with ``compile``, an
    epilogue whose output is the next int8 linear's input also computes that linear's codes (``fold_quantize``).
    ``model.int8_summary`` records ``{"int8": [...names], "fallback": [...names], "unpadded":
    bool}``.
    """
    use_compile = compile and _can_compile()
    use_prepack = prepack and not low_memory
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
        if use_prepack and _can_prepack(new.code_max):
            new.packed_weight = onednn_prepack(new.weight_int8)
        if low_memory or new.packed_weight is not None:  # the prepacked copy computes: keep only bits
            new.compact()
        groups.setdefault((parent, *FusedSiblings.key(new)), []).append(new)
        setattr(model.get_submodule(parent), child, new)
        fast.append(name)
    if fuse_siblings:
        for members in groups.values():
            if len(members) > 1:
                FusedSiblings(members)
    fold_gelu(model)
    fold_residual_norm(model)
    fold_quantize(model)
    compact_embeddings(model)
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn_implementation is not None and current is not None and current != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    unpadded = unpad and UnpaddedForward.supports(model)
    if unpadded and not isinstance(model.forward, UnpaddedForward):
        model.forward = UnpaddedForward(model)
    model.int8_summary = {"int8": fast, "fallback": fallback, "unpadded": unpadded}
    return model.eval()


def runtime_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a runtime model holds: its parameters and buffers, the prepacked
    oneDNN weights and the sibling groups' concatenated tensors (``held_bytes``: each storage once)."""
    extra = []
    for m in model.modules():
        if isinstance(m, Int8Linear):
            g = m.siblings
            extra += [m.packed_weight and m.packed_weight.weight]
            if g is not None:
                extra += [g.weight_int8, g.weight_bits, g.packed_weight and g.packed_weight.weight]
                extra += [g.weight_scale, g.bias]
    return held_bytes(model, extra)


def load_runtime(
    path: str | Path,
    attn_implementation: str | None = "sdpa",
    compile: bool = True,
    unpad: bool = True,
    prepack: bool = True,
    low_memory: bool = False,
) -> nn.Module:
    """``optimize_for_inference(load_packed(path))``: the fast CPU model of a packed file."""
    from xtc_lightning.export.packed import load_packed

    return optimize_for_inference(
        load_packed(path),
        attn_implementation=attn_implementation,
        compile=compile,
        unpad=unpad,
        prepack=prepack,
        low_memory=low_memory,
    )

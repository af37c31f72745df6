"""A plain Hugging Face model folder with the dequantized weights, for tools that only speak ``from_pretrained``.

Every ``QuantLinear`` becomes an ``nn.Linear`` and every ``QuantEmbedding`` an
``nn.Embedding`` holding the dequantized weight (the values the quantized forward uses),
saved with ``save_pretrained`` (safetensors, fp32) and no custom code.

What is lost: **activation quantization**. A plain model has no place for it, so a model
trained with 8-bit activations (W1A8) computes with fp32 activations here; its
predictions match the packed (fake-quantized) model only approximately. For weight-only
configs (activation method none) the plain model computes exactly what the packed model
does. The file is also fp32, the size of the original model: this is a compatibility
export, not a compressed one (that is the packed file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from xtc_lightning.errors import UserError
from xtc_lightning.export.layers import PackedEmbedding, PackedLinear
from xtc_lightning.io import atomic_folder
from xtc_lightning.quant import QuantEmbedding, QuantLinear, fake_quantize_weight


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized module replaced by its plain torch module."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if not isinstance(m, QuantLinear | QuantEmbedding):
            continue
        with torch.no_grad():
            if isinstance(m, PackedLinear | PackedEmbedding) or not m.quant_enabled:
                weight = m.weight.detach().clone()
            else:
                weight = fake_quantize_weight(m.weight.detach(), m.weight_spec).clone()
        if isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())
        else:
            new = nn.Embedding(
                m.num_embeddings,
                m.embedding_dim,
                padding_idx=m.padding_idx,
                max_norm=m.max_norm,
                norm_type=m.norm_type,
                scale_grad_by_freq=m.scale_grad_by_freq,
                sparse=m.sparse,
                device="meta",
            )
        new.weight = nn.Parameter(weight)
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, new)
    return plain


def export_hf(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write ``model`` dequantized as a standard HF folder (written aside, then renamed into place)."""
    folder = Path(folder)
    if not hasattr(model, "save_pretrained"):
        raise UserError(f"cannot export {type(model).__name__} as an HF folder: not a Hugging Face model")
    plain = dequantized_copy(model)
    with atomic_folder(folder) as tmp:
        plain.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder

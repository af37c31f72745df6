"""QKV fusion: the int8 linears of one parent that read the same input as one GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

from xtc_lightning.inference.bitrows import unpack_rows
from xtc_lightning.inference.linear import Int8Linear, _prepacked, onednn_prepack


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
        compact = members[0].weight_int8 is None  # all compact or none (``FusedSiblings.key``)
        self.weight_int8 = None if compact else torch.cat([m.weight_int8 for m in members])
        self.weight_bits = torch.cat([m.weight_bits for m in members]) if compact else None
        self.codes_spec = members[0].codes_spec
        self.weight_scale = torch.cat([m.weight_scale for m in members])
        self.bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
        self.packed_weight = None
        if self.lead.packed_weight is not None:
            w = self.weight_int8
            if w is None:
                w = unpack_rows(self.weight_bits, *self.codes_spec, self.lead.in_features)
            self.packed_weight = onednn_prepack(w)
        start = 0
        for m in members:
            m.siblings, m.columns = self, slice(start, start + m.out_features)
            m.packed_weight = None  # the group's GEMM is the one that runs
            rows = slice(start, start + m.out_features)
            if compact:  # the members' buffers become views of the group's: one copy in memory
                m.weight_bits = self.weight_bits[rows]
            else:
                m.weight_int8 = self.weight_int8[rows]
            start += m.out_features
        self.x = self.y = None

    @staticmethod
    def key(m: Int8Linear) -> tuple:
        """Linears with equal keys can share a GEMM: same input width, input quantizer, bias presence
        and weight codes (the lead's ``code_max`` bounds the group's sums)."""
        scale = None if m.act_scale is None else float(m.act_scale)
        return (
            m.in_features,
            m.act_qmax,
            scale,
            m.bias is None,
            m.weight_int8 is None,
            m.codes_spec,
            m.code_max,
        )

    def output(self, x: Tensor) -> Tensor:
        if self.x is not x:
            w, packed = self.weight_int8, _prepacked(self.packed_weight)
            if w is None and packed is None:
                w = unpack_rows(self.weight_bits, *self.codes_spec, self.lead.in_features)
            self.y = self.lead.matmul(x, w, self.weight_scale, self.bias, packed)
            self.x = x
        return self.y

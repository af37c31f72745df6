"""Weight codes kept bit-packed in memory, row by row, and unpacked where they are used.

The packed file stores a quantized weight as a stream of ``bits``-bit codes; loading it
for inference used to expand every code to one int8 byte (binary: 8x the file) and the
word embeddings to fp32 (32x). Here each row of codes (a vocabulary row, an output row of
a linear) is packed on its own into ``ceil(cols * b / 8)`` bytes with ``b`` = ``bits``
rounded up to 1, 2, 4 or 8 (so a code never straddles a byte and rows can be gathered as
bytes); ``unpack_rows`` gives back the exact int8 codes of ``packing.from_unsigned``.

``BitRowsEmbedding`` looks up packed rows and dequantizes only the rows it gathered, with
the very ops of ``dequantize_weight``: its output equals ``PackedEmbedding``'s bit for bit.
``held_bytes`` counts the bytes of the tensors a model holds (each storage once).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xtc_lightning.export.packing import from_unsigned, to_unsigned
from xtc_lightning.quant.quantizers import WeightCodes, dequantize_weight

SIGNED_METHODS = ("binary", "ternary", "symmetric")  # from_unsigned gives int8 codes directly


def storage_bits(bits: int) -> int:
    """Bits per code in memory: ``bits`` rounded up to 1, 2, 4 or 8."""
    return next(b for b in (1, 2, 4, 8) if b >= bits)


def pack_rows(codes: Tensor, method: str, bits: int) -> Tensor:
    """int8 (uint8 for asymmetric) codes ``(R, C)`` -> uint8 ``(R, ceil(C * b / 8))``, row by row."""
    b = storage_bits(bits)
    rows, cols = codes.shape
    per_byte = 8 // b
    u = to_unsigned(codes, method, bits).reshape(rows, cols)
    width = -(-cols // per_byte) * per_byte
    if width != cols:
        u = torch.cat([u, u.new_zeros(rows, width - cols)], dim=1)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * b
    return (u.reshape(rows, -1, per_byte) << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_rows(packed: Tensor, method: str, bits: int, cols: int) -> Tensor:
    """Inverse of ``pack_rows`` for any selection of rows: ``(n, bytes)`` -> codes ``(n, cols)``."""
    b = storage_bits(bits)
    per_byte = 8 // b
    if b == 8:
        u = packed[:, :cols]
    else:
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * b
        u = ((packed.unsqueeze(-1) >> shifts) & ((1 << b) - 1)).reshape(packed.shape[0], -1)[:, :cols]
    return from_unsigned(u, method, bits)


class BitRowsEmbedding(nn.Module):
    """A quantized embedding table as bit-packed rows; a lookup dequantizes only the gathered rows.

    Built from a ``PackedEmbedding`` whose groups are whole rows (``"row"``, ``"tensor"``, or
    N groups dividing the row count) and which uses no ``max_norm``; see ``from_packed``.
    """

    def __init__(self, codes: WeightCodes, dtype: torch.dtype):
        super().__init__()
        rows, self.embedding_dim = codes.codes.shape
        self.rows_per_group = rows // codes.num_groups
        self.method, self.bits, self.dtype = codes.method, codes.bits, dtype
        self.register_buffer("rows", pack_rows(codes.codes, codes.method, codes.bits))
        self.register_buffer("scale", codes.scale.clone())
        self.register_buffer("zero_point", None if codes.zero_point is None else codes.zero_point.clone())

    @classmethod
    def from_packed(cls, module: nn.Module) -> BitRowsEmbedding | None:
        """The compact form of a ``PackedEmbedding`` (its ``codes``), or None if unsupported."""
        wc = getattr(module, "codes", None)
        if wc is None or wc.codes.dim() != 2 or getattr(module, "max_norm", None) is not None:
            return None
        if wc.num_groups <= 0 or wc.codes.shape[0] % wc.num_groups:
            return None  # a group would split a row
        return cls(wc, module.weight.dtype)

    def forward(self, input: Tensor) -> Tensor:
        ids = input.reshape(-1)
        codes = unpack_rows(self.rows.index_select(0, ids), self.method, self.bits, self.embedding_dim)
        group = ids // self.rows_per_group
        zp = None if self.zero_point is None else self.zero_point.index_select(0, group)
        wc = WeightCodes(codes, self.scale.index_select(0, group), zp, self.method, self.bits, ids.numel())
        out = dequantize_weight(wc)
        return out.to(self.dtype).reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.rows.shape[0]}, {self.embedding_dim}, {self.method} {self.bits}-bit codes, packed rows"


def compact_embeddings(model: nn.Module) -> list[str]:
    """Swap every supported ``PackedEmbedding`` for a ``BitRowsEmbedding`` (in place); returns their names."""
    from xtc_lightning.export.layers import PackedEmbedding

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedEmbedding):
            new = BitRowsEmbedding.from_packed(module)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
                names.append(name)
    return names


def held_bytes(model: nn.Module, extra: list[Tensor | None] = ()) -> int:
    """Bytes of every tensor ``model`` holds (parameters, buffers and ``extra``), each storage counted once."""
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers(), *extra]:
        if t is None:
            continue
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque (e.g. oneDNN-packed) tensors
            storages[id(t)] = t.numel() * t.element_size()
    return sum(storages.values())

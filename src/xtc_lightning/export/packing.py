"""Bit packing of quantized weight codes: pure functions, no I/O.

Integer codes are first mapped to **unsigned** codes of exactly ``bits`` bits::

    binary      {-1, +1}          -> {0, 1}            (1 bit)
    ternary     {-1, 0, +1}       -> {0, 1, 2}         (2 bits; 3 is never written)
    symmetric   [-Q, Q], Q=2^(k-1)-1 -> [0, 2Q]         (k bits; 2^k - 1 is never written)
    asymmetric  [0, 2^k - 1]      -> unchanged         (k bits)

then written as one little-endian bit stream: code ``i`` (row-major order of the weight)
occupies stream bits ``[i*k, (i+1)*k)``, least significant bit first, and stream bit ``j``
is bit ``j % 8`` (value ``2^(j % 8)``) of byte ``j // 8``. The last byte is zero-padded.
So ``n`` codes of ``k`` bits take exactly ``ceil(n*k/8)`` bytes, for every ``k`` in 1..8,
including the widths that straddle bytes (3, 5, 6, 7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Codes are packed in chunks of this many (a multiple of 8, so every chunk starts on a byte).
CHUNK = 1 << 21


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    return math.ceil(count * bits / 8)


def to_unsigned(codes: Tensor, method: str, bits: int) -> Tensor:
    """Integer codes of ``method`` (``quantizers.weight_codes``) -> unsigned ``bits``-bit codes (uint8)."""
    c = codes.reshape(-1)
    if method == "binary":
        u = c > 0
    elif method == "ternary":
        u = c.to(torch.int16) + 1
    elif method == "symmetric":
        u = c.to(torch.int16) + (2 ** (bits - 1) - 1)
    elif method == "asymmetric":
        u = c
    else:
        raise ValueError(f"no code packing for method {method!r}")
    return u.to(torch.uint8)


def max_unsigned(method: str, bits: int) -> int:
    """The largest unsigned code ``method`` can produce (larger values mean a corrupt file)."""
    if method == "ternary":
        return 2
    if method == "symmetric":
        return 2 * (2 ** (bits - 1) - 1)
    return 2**bits - 1


def from_unsigned(u: Tensor, method: str, bits: int) -> Tensor:
    """Inverse of :func:`to_unsigned`: int8 codes (uint8 for asymmetric), as ``weight_codes`` returns."""
    if method == "binary":
        return u.to(torch.int8) * 2 - 1
    if method == "ternary":
        return (u.to(torch.int16) - 1).to(torch.int8)
    if method == "symmetric":
        return (u.to(torch.int16) - (2 ** (bits - 1) - 1)).to(torch.int8)
    if method == "asymmetric":
        return u.to(torch.uint8)
    raise ValueError(f"no code packing for method {method!r}")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack_bits(u: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (any shape, values < 2^bits) into a 1-D uint8 tensor of ``ceil(n*bits/8)`` bytes."""
    _check_bits(bits)
    u = u.reshape(-1).to(torch.uint8)
    if bits == 8:
        return u.clone()
    out = [_pack_chunk(u[i : i + CHUNK], bits) for i in range(0, u.numel(), CHUNK)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def _pack_chunk(u: Tensor, bits: int) -> Tensor:
    n = u.numel()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per_byte = 8 // bits
        padded = torch.zeros(math.ceil(n / per_byte) * per_byte, dtype=torch.uint8)
        padded[:n] = u
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        return (padded.reshape(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    # 3, 5, 6, 7: through the bit stream
    stream_bits = (u.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1
    stream = torch.zeros(packed_nbytes(n, bits) * 8, dtype=torch.uint8)
    stream[: n * bits] = stream_bits.reshape(-1)
    return (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` unsigned codes (1-D uint8) packed by :func:`pack_bits`."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits "
            f"(expected {packed_nbytes(count, bits)})"
        )
    if bits == 8:
        return packed.clone()
    chunk_bytes = CHUNK * bits // 8
    out = []
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        b0 = start * bits // 8
        out.append(_unpack_chunk(packed[b0 : b0 + min(chunk_bytes, packed_nbytes(n, bits))], bits, n))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def _unpack_chunk(packed: Tensor, bits: int, n: int) -> Tensor:
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    per_code = stream[: n * bits].reshape(n, bits) << torch.arange(bits, dtype=torch.uint8)
    return per_code.sum(dim=1, dtype=torch.uint8)

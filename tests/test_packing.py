"""Bit packing of weight codes: hand-computed bytes, exact round trips for every width and method."""

from __future__ import annotations

import pytest
import torch

from xtc_lightning.export import packing
from xtc_lightning.export.packing import (
    from_unsigned,
    max_unsigned,
    pack_bits,
    packed_nbytes,
    to_unsigned,
    unpack_bits,
)
from xtc_lightning.quant import WeightSpec, dequantize_weight, fake_quantize_weight, weight_codes

U8 = torch.uint8


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0b00001101, 0b1]),  # code i is bit i
        ([1, 2, 0, 3, 1], 2, [1 | 2 << 2 | 0 << 4 | 3 << 6, 1]),
        ([5, 3, 7], 3, [221, 1]),  # stream 101 110 111 (LSB first): 1,0,1,1,1,0,1,1 | 1
        ([0xA, 0x5, 0xF], 4, [0x5A, 0x0F]),
        ([31, 1], 5, [0b00111111, 0b00]),  # 11111 10000 -> byte0 bits 0-7 = 1,1,1,1,1,1,0,0
        ([200, 7], 8, [200, 7]),
    ],
)
def test_pack_bits_hand_computed(codes, bits, expected):
    packed = pack_bits(torch.tensor(codes, dtype=U8), bits)
    assert packed.tolist() == expected
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_unpack_round_trip_every_width(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    u = torch.randint(0, 2**bits, (count,), generator=g).to(U8)
    packed = pack_bits(u, bits)
    assert packed.dtype == U8 and packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), u)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunked_packing_matches_one_piece(bits, monkeypatch):
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2**bits, (203,), generator=g).to(U8)  # not a multiple of the chunk or of 8
    whole = pack_bits(u, bits)
    monkeypatch.setattr(packing, "CHUNK", 16)
    chunked = pack_bits(u, bits)
    assert torch.equal(chunked, whole)
    assert torch.equal(unpack_bits(chunked, bits, 203), u)


def test_padding_bits_are_zero():
    assert pack_bits(torch.ones(3, dtype=U8), 1).tolist() == [0b111]
    assert pack_bits(torch.full((3,), 7, dtype=U8), 3).tolist() == [0xFF, 0b1]


SPECS = [
    WeightSpec("binary", 1, "row"),
    WeightSpec("binary", 1, "tensor"),
    WeightSpec("ternary", 2, "row"),
    WeightSpec("ternary", 2, 13),
    *(WeightSpec("symmetric", b, "row") for b in range(2, 9)),
    *(WeightSpec("asymmetric", b, 7) for b in range(2, 9)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}{s.bits}-{s.groups}")
@pytest.mark.parametrize("shape", [(7, 13), (1, 91), (13, 7)])
def test_weight_codes_round_trip_exact(spec, shape):
    """Codes of a real weight survive mapping + packing; the dequantized weight equals the fake-quant one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.0  # an exact zero
    wc = weight_codes(w, spec)
    u = to_unsigned(wc.codes, spec.method, spec.bits)
    assert int(u.max()) <= max_unsigned(spec.method, spec.bits) < 2**spec.bits
    restored = from_unsigned(
        unpack_bits(pack_bits(u, spec.bits), spec.bits, u.numel()), spec.method, spec.bits
    )
    restored = restored.reshape(shape)
    assert restored.dtype == wc.codes.dtype and torch.equal(restored, wc.codes)
    again = type(wc)(restored, wc.scale, wc.zero_point, wc.method, wc.bits, wc.num_groups)
    assert torch.equal(dequantize_weight(again), fake_quantize_weight(w, spec))


def test_unsigned_code_ranges():
    assert to_unsigned(torch.tensor([-1, 1], dtype=torch.int8), "binary", 1).tolist() == [0, 1]
    assert to_unsigned(torch.tensor([-1, 0, 1], dtype=torch.int8), "ternary", 2).tolist() == [0, 1, 2]
    assert to_unsigned(torch.tensor([-7, 0, 7], dtype=torch.int8), "symmetric", 4).tolist() == [0, 7, 14]
    assert to_unsigned(torch.tensor([-127, 127], dtype=torch.int8), "symmetric", 8).tolist() == [0, 254]
    assert (max_unsigned("ternary", 2), max_unsigned("symmetric", 3), max_unsigned("asymmetric", 3)) == (
        2,
        6,
        7,
    )


def test_unpack_refuses_wrong_byte_count_and_bits():
    with pytest.raises(ValueError, match="cannot hold exactly 9 codes"):
        unpack_bits(torch.zeros(1, dtype=U8), 1, 9)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.zeros(3, dtype=U8), 9)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int8), 4, 4)


def test_safetensors_bytes_are_a_valid_file_in_one_fixed_order(tmp_path):
    """The packed writer's safetensors bytes: readable by safetensors itself (every dtype the packed
    format stores, an empty tensor), and the same bytes whatever the order the entries come in
    (safetensors' own writer orders the metadata by hash: different bytes in every process)."""
    from safetensors import safe_open

    from xtc_lightning.export.format import safetensors_bytes

    tensors = {
        "b.codes": torch.tensor([0b1010_0101, 255], dtype=torch.uint8),
        "a.scale": torch.tensor([0.5, -2.0], dtype=torch.float16),
        "c": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "d": torch.tensor([1.5], dtype=torch.bfloat16),
        "e": torch.tensor([-3, 7], dtype=torch.int64),
        "f": torch.zeros(0, 4),
    }
    meta = {"z": "1", "format": "xtc-packed", "m": '{"k":2}'}
    data = safetensors_bytes(tensors, meta)
    assert safetensors_bytes(dict(reversed(tensors.items())), dict(reversed(meta.items()))) == data
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0 and data[8:20] == b'{"__metadata'
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t) and f.get_tensor(name).dtype == t.dtype

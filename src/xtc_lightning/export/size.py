"""Where the bytes of a packed file go, and how close the file is to the information it holds.

Components (they add up to the file size exactly)::

    packed weights   the bit-packed codes: ceil(numel * bits / 8) bytes per quantized weight
    scales           per-group scales (stored float dtype) and zero points (uint8)
    other tensors    every non-quantized tensor at its stored width (LayerNorms, biases,
                     position / token-type embeddings, pooler, classifier, activation ranges)
    header           safetensors' 8-byte length + JSON header (tensor table and metadata)

Theoretical bound = sum(bits * quantized weights) / 8 + scales + other tensors: what the
content needs at its stored widths with no container at all. ``file / bound`` is then the
container overhead (header, and the padding of the last byte of each packed tensor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from xtc_lightning.export.format import CODES, ELEMENT_BYTES, SCALE, ZERO_POINT, read_header


@dataclass(frozen=True)
class SizeReport:
    file_bytes: int
    header_bytes: int
    packed_weight_bytes: int
    scale_bytes: int
    other_bytes: int
    quantized_params: int
    other_params: int
    quantized_params_by_bits: dict[int, int] = field(default_factory=dict)
    teacher_bytes: int | None = None

    @property
    def bound_bytes(self) -> float:
        bits = sum(b * n for b, n in self.quantized_params_by_bits.items())
        return bits / 8 + self.scale_bytes + self.other_bytes

    @property
    def bound_ratio(self) -> float:
        return self.file_bytes / self.bound_bytes if self.bound_bytes else math.inf

    @property
    def teacher_ratio(self) -> float | None:
        return None if self.teacher_bytes is None else self.teacher_bytes / self.file_bytes

    @classmethod
    def from_dict(cls, d: dict) -> SizeReport:
        """Inverse of ``as_dict`` (the derived entries are recomputed, not read)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["quantized_params_by_bits"] = {int(k): v for k, v in d["quantized_params_by_bits"].items()}
        return cls(**kwargs)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["quantized_params_by_bits"] = {str(k): v for k, v in self.quantized_params_by_bits.items()}
        d.update(bound_bytes=self.bound_bytes, bound_ratio=self.bound_ratio, teacher_ratio=self.teacher_ratio)
        return d

    def text(self) -> str:
        rows = [
            ("packed weights", self.packed_weight_bytes, _bits_note(self.quantized_params_by_bits)),
            ("scales / zero points", self.scale_bytes, ""),
            ("other tensors", self.other_bytes, f"{self.other_params:,} params"),
            ("header + metadata", self.header_bytes, ""),
            ("file", self.file_bytes, ""),
            ("theoretical bound", round(self.bound_bytes), f"file / bound = {self.bound_ratio:.4f}"),
        ]
        if self.teacher_bytes is not None:
            rows.append(
                ("fp32 teacher file", self.teacher_bytes, f"teacher / file = {self.teacher_ratio:.1f}x")
            )
        width = max(len(r[0]) for r in rows)
        return "\n".join(
            f"{name.ljust(width)}  {n:>13,} B  {n / 2**20:9.3f} MiB  {note}".rstrip()
            for name, n, note in rows
        )


def _bits_note(by_bits: dict[int, int]) -> str:
    return ", ".join(f"{n:,} x {b}-bit" for b, n in sorted(by_bits.items()))


def size_report(path: str | Path, teacher_bytes: int | None = None) -> SizeReport:
    """The size report of a packed file, from its header only (the payload is not read)."""
    header = read_header(path)
    nbytes = {k: ELEMENT_BYTES[dtype] * math.prod(shape) for k, (dtype, shape) in header.stored.items()}
    packed = sum(n for k, n in nbytes.items() if k.endswith(CODES))
    scales = sum(n for k, n in nbytes.items() if k.endswith((SCALE, ZERO_POINT)))
    other = sum(n for k, n in nbytes.items() if not k.endswith((CODES, SCALE, ZERO_POINT)))
    by_bits: dict[int, int] = {}
    quantized = other_params = 0
    for entry in header.manifest.values():
        numel = math.prod(entry["shape"])
        if "method" in entry:
            by_bits[entry["bits"]] = by_bits.get(entry["bits"], 0) + numel
            quantized += numel
        else:
            other_params += numel
    return SizeReport(
        file_bytes=header.file_bytes,
        header_bytes=header.file_bytes - sum(nbytes.values()),
        packed_weight_bytes=packed,
        scale_bytes=scales,
        other_bytes=other,
        quantized_params=quantized,
        other_params=other_params,
        quantized_params_by_bits=dict(sorted(by_bits.items())),
        teacher_bytes=teacher_bytes,
    )

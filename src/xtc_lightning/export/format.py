"""The packed file: one safetensors file of bit-packed weight codes, their scales and every other tensor.

Format ``xtc-packed``, version 1. Tensors (safetensors, no pickle)::

    <weight>:codes        uint8, ceil(numel * bits / 8) bytes: the unsigned codes, bit-packed
                          (``packing.py`` gives the bit order and the code mapping per method)
    <weight>:scale        (num_groups,) per-group scales, in the stored float dtype
    <weight>:zero_point   (num_groups,) uint8, asymmetric only
    <tensor>              every other tensor under its state-dict name; floating tensors in
                          the stored float dtype, except the ones written exactly (the
                          static activation ranges stay fp32); integer tensors unchanged

Metadata (safetensors' ``__metadata__``, a string -> string dict; every value except
``format`` and ``format_version`` is JSON)::

    format          "xtc-packed"
    format_version  "1"
    stored_dtype    the float dtype of scales and other tensors: float16 | bfloat16 | float32
    tensors         {state-dict name: {"shape", "dtype" (original), "stored" (dtype in the
                     file); packed weights add "method", "bits", "num_groups"}}
    sha256          digest of every other metadata entry and of every stored tensor (name,
                    dtype, shape, bytes): a changed bit anywhere in metadata or payload is refused
    ...             the caller's entries (``packed.py``: model class and config, quant spec,
                    task and labels, quantized modules, data settings, tokenizer digest)

Reading checks, in order, each failure one ``UserError`` line: a readable safetensors file
(not truncated), the format name, the version, the tensor table against the manifest
(missing / unexpected tensors, dtypes, shapes), the digest, the code range. Writing goes to
a temporary file renamed over the final name (``os.replace``), so the final name never
holds half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from xtc_lightning.errors import UserError
from xtc_lightning.export.packing import (
    from_unsigned,
    max_unsigned,
    pack_bits,
    packed_nbytes,
    to_unsigned,
    unpack_bits,
)
from xtc_lightning.io import atomic_path
from xtc_lightning.quant import WeightCodes

FORMAT = "xtc-packed"
VERSION = 1
RESERVED = ("format", "format_version", "stored_dtype", "tensors", "sha256")
STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CODES, SCALE, ZERO_POINT = ":codes", ":scale", ":zero_point"

# torch dtype name <-> safetensors header dtype; element sizes in bytes
_DTYPES = {
    "float64": ("F64", torch.float64, 8),
    "float32": ("F32", torch.float32, 4),
    "float16": ("F16", torch.float16, 2),
    "bfloat16": ("BF16", torch.bfloat16, 2),
    "int64": ("I64", torch.int64, 8),
    "int32": ("I32", torch.int32, 4),
    "int16": ("I16", torch.int16, 2),
    "int8": ("I8", torch.int8, 1),
    "uint8": ("U8", torch.uint8, 1),
    "bool": ("BOOL", torch.bool, 1),
}
ELEMENT_BYTES = {st: size for st, _, size in _DTYPES.values()}
WEIGHT_METHODS = ("binary", "ternary", "symmetric", "asymmetric")


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise UserError(f"cannot store a {name} tensor in a packed file (supported: {', '.join(_DTYPES)})")
    return name


@dataclass(frozen=True)
class PackedHeader:
    """A packed file's header, checked against its manifest (the tensors are not read).

    ``metadata``: decoded metadata (JSON values parsed); ``stored``: safetensors key ->
    (header dtype such as "F16", shape); ``file_bytes``: size of the file; ``raw_metadata``:
    the metadata strings as stored (what the digest covers).
    """

    path: Path
    metadata: dict
    stored: dict[str, tuple[str, tuple[int, ...]]]
    file_bytes: int
    raw_metadata: dict[str, str]

    @property
    def manifest(self) -> dict[str, dict]:
        return self.metadata["tensors"]


@dataclass(frozen=True)
class PackedFile:
    """A verified packed file: quantized weights as ``WeightCodes``, other tensors in their original dtype."""

    header: PackedHeader
    weights: dict[str, WeightCodes]
    plain: dict[str, Tensor]

    @property
    def metadata(self) -> dict:
        return self.header.metadata


# ----------------------------------------------------------------------------- writing


def write_packed(
    path: str | Path,
    weights: Mapping[str, WeightCodes],
    plain: Mapping[str, Tensor],
    *,
    metadata: Mapping[str, object],
    stored_dtype: str = "float16",
    exact: Collection[str] = (),
) -> None:
    """Write quantized ``weights`` bit-packed and ``plain`` tensors cast to ``stored_dtype``, atomically.

    ``exact``: names of plain floating tensors kept in their own dtype. ``metadata``:
    JSON-serialisable entries stored next to the reserved ones.
    """
    path = Path(path)
    if stored_dtype not in STORED_DTYPES:
        raise UserError(f"other_dtype={stored_dtype!r} is not accepted: {' | '.join(STORED_DTYPES)}")
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the packed format")
    overlap = sorted(set(weights) & set(plain))
    if overlap:
        raise ValueError(f"tensors given both as quantized weights and plain: {overlap[:3]}")
    target = STORED_DTYPES[stored_dtype]
    tensors: dict[str, Tensor] = {}
    manifest: dict[str, dict] = {}
    for name, wc in weights.items():
        if wc.method not in WEIGHT_METHODS:
            raise ValueError(f"{name}: no packing for weight method {wc.method!r}")
        unsigned = to_unsigned(wc.codes.cpu(), wc.method, wc.bits)
        if unsigned.numel() and int(unsigned.max()) > max_unsigned(wc.method, wc.bits):
            raise ValueError(f"{name}: codes out of range for {wc.method} {wc.bits}-bit")
        tensors[name + CODES] = pack_bits(unsigned, wc.bits)
        tensors[name + SCALE] = _cast(wc.scale, target, f"the scales of {name}", nonzero=True)
        if wc.zero_point is not None:
            tensors[name + ZERO_POINT] = wc.zero_point.cpu().to(torch.uint8).contiguous()
        manifest[name] = {
            "shape": list(wc.shape),
            "dtype": dtype_name(wc.scale.dtype),
            "stored": stored_dtype,
            "method": wc.method,
            "bits": wc.bits,
            "num_groups": wc.num_groups,
        }
    for name, t in plain.items():
        keep = name in exact or not t.is_floating_point()
        stored = t.dtype if keep else target
        tensors[name] = _cast(t, stored, name)
        manifest[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "stored": dtype_name(stored)}
    meta = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "stored_dtype": json.dumps(stored_dtype),
        "tensors": _json(manifest),
        **{k: _json(v) for k, v in metadata.items()},
    }
    meta["sha256"] = _digest(meta, tensors)
    with atomic_path(path) as tmp:
        write_safetensors(tmp, tensors, meta)


# safetensors' dtype names
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file in one fixed order: the same model gives the same bytes.

    (``safetensors.torch.save_file`` writes ``__metadata__`` in hash order, which changes from
    process to process.) Layout, as the safetensors spec: an 8-byte little-endian header length,
    the JSON header (``__metadata__`` then the tensors, keys sorted, padded with spaces to a
    multiple of 8), then each tensor's little-endian bytes in name order.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _cast(t: Tensor, dtype: torch.dtype, what: str, nonzero: bool = False) -> Tensor:
    """A contiguous copy of ``t`` in ``dtype``; refuses values the narrower dtype cannot hold.

    Non-finite values (NaN, inf: a diverged model) are refused, so is overflow (finite -> inf);
    with ``nonzero`` also underflow to 0 (a scale that vanishes would zero its whole group).
    """
    t = t.detach().cpu()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{what}: non-finite values (NaN/inf) cannot be stored in a packed file")
    out = t.to(dtype=dtype, copy=True).contiguous()
    if t.is_floating_point() and dtype != t.dtype:
        finite = torch.isfinite(t)
        overflow = finite & ~torch.isfinite(out)
        underflow = (t != 0) & (out == 0) if nonzero else torch.zeros((), dtype=torch.bool)
        if overflow.any() or underflow.any():
            worst = float(t[finite].abs().max()) if overflow.any() else float(t[underflow].abs().min())
            raise UserError(
                f"{what}: |value| {worst:.3g} does not fit {dtype_name(dtype)}; "
                f"export with other_dtype=float32 (or bfloat16)"
            )
    return out


def _digest(meta: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> PackedHeader:
    """Open a packed file and check everything but the digest: format, version, tensor table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"packed file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
            stored = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                s = f.get_slice(key)
                stored[key] = (s.get_dtype(), tuple(s.get_shape()))
    except Exception as err:  # safetensors raises its own error type, or OSError / ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {first}") from None
    if raw.get("format") != FORMAT:
        raise UserError(
            f"{path}: not an xtc packed file (no format={FORMAT} in its metadata); "
            f"a plain Hugging Face model file loads with from_pretrained"
        )
    if raw.get("format_version") != str(VERSION):
        raise UserError(
            f"{path}: packed format version {raw.get('format_version')!r} is not supported "
            f"(this reader reads version {VERSION})"
        )
    metadata = {"format": FORMAT, "format_version": VERSION}
    for key, value in raw.items():
        if key in ("format", "format_version", "sha256"):
            continue
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{path}: corrupt metadata entry '{key}' (not JSON)") from None
    if "sha256" not in raw or "tensors" not in metadata:
        raise UserError(f"{path}: incomplete packed file metadata (no sha256 or tensor manifest)")
    metadata["sha256"] = raw["sha256"]
    header = PackedHeader(path, metadata, stored, path.stat().st_size, dict(raw))
    _check_tensor_table(header)
    return header


def expected_tensors(name: str, entry: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stored key -> (header dtype, shape) that the manifest ``entry`` of tensor ``name`` implies."""
    shape = tuple(int(x) for x in entry["shape"])
    stored = _DTYPES[entry["stored"]][0]
    if "method" not in entry:
        return {name: (stored, shape)}
    numel, groups = math.prod(shape), int(entry["num_groups"])
    out = {
        name + CODES: ("U8", (packed_nbytes(numel, int(entry["bits"])),)),
        name + SCALE: (stored, (groups,)),
    }
    if entry["method"] == "asymmetric":
        out[name + ZERO_POINT] = ("U8", (groups,))
    return out


def _check_tensor_table(header: PackedHeader) -> None:
    where = header.path
    manifest = header.manifest
    if not isinstance(manifest, dict):
        raise UserError(f"{where}: corrupt tensor manifest")
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in manifest.items():
        try:
            _check_entry(entry)
            expected.update(expected_tensors(name, entry))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: corrupt manifest entry for tensor '{name}': {entry!r}") from None
    missing = [k for k in expected if k not in header.stored]
    if missing:
        raise UserError(f"{where}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    unexpected = [k for k in header.stored if k not in expected]
    if unexpected:
        raise UserError(f"{where}: unexpected tensor '{unexpected[0]}' (not in the manifest)")
    for key, (dtype, shape) in expected.items():
        got_dtype, got_shape = header.stored[key]
        if (got_dtype, got_shape) != (dtype, shape):
            raise UserError(
                f"{where}: tensor '{key}' is {got_dtype} {list(got_shape)} but the manifest says "
                f"{dtype} {list(shape)}"
            )


def _check_entry(entry: Mapping) -> None:
    if entry["dtype"] not in _DTYPES or entry["stored"] not in _DTYPES:
        raise ValueError(entry)
    if any(not isinstance(x, int) or x < 0 for x in entry["shape"]):
        raise ValueError(entry)
    if "method" in entry:
        method, bits, groups = entry["method"], entry["bits"], entry["num_groups"]
        if method not in WEIGHT_METHODS or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(entry)
        if not isinstance(groups, int) or groups < 1 or math.prod(entry["shape"]) % groups:
            raise ValueError(entry)


def read_packed(path: str | Path) -> PackedFile:
    """Read and verify a packed file: header checks, digest, then unpack the codes."""
    header = read_header(path)
    try:
        with safe_open(str(header.path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise UserError(f"{header.path}: cannot read the tensors: {str(err).splitlines()[0]}") from None
    if _digest(header.raw_metadata, tensors) != header.metadata["sha256"]:
        raise UserError(
            f"{header.path}: checksum mismatch: the file was modified or corrupted after it was written"
        )
    weights, plain = {}, {}
    for name, entry in header.manifest.items():
        dtype = _DTYPES[entry["dtype"]][1]
        if "method" not in entry:
            plain[name] = tensors[name].to(dtype)
            continue
        method, bits, shape = entry["method"], entry["bits"], tuple(entry["shape"])
        unsigned = unpack_bits(tensors[name + CODES], bits, math.prod(shape))
        if unsigned.numel() and int(unsigned.max()) > max_unsigned(method, bits):
            raise UserError(f"{header.path}: tensor '{name}' has codes out of range for {method} {bits}-bit")
        zero_point = tensors.get(name + ZERO_POINT)
        scale = tensors[name + SCALE].to(dtype)
        if not bool(torch.isfinite(scale).all()):
            raise UserError(f"{header.path}: tensor '{name}' has non-finite scales (NaN/inf)")
        weights[name] = WeightCodes(
            codes=from_unsigned(unsigned, method, bits).reshape(shape),
            scale=scale,
            zero_point=zero_point,
            method=method,
            bits=bits,
            num_groups=entry["num_groups"],
        )
    return PackedFile(header, weights, plain)

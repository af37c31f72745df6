"""What is quantized in a model: rows for logs / results.json and a plain-text table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from xtc_lightning.quant.layers import QuantEmbedding, QuantLinear


@dataclass(frozen=True)
class QuantSummary:
    """``rows``: one dict per quantized module; ``params_by_bits``: parameter count per bit-width.

    Quantized weights count at their weight bits; everything else (biases, LayerNorms,
    position embeddings, pooler, classifier, unquantized weights) at its storage width
    (32 for fp32). Scales and zero points are not parameters and are not counted.
    """

    rows: list[dict]
    params_by_bits: dict[int, int]
    text: str


def quantization_summary(model: nn.Module) -> QuantSummary:
    rows = []
    bits_of_param: dict[int, int] = {}  # id(parameter) -> bits
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear | QuantEmbedding):
            continue
        w, a = m.weight_spec, getattr(m, "activation_spec", None)
        rows.append(
            {
                "module": name,
                "kind": "linear" if isinstance(m, QuantLinear) else "embedding",
                "shape": list(m.weight.shape),
                "weight_method": w.method,
                "weight_bits": w.bits,
                "groups": w.groups if w.enabled else None,
                "activation_method": a.method if a else "none",
                "activation_bits": a.bits if a else 32,
                "activation_range": a.range if a and a.enabled else None,
                "enabled": m.quant_enabled,
            }
        )
        if w.enabled:
            bits_of_param[id(m.weight)] = w.bits
    counts: dict[int, int] = {}
    seen = set()
    for p in model.parameters():  # each shared Parameter once
        if id(p) in seen:
            continue
        seen.add(id(p))
        bits = bits_of_param.get(id(p), p.element_size() * 8)
        counts[bits] = counts.get(bits, 0) + p.numel()
    params_by_bits = dict(sorted(counts.items()))
    return QuantSummary(rows=rows, params_by_bits=params_by_bits, text=_render(rows, params_by_bits))


def _render(rows: list[dict], params_by_bits: dict[int, int]) -> str:
    header = ["module", "shape", "weight", "groups", "activation"]
    table = [
        [
            r["module"],
            "x".join(map(str, r["shape"])),
            f"{r['weight_method']} {r['weight_bits']}b",
            str(r["groups"] if r["groups"] is not None else "-"),
            f"{r['activation_method']} {r['activation_bits']}b"
            + (f" {r['activation_range']}" if r["activation_range"] else ""),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *table]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no quantized modules)")
    total = sum(params_by_bits.values())
    lines.append(
        "parameters by bit-width: "
        + ", ".join(f"{b}-bit {n:,} ({100 * n / max(total, 1):.1f}%)" for b, n in params_by_bits.items())
    )
    return "\n".join(lines)

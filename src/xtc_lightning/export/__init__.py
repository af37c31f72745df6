"""Packed low-bit export of quantized students, loading them back, and evaluating them.

    packing.py    pure bit packing of weight codes (1..8 bits, ternary in 2)
    format.py     the packed safetensors file: layout, metadata, integrity checks
    size.py       SizeReport: bytes per component, theoretical bound, compression ratio
    layers.py     PackedLinear / PackedEmbedding: quantized layers using their stored codes
    packed.py     export_packed / load_packed: model <-> packed file (+ tokenizer folder)
    hf.py         export_hf: plain HF folder with dequantized weights
    hf_packed.py  export_hf_packed: transformers folder with packed weights (the "xtc" quantizer)
    card.py       model_card: the folder's README.md (HF model card)
    onnx_export.py  export_onnx: an ONNX model keeping the low-bit structure (``xtc-export --onnx``)
    evaluate.py   evaluate_packed, ``xtc-evaluate``: dev metrics from the packed file alone
    run.py        export_run, ``xtc-export``: export a finished run folder

Typical use::

    report = export_packed(student, "out/model.safetensors", quant_cfg=quant, task="rte",
                           tokenizer=tokenizer, max_length=128, eval_batch_size=64)
    print(report.text())
    model = load_packed("out/model.safetensors")   # same predictions as ``student``
"""

import importlib

# Each public name and the module that defines it, imported on first use (PEP 562): importing one
# submodule (``format`` for a config check, ``hf_packed`` to register the "xtc" quantizer) does not
# import them all, and with them Lightning (``evaluate``), which takes seconds to import.
_WHERE = {
    "evaluate_packed": "evaluate",
    "PackedFile": "format",
    "read_packed": "format",
    "write_packed": "format",
    "export_hf": "hf",
    "export_hf_packed": "hf_packed",
    "PackedEmbedding": "layers",
    "PackedLinear": "layers",
    "export_packed": "packed",
    "load_packed": "packed",
    "load_packed_tokenizer": "packed",
    "packed_metadata": "packed",
    "tokenizer_dir": "packed",
    "export_run": "run",
    "SizeReport": "size",
    "size_report": "size",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "PackedEmbedding",
    "PackedFile",
    "PackedLinear",
    "SizeReport",
    "evaluate_packed",
    "export_hf",
    "export_hf_packed",
    "export_packed",
    "export_run",
    "load_packed",
    "load_packed_tokenizer",
    "packed_metadata",
    "read_packed",
    "size_report",
    "tokenizer_dir",
    "write_packed",
]

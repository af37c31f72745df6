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

from xtc_lightning.export.evaluate import evaluate_packed
from xtc_lightning.export.format import PackedFile, read_packed, write_packed
from xtc_lightning.export.hf import export_hf
from xtc_lightning.export.hf_packed import export_hf_packed
from xtc_lightning.export.layers import PackedEmbedding, PackedLinear
from xtc_lightning.export.packed import (
    export_packed,
    load_packed,
    load_packed_tokenizer,
    packed_metadata,
    tokenizer_dir,
)
from xtc_lightning.export.run import export_run
from xtc_lightning.export.size import SizeReport, size_report

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

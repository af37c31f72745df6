"""Deployment formats of the runtime model: torch.export (and ONNX Runtime, below)."""

from __future__ import annotations

import pytest
import torch

from test_runtime import close, inputs, packed_w1a8
from xtc_lightning.export.runtime import load_runtime

# ----------------------------------------------------------------------------- torch.export


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_torch_export_of_the_runtime_with_dynamic_batch_and_length(attn, tmp_path):
    path = packed_w1a8(tmp_path)
    runtime = load_runtime(path, attn_implementation=attn, compile=False)
    padded = load_runtime(path, attn_implementation=attn, compile=False, unpad=False)
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2, max=64)
    x = inputs(4, 12, 0)
    program = torch.export.export(
        runtime,
        (),
        {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]},
        dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
    )
    assert any(n.target == torch.ops.aten._int_mm.default for n in program.graph.nodes)  # integer GEMMs kept
    exported = program.module()
    with torch.inference_mode():
        for n, length_, seed in ((1, 9, 1), (7, 30, 2), (3, 64, 3)):  # other batch sizes and lengths
            x = inputs(n, length_, seed)
            out = exported(**x).logits
            assert torch.equal(out, padded(**x).logits)  # the runtime's padded forward, bit for bit
            ref = runtime(**x).logits  # the runtime (padding skipped): the same up to float rounding
            close(out, ref)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))

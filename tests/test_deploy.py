"""Deployment formats of the runtime model: torch.export (and ONNX Runtime, below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_runtime import close, inputs, packed_w1a8
from xtc_lightning.inference import load_runtime
from xtc_lightning.quant import QuantConfig

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


# ----------------------------------------------------------------------------- ONNX Runtime


def onnx_case(tmp_path, name: str):
    """A packed tiny BERT quantized as ``test_export.CONFIGS[name]`` (or binary groups of 8 rows, linears only)."""
    from test_export import CONFIGS, tiny_model
    from xtc_lightning.export import export_packed

    cfg = CONFIGS.get(name) or QuantConfig.from_dict(
        {
            "name": name,
            "weight": {"method": "binary", "bits": 1, "groups": 8},
            "activation": {"method": "symmetric", "bits": 8},
        }
    )
    path = tmp_path / f"{name}.safetensors"
    export_packed(tiny_model(cfg), path, quant_cfg=cfg, task="rte", other_dtype="float32")
    return path


@pytest.mark.parametrize("name", ["w1a8", "w1a8-g8-linears", "w2a8-static"])
def test_onnx_model_keeps_the_integer_structure_and_agrees_with_the_packed_model(name, tmp_path):
    import onnx

    from test_export import batch
    from xtc_lightning.export import load_packed
    from xtc_lightning.export.onnx_export import export_onnx, onnx_logits, onnx_session

    packed = onnx_case(tmp_path, name)
    path = export_onnx(packed, tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    codes = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    values = set(np.unique(np.concatenate([onnx.numpy_helper.to_array(t).ravel() for t in codes])).tolist())
    assert values <= ({-1, 1} if "w1" in name else {-1, 0, 1}) and len(codes) == 12 + ("g8" not in name)
    reference = load_packed(packed)
    session = onnx_session(path)
    for seed, n, length in ((1, 6, 21), (2, 1, 5), (3, 9, 64)):
        x = batch(seed=seed, n=n, length=length)
        with torch.no_grad():
            ref = reference(**x).logits
        out = onnx_logits(session, x)
        close(out, ref)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    "name, message",
    [
        ("w3a4-asym", "needs symmetric activation quantization .*asymmetric 4b dynamic"),
        ("w4-tensor", "needs symmetric activation quantization .*: fp32"),
        ("w8a8-asym-static", "asymmetric up to 7 bits.*word_embeddings: asymmetric 8b"),
    ],
)
def test_onnx_export_refuses_unsupported_configs_with_one_line(name, message, tmp_path):
    from xtc_lightning.errors import UserError
    from xtc_lightning.export.onnx_export import export_onnx

    with pytest.raises(UserError, match=message) as err:
        export_onnx(onnx_case(tmp_path, name), tmp_path / "model.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "model.onnx").exists()

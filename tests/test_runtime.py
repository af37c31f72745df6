"""Low-bit CPU runtime: Int8Linear equals the fake-quant layer; optimize_for_inference keeps predictions."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from xtc_lightning.export import PackedLinear, export_packed, load_packed
from xtc_lightning.inference import Int8Linear, Int8ResidualNorm, load_runtime, optimize_for_inference
from xtc_lightning.inference.linear import _can_prepack, onednn_prepack
from xtc_lightning.inference.linear import _compiled as compiled_kernel
from xtc_lightning.quant import ActivationSpec, QuantConfig, QuantLinear, WeightSpec, apply_quantization, int8
from xtc_lightning.quant.int8 import quantize_per_token

A8 = ActivationSpec("symmetric", 8, "dynamic")
WEIGHTS = {
    "binary": WeightSpec("binary", 1, "row"),
    "ternary": WeightSpec("ternary", 2, "row"),
    "sym4": WeightSpec("symmetric", 4, "row"),
    "sym8": WeightSpec("symmetric", 8, "row"),
    "binary-tensor": WeightSpec("binary", 1, "tensor"),
    "binary-g3": WeightSpec("binary", 1, 3),  # 3 groups of whole rows (out = 9)
    "asym4": WeightSpec("asymmetric", 4, "row"),
}


def quant_linear(spec: WeightSpec, act: ActivationSpec, k: int, n: int, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear(nn.Linear(k, n), spec, act).eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # exact integer sums vs K rounded fp32 products: relative float error only
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("shape", [(1, 1, 37), (5, 23, 37), (64, 8, 37)])
def test_int8_linear_equals_fake_quant(name, shape):
    layer = quant_linear(WEIGHTS[name], A8, k=shape[-1], n=9)
    fast = Int8Linear.from_quant_linear(layer)
    assert fast is not None and fast.weight_int8.dtype == torch.int8
    x = torch.randn(shape) * 3
    x[0, 0] = 0  # an all-zero token: scale 1, codes 0
    with torch.inference_mode():
        close(fast(x), layer(x))


def test_compiled_quantizer_gives_the_eager_codes():
    x = torch.randn(50, 37) * 5
    x[3] = 0
    with torch.inference_mode():
        for qmax in (127, 7):
            codes, scale = compiled_kernel("quantize")(x, qmax)
            ref_codes, ref_scale = quantize_per_token(x, qmax)
            assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_siblings_run_as_one_gemm_with_bit_identical_outputs():
    layers = nn.ModuleDict(
        {
            k: quant_linear(WEIGHTS["binary"], A8, 16, n, seed=i)
            for i, (k, n) in enumerate(zip("qkv", (8, 8, 12), strict=True))
        }
    )
    parent = nn.Sequential(layers)
    ref = {k: m for k, m in layers.items()}
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        expected = {k: m(x) for k, m in ref.items()}
        separate = {k: Int8Linear.from_quant_linear(m)(x) for k, m in ref.items()}
        optimize_for_inference(parent, compile=False, prepack=False)
        fast = parent[0]
        group = fast["q"].siblings
        assert group is fast["k"].siblings is fast["v"].siblings and group.weight_int8.shape == (28, 16)
        assert [fast[k].columns for k in "qkv"] == [slice(0, 8), slice(8, 16), slice(16, 28)]
        for k in "qkv":
            out = fast[k](x)
            assert torch.equal(out, separate[k])  # exact int32 sums, elementwise rescale: same bits
            close(out, expected[k])
        assert group.x is x
        y = torch.randn(2, 5, 16)  # a new tensor is computed again
        assert torch.equal(fast["k"](y), Int8Linear.from_quant_linear(ref["k"])(y))
        assert group.x is y


def test_int8_linear_act4_and_static_range():
    for act in (ActivationSpec("symmetric", 4, "dynamic"), ActivationSpec("symmetric", 8, "static")):
        layer = quant_linear(WEIGHTS["ternary"], act, k=40, n=24)
        if act.range == "static":
            layer.train()
            layer(torch.randn(7, 40))
            layer.eval()
        fast = Int8Linear.from_quant_linear(layer)
        x = torch.randn(3, 11, 40) * 2
        with torch.inference_mode():
            close(fast(x), layer(x))


@pytest.mark.parametrize(
    "spec, act",
    [
        (WeightSpec("binary", 1, 36), A8),  # groups split rows (out = 24 rows)
        (WeightSpec("asymmetric", 8, "row"), A8),  # code - zero point needs 9 bits
        (WeightSpec("binary", 1, "row"), ActivationSpec("asymmetric", 8, "dynamic")),
        (WeightSpec("binary", 1, "row"), ActivationSpec("symmetric", 8, "static")),  # uncalibrated
    ],
)
def test_unsupported_layers_fall_back_unchanged(spec, act):
    layer = quant_linear(spec, act, k=24, n=24)
    assert Int8Linear.from_quant_linear(layer) is None
    model = nn.Sequential(layer)
    x = torch.randn(4, 24)
    with torch.inference_mode():
        before = model(x)
        optimize_for_inference(model)
        assert model[0] is layer and model.int8_summary == {"int8": [], "fallback": ["0"], "unpadded": False}
        assert torch.equal(model(x), before)


def tiny_bert(cfg: QuantConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=300,
        hidden_size=40,  # not a multiple of 8 / 16: any shape works
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=72,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    apply_quantization(model, cfg)
    return model.eval()


def inputs(n: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        pad = (3 * i) % (length - 1)
        if pad:
            mask[i, -pad:] = 0
            ids[i, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "method, bits, groups", [("binary", 1, "row"), ("ternary", 2, 8), ("symmetric", 4, "row")]
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_optimized_packed_model_keeps_predictions(method, bits, groups, attn, tmp_path):
    cfg = QuantConfig.from_dict(
        {
            "name": "q",
            "weight": {"method": method, "bits": bits, "groups": groups},
            "activation": {"method": "symmetric", "bits": 8},
            "word_embeddings": True,
        }
    )
    path = tmp_path / "m.safetensors"
    export_packed(tiny_bert(cfg), path, quant_cfg=cfg, task="mnli", other_dtype="float32")
    reference = load_packed(path)
    # both kernel paths: compiled + oneDNN prepacked GEMM, eager + torch._int_mm
    fast = load_runtime(path, attn_implementation=attn, compile=attn == "sdpa", prepack=attn == "sdpa")
    gemms = [m.siblings or m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert all((g.packed_weight is not None) == (attn == "sdpa") for g in gemms)
    assert not any(isinstance(m, PackedLinear) for m in fast.modules())
    assert len(fast.int8_summary["int8"]) == 12 and not fast.int8_summary["fallback"]
    with torch.inference_mode():
        for n, length, seed in ((1, 9, 0), (33, 17, 1), (8, 64, 2)):
            x = inputs(n, length, seed)
            ref, out = reference(**x).logits, fast(**x).logits
            close(out, ref)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_fallback_layer_in_a_model_is_exact(tmp_path):
    """Groups that split rows: every linear stays a PackedLinear, logits are bit-identical (eager)."""
    cfg = QuantConfig.from_dict(
        {
            "name": "q",
            "weight": {"method": "binary", "bits": 1, "groups": 160},  # 40x40: 10 per row, splits rows
            "activation": {"method": "symmetric", "bits": 8},
            "targets": ["query", "key", "value", "attention_output"],
        }
    )
    path = tmp_path / "m.safetensors"
    export_packed(tiny_bert(cfg), path, quant_cfg=cfg, task="mnli", other_dtype="float32")
    reference = load_packed(path)
    fast = load_runtime(path, attn_implementation="eager", unpad=False)
    assert fast.int8_summary == {"int8": [], "fallback": fast.int8_summary["fallback"], "unpadded": False}
    assert len(fast.int8_summary["fallback"]) == 8
    with torch.inference_mode():
        x = inputs(4, 12, 3)
        assert torch.equal(fast(**x).logits, reference(**x).logits)


def packed_w1a8(tmp_path) -> Path:
    cfg = QuantConfig.from_dict(
        {
            "name": "w1a8",
            "weight": {"method": "binary", "bits": 1},
            "activation": {"method": "symmetric", "bits": 8},
            "word_embeddings": True,
        }
    )
    path = tmp_path / "m.safetensors"
    export_packed(tiny_bert(cfg), path, quant_cfg=cfg, task="mnli", other_dtype="float32")
    return path


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpadded_forward_equals_the_padded_one_and_runs_only_real_tokens(attn, tmp_path):
    path = packed_w1a8(tmp_path)
    padded = load_runtime(path, attn_implementation=attn, compile=False, unpad=False)
    fast = load_runtime(path, attn_implementation=attn, compile=False)
    assert fast.int8_summary["unpadded"] and not padded.int8_summary["unpadded"]
    rows = []
    fast.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape)
    )
    with torch.inference_mode():
        for n, length, seed in ((1, 9, 0), (33, 17, 1), (8, 64, 2)):
            x = inputs(n, length, seed)
            x["token_type_ids"] = (torch.arange(length) >= length // 2).long().expand(n, -1).clone()
            ref, out = padded(**x).logits, fast(**x).logits
            close(out, ref)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
            assert rows[-1] == (1, int(x["attention_mask"].sum()), 40)  # the packed real tokens only


def test_unpadded_forward_ignores_trailing_padding_and_falls_back_for_left_padding(tmp_path):
    path = packed_w1a8(tmp_path)
    fast = load_runtime(path, compile=False)
    padded = load_runtime(path, compile=False, unpad=False)
    x = inputs(6, 12, 4)
    wide = {k: torch.cat([v, torch.zeros(6, 30, dtype=v.dtype)], dim=1) for k, v in x.items()}
    with torch.inference_mode():
        assert torch.equal(fast(**x).logits, fast(**wide).logits)  # the same computation, bit for bit
        # left padding: the pooler's first token is a pad, so the model's own forward runs
        left = {k: v.flip(1) for k, v in x.items()}
        assert torch.equal(fast(**left).logits, padded(**left).logits)
        assert torch.equal(fast(input_ids=x["input_ids"]).logits, padded(input_ids=x["input_ids"]).logits)


@pytest.mark.parametrize("name", ["binary", "sym8", "asym4"])
def test_onednn_prepacked_gemm_gives_the_int_mm_output_bit_for_bit(name):
    assert _can_prepack(1)  # torch's CPU build has oneDNN's int8 linear: the fast path must be live here
    layer = quant_linear(WEIGHTS[name], A8, k=37, n=9)
    plain, packed = Int8Linear.from_quant_linear(layer), Int8Linear.from_quant_linear(layer)
    if not _can_prepack(packed.code_max):
        # a CPU without VNNI adds product pairs in int16 with saturation: only 8-bit codes can overflow it
        assert name == "sym8" and _can_prepack(64) and not _can_prepack(127)
        return
    packed.packed_weight = onednn_prepack(packed.weight_int8)
    x = torch.randn(5, 23, 37) * 3
    with torch.inference_mode():
        out = packed(x)
        assert torch.equal(out, plain(x))  # exact int32 sums, the same fp32 products
        close(out, layer(x))


@pytest.mark.parametrize("name", ["binary", "sym8"])
def test_the_runtime_gemm_is_the_same_on_either_integer_route(name, monkeypatch):
    layer = quant_linear(WEIGHTS[name], A8, k=37, n=9)
    fast = Int8Linear.from_quant_linear(layer)
    x = torch.randn(5, 23, 37) * 3
    outs = []
    for route in (True, False):  # torch._int_mm, then the float GEMM over the same codes
        monkeypatch.setattr(int8, "int_mm_faster", lambda device_type, route=route: route)
        with torch.inference_mode():
            outs.append(fast(x))
    assert torch.equal(*outs)
    close(outs[0], layer(x))


def test_gelu_and_residual_norm_run_in_the_int8_epilogue(tmp_path):
    path = packed_w1a8(tmp_path)
    reference = load_packed(path)
    for compile in (False, True):
        fast = load_runtime(path, compile=compile)
        layer = fast.bert.encoder.layer[0]
        assert layer.intermediate.dense.gelu and isinstance(
            layer.intermediate.intermediate_act_fn, nn.Identity
        )
        assert isinstance(layer.output, Int8ResidualNorm) and isinstance(
            layer.attention.output, Int8ResidualNorm
        )
        assert {k for k in fast.state_dict() if "LayerNorm" in k} == {
            k for k in reference.state_dict() if "LayerNorm" in k
        }
        with torch.inference_mode():
            x = torch.randn(2, 7, 40)
            r = reference.bert.encoder.layer[0]
            mid, got = r.intermediate(x), layer.intermediate(x)
            if compile:  # the GELU output's int8 codes, handed to layer.output.dense (fold_quantize)
                assert got.dtype == torch.int8 and layer.output.dense.fed.slot[0] is got
            else:
                close(got, mid)
            close(layer.output(got, x), r.output(mid, x))
            for n, length, seed in ((1, 9, 0), (33, 17, 1)):
                xs = inputs(n, length, seed)
                ref, out = reference(**xs).logits, fast(**xs).logits
                close(out, ref)
                assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_small_inputs_keep_the_thread_count_and_full_rows_skip_the_scatter(tmp_path):
    path = packed_w1a8(tmp_path)
    fast = load_runtime(path, compile=False)
    padded = load_runtime(path, compile=False, unpad=False)
    seen = []
    fast.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, args, out: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            small = inputs(2, 9, 0)  # a few real tokens: no longer switched to one thread
            close(fast(**small).logits, padded(**small).logits)
            full = inputs(1, 128, 1)
            full = {k: v[:, :40].repeat(3, 1) for k, v in full.items()}  # 120 real tokens, no padding
            assert bool(full["attention_mask"].all())
            close(fast(**full).logits, padded(**full).logits)
            assert seen == [2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bit_packed_rows_round_trip_every_width():
    from xtc_lightning.inference.bitrows import pack_rows, unpack_rows

    g = torch.Generator().manual_seed(0)
    for method, bits, lo, hi in (
        ("binary", 1, 0, 2),
        ("ternary", 2, -1, 2),
        ("symmetric", 3, -3, 4),
        ("symmetric", 8, -127, 128),
    ):
        codes = torch.randint(lo, hi, (7, 13), generator=g, dtype=torch.int8)
        if method == "binary":
            codes = codes * 2 - 1
        packed = pack_rows(codes, method, bits)
        assert packed.dtype == torch.uint8 and packed.shape[0] == 7
        assert torch.equal(unpack_rows(packed, method, bits, 13), codes)
        assert torch.equal(unpack_rows(packed[[5, 0, 5]], method, bits, 13), codes[[5, 0, 5]])
    assert pack_rows(torch.ones(4, 384, dtype=torch.int8), "binary", 1).shape == (4, 48)  # 1 bit a code


@pytest.mark.parametrize("low_memory", [False, True])
def test_runtime_holds_bit_packed_codes_and_keeps_outputs(low_memory, tmp_path):
    from xtc_lightning.inference import runtime_bytes
    from xtc_lightning.inference.bitrows import BitRowsEmbedding

    path = packed_w1a8(tmp_path)
    reference = load_packed(path)
    plain = load_runtime(path, compile=False, prepack=False)
    fast = load_runtime(path, compile=False, low_memory=low_memory)
    emb = fast.bert.embeddings.word_embeddings
    assert isinstance(emb, BitRowsEmbedding) and emb.rows.shape == (300, 5)  # 40 binary codes in 5 bytes
    linears = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert all(m.weight_int8 is None and m.weight_bits.dtype == torch.uint8 for m in linears)
    assert all((m.siblings or m).packed_weight is None for m in linears) == low_memory
    assert runtime_bytes(plain) < runtime_bytes(reference) and runtime_bytes(fast) < runtime_bytes(reference)
    # low memory: bits only; default: bits + the prepacked int8 copy (more than plain's int8 alone)
    assert (runtime_bytes(fast) < runtime_bytes(plain)) == low_memory
    copied = copy.deepcopy(fast)  # the prepacked oneDNN weights (opaque tensors) are shared, not copied
    with torch.inference_mode():
        ids = torch.randint(0, 300, (3, 11))
        assert torch.equal(emb(ids), reference.bert.embeddings.word_embeddings(ids))  # bit for bit
        for n, length, seed in ((1, 9, 0), (33, 17, 1)):
            x = inputs(n, length, seed)
            out, ref = fast(**x).logits, plain(**x).logits
            assert torch.equal(out, ref)  # the same codes and GEMM results, whatever holds them
            assert torch.equal(copied(**x).logits, out)
            close(out, reference(**x).logits)


def epilogue_inputs(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMM output ``y`` and token scales of real width, with the quantizer's edge cases in rows 0-3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(m, n, generator=g) * 4
    a_scale = torch.rand(m, 1, generator=g) + 0.5
    a_scale[:3] = 1
    y[0] = 0  # an all-zero row: scale 1, codes 0
    y[1] = torch.arange(n) % 255 - 127.0  # max|y| = 127: scale 1, codes -127..127
    y[2] = (torch.arange(n) % 254 - 126.5) / 4  # scale 1/4 (y[2, 0] = 127/4): every code a tie k + 0.5
    y[2, 0] = 127 / 4
    y[3] = -y[3].abs()  # the maximum magnitude is negative
    return y, a_scale


@pytest.mark.parametrize("variant", ["gelu", "residual_norm", "plain"])
def test_epilogue_codes_are_the_epilogue_then_the_quantizer_exactly(variant):
    m, n = (261, 1536) if variant == "gelu" else (261, 384)  # MiniLM widths, rows not a multiple of 16
    y, a_scale = epilogue_inputs(m, n, seed=0)
    g = torch.Generator().manual_seed(1)
    bias = None if variant == "plain" else torch.randn(n, generator=g)  # plain: y[2]'s ties stay ties
    residual = torch.randn(m, n, generator=g) if variant == "residual_norm" else None
    norm = (
        (torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g), 1e-12)
        if residual is not None
        else None
    )
    gelu = variant == "gelu"
    with torch.inference_mode():
        # oneDNN route (fp32 sums times the row scale) and torch._int_mm route (int32 sums, row scale here)
        for sums, w_scale in ((y, None), (y.round().to(torch.int32), torch.ones(n))):
            args = (sums, w_scale, a_scale, bias, gelu, residual, norm)
            ref = compiled_kernel("epilogue")(*args)
            ref_codes, ref_scale = compiled_kernel("quantize")(ref, 127)
            z, codes, scale = compiled_kernel("epilogue_codes")(*args, 127, not gelu)
            assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
            assert z is None if gelu else torch.equal(z, ref)
            if variant == "plain" and w_scale is None:
                assert not codes[0].any() and torch.equal(codes[1].float(), y[1])
                assert torch.equal(codes[2, 1:].float(), torch.round(y[2, 1:] * 4))  # half to even


def test_epilogues_hand_the_next_linear_its_codes_with_bit_equal_logits(tmp_path):
    path = packed_w1a8(tmp_path)
    fast, unfused = load_runtime(path), load_runtime(path)
    for m in unfused.modules():
        if isinstance(m, Int8Linear):
            m.feeds = m.fed = None
    layer, last = fast.bert.encoder.layer
    assert layer.attention.output.dense.feeds is layer.intermediate.dense.fed is not None
    assert layer.intermediate.dense.feeds is layer.output.dense.fed is not None
    assert layer.output.dense.feeds is last.attention.self.query.siblings.lead.fed is not None
    assert last.output.dense.feeds is None  # the pooler reads it: no int8 linear
    with torch.inference_mode():
        for n, length, seed in ((1, 9, 0), (33, 17, 1), (8, 64, 2)):
            x = inputs(n, length, seed)
            assert torch.equal(fast(**x).logits, unfused(**x).logits)
        codes = layer.intermediate(torch.randn(2, 7, 40))
        assert codes.dtype == torch.int8 and layer.output.dense.fed.slot[0] is codes
        with pytest.raises(RuntimeError, match="without their scale"):
            layer.output.dense(codes.clone())  # not the tensor handed over

"""Packed export: exact reload, integrity checks, size arithmetic, plain HF export, exporting a run."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, BertConfig

from xtc_lightning.errors import UserError
from xtc_lightning.export import (
    PackedEmbedding,
    PackedLinear,
    evaluate_packed,
    export_hf,
    export_packed,
    export_run,
    load_packed,
    load_packed_tokenizer,
    read_packed,
    size_report,
    tokenizer_dir,
    write_packed,
)
from xtc_lightning.export import format as packed_format
from xtc_lightning.quant import (
    ActivationSpec,
    QuantConfig,
    QuantLinear,
    WeightSpec,
    apply_quantization,
    quantization_summary,
    set_quantization_enabled,
    weight_codes,
)
from xtc_lightning.results import read_record

VOCAB = 300


def quant(weight: dict, activation: dict | None = None, name: str = "q") -> QuantConfig:
    return QuantConfig.from_dict(
        {"name": name, "weight": weight, "activation": activation or {}, "word_embeddings": True}
    )


CONFIGS = {
    "w1a8": quant({"method": "binary", "bits": 1}, {"method": "symmetric", "bits": 8}),
    "w1a8-g8": quant({"method": "binary", "bits": 1, "groups": 8}, {"method": "symmetric", "bits": 8}),
    "w2a8-static": quant(
        {"method": "ternary", "bits": 2}, {"method": "symmetric", "bits": 8, "range": "static"}
    ),
    "w3a4-asym": quant({"method": "asymmetric", "bits": 3}, {"method": "asymmetric", "bits": 4}),
    "w4-tensor": quant({"method": "symmetric", "bits": 4, "groups": "tensor"}),
    "w8a8-asym-static": quant(
        {"method": "asymmetric", "bits": 8}, {"method": "asymmetric", "bits": 8, "range": "static"}
    ),
    # mixed precision: 8-bit query/key and ternary word embeddings, binary elsewhere
    "w1a8-mixed": QuantConfig.from_dict(
        {
            "name": "w1a8-mixed",
            "weight": {"method": "binary"},
            "activation": {"method": "symmetric", "bits": 8},
            "word_embeddings": True,
            "weight_by_target": {
                "query": {"method": "symmetric", "bits": 8},
                "key": {"method": "symmetric", "bits": 8},
                "word_embeddings": {"method": "ternary"},
            },
        }
    ),
}


def tiny_model(cfg: QuantConfig | None, seed: int = 0, num_labels: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    if cfg is not None:
        apply_quantization(model, cfg)
        if cfg.activation.range == "static":  # calibrate the ranges with two training-mode batches
            model.train()
            with torch.no_grad():
                for s in range(2):
                    model(**batch(seed=s))
    return model.eval()


def batch(seed: int = 1, n: int = 6, length: int = 21) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # padded rows of various lengths
        mask[i, length - 3 * i :] = 0
        ids[i, length - 3 * i :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


# ----------------------------------------------------------------------------- exact reload


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_export_reloads_bit_exactly(name, tmp_path):
    cfg = CONFIGS[name]
    model = tiny_model(cfg)
    path = tmp_path / "model.safetensors"
    export_packed(model, path, quant_cfg=cfg, task="rte", other_dtype="float32")
    loaded = load_packed(path)
    assert not loaded.training
    for inputs in (batch(1), batch(2, n=3, length=9)):
        assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    packed_linears = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed_linears) == 12 and sum(isinstance(m, PackedEmbedding) for m in loaded.modules()) == 1
    # stored codes are the original model's codes, and the summary sees the same bit-widths
    q = model.bert.encoder.layer[1].output.dense
    restored = loaded.bert.encoder.layer[1].output.dense
    assert torch.equal(restored.codes.codes, weight_codes(q.weight, q.weight_spec).codes)
    assert quantization_summary(loaded).params_by_bits == quantization_summary(model).params_by_bits
    if cfg.activation.range == "static":
        assert torch.equal(restored.act_range, q.act_range) and not torch.isnan(q.act_range).any()


def test_quantized_pooler_is_packed_at_one_bit_and_reloads_bit_exactly(tmp_path):
    base = tiny_model(None)
    cfg = QuantConfig.from_dict(
        {"name": "w1a8-pooler", "weight": {"method": "binary"}, "activation": {"method": "symmetric", "bits": 8},
         "word_embeddings": True, "pooler": True}
    )  # fmt: skip
    sizes = {}
    for pooler in (False, True):
        model = tiny_model(None)
        model.load_state_dict(base.state_dict())
        apply_quantization(model, cfg if pooler else CONFIGS["w1a8"])
        path = tmp_path / f"pooler-{pooler}.safetensors"
        sizes[pooler] = export_packed(model.eval(), path, quant_cfg=cfg if pooler else CONFIGS["w1a8"],
                                      task="rte", other_dtype="float32")  # fmt: skip
    loaded = load_packed(path)
    assert isinstance(loaded.bert.pooler.dense, PackedLinear)
    assert torch.equal(logits(loaded, batch(1)), logits(model, batch(1)))
    # the 32x32 pooler weight moves from 4 fp32 bytes per weight to 1 bit per weight + 32 fp32 row scales
    off, on = sizes[False], sizes[True]
    assert off.other_bytes - on.other_bytes == 32 * 32 * 4
    assert on.packed_weight_bytes - off.packed_weight_bytes == 32 * 32 // 8
    assert on.scale_bytes - off.scale_bytes == 32 * 4
    assert on.quantized_params - off.quantized_params == 32 * 32


def test_requantizing_dequantized_weights_is_not_exact_so_stored_codes_are_used():
    """Why the loaded layers do not re-quantize: mean(|w|) of a dequantized row is off by an ulp."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    for spec in (WeightSpec("binary", 1, "row"), WeightSpec("ternary", 2, "row")):
        first = weight_codes(w, spec)
        from xtc_lightning.quant import dequantize_weight

        again = weight_codes(dequantize_weight(first), spec)
        assert torch.equal(again.codes, first.codes)
        assert not torch.equal(again.scale, first.scale)  # fp32 rounding of the re-computed scale


def test_float16_export_is_close_and_reexport_is_stable(tmp_path):
    cfg = CONFIGS["w1a8"]
    model = tiny_model(cfg)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r16 = export_packed(model, first, quant_cfg=cfg, task="rte")
    r32 = export_packed(model, tmp_path / "c.safetensors", quant_cfg=cfg, task="rte", other_dtype="float32")
    assert r16.other_bytes * 2 == r32.other_bytes and r16.scale_bytes * 2 == r32.scale_bytes
    loaded = load_packed(first)
    inputs = batch(3)
    assert torch.allclose(logits(loaded, inputs), logits(model, inputs), atol=1e-2)
    assert not torch.equal(logits(loaded, inputs), logits(model, inputs))  # fp16 rounding is visible
    # exporting the loaded model again reproduces the same tensors (codes reused, fp16 values stable)
    export_packed(loaded, second, quant_cfg=cfg, task="rte")
    a, b = read_packed(first), read_packed(second)
    assert a.plain.keys() == b.plain.keys() and a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.plain[k], b.plain[k]) for k in a.plain)
    assert all(torch.equal(a.weights[k].codes, b.weights[k].codes) for k in a.weights)
    assert all(torch.equal(a.weights[k].scale, b.weights[k].scale) for k in a.weights)


def test_unquantized_model_exports_with_fp32_config(tmp_path):
    model = tiny_model(None, num_labels=1)  # STS-B: one regression output
    report = export_packed(model, tmp_path / "m.safetensors", quant_cfg=QuantConfig(), task="stsb")
    assert report.quantized_params == 0 and report.packed_weight_bytes == 0
    loaded = load_packed(tmp_path / "m.safetensors")
    assert torch.allclose(logits(loaded, batch()), logits(model, batch()), atol=1e-2)


def test_metadata_holds_config_quant_task_and_tensor_shapes(tmp_path):
    cfg = CONFIGS["w3a4-asym"]
    export_packed(tiny_model(cfg, num_labels=3), tmp_path / "m.safetensors", quant_cfg=cfg, task="mnli")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "xtc-packed" and meta["format_version"] == "1" and len(meta["sha256"]) == 64
    assert json.loads(meta["task"]) == "mnli"
    assert json.loads(meta["labels"]) == ["entailment", "neutral", "contradiction"]
    assert QuantConfig.from_dict(json.loads(meta["quant"])) == cfg
    assert json.loads(meta["model_config"])["hidden_size"] == 32
    entry = json.loads(meta["tensors"])["bert.embeddings.word_embeddings.weight"]
    assert entry == {
        "shape": [VOCAB, 32],
        "dtype": "float32",
        "stored": "float16",
        "method": "asymmetric",
        "bits": 3,
        "num_groups": VOCAB,
    }


# ----------------------------------------------------------------------------- refusing bad input


def test_export_refuses_inconsistent_models(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(UserError, match="has no quantized modules"):
        export_packed(tiny_model(None), out, quant_cfg=CONFIGS["w1a8"], task="rte")
    with pytest.raises(UserError, match="not as quant config"):
        export_packed(tiny_model(CONFIGS["w1a8"]), out, quant_cfg=CONFIGS["w2a8-static"], task="rte")
    off = tiny_model(CONFIGS["w1a8"])
    set_quantization_enabled(off, False)
    with pytest.raises(UserError, match="switched off in 13 module"):
        export_packed(off, out, quant_cfg=CONFIGS["w1a8"], task="rte")
    with pytest.raises(UserError, match="other_dtype='int8' is not accepted"):
        export_packed(tiny_model(None), out, quant_cfg=QuantConfig(), task="rte", other_dtype="int8")
    with pytest.raises(UserError, match="must end with .safetensors"):
        export_packed(tiny_model(None), tmp_path / "m.bin", quant_cfg=QuantConfig(), task="rte")
    big = tiny_model(None)
    with torch.no_grad():
        big.classifier.weight[0, 0] = 1e6
    with pytest.raises(UserError, match=r"classifier.weight: \|value\| 1e\+06 does not fit float16"):
        export_packed(big, out, quant_cfg=QuantConfig(), task="rte")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture
def packed_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    export_packed(tiny_model(CONFIGS["w1a8"]), path, quant_cfg=CONFIGS["w1a8"], task="rte")
    return path


def rewrite_packed(path: Path, out: Path, edit_tensors=None, edit_meta=None, resign: bool = False) -> Path:
    """Copy a packed file through safetensors, editing its tensors / metadata. The digest is kept as
    is, or with ``resign`` recomputed, as someone editing the file on purpose would."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if resign:
        meta["sha256"] = packed_format._digest(meta, tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def _refused(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        load_packed(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file_is_refused(packed_file, tmp_path):
    data = packed_file.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 100, 4):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _refused(bad, "not a readable safetensors file")


def test_flipped_payload_bit_is_refused(packed_file, tmp_path):
    data = bytearray(packed_file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for offset in (header_end, (header_end + len(data)) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        bad = tmp_path / f"flip{offset}.safetensors"
        bad.write_bytes(bytes(flipped))
        _refused(bad, "checksum mismatch")


def test_modified_metadata_is_refused(packed_file, tmp_path):
    data = packed_file.read_bytes()
    assert data.count(b'\\"gelu\\"') == 1  # inside the model_config JSON string
    bad = tmp_path / "relu.safetensors"
    bad.write_bytes(data.replace(b'\\"gelu\\"', b'\\"relu\\"'))
    _refused(bad, "checksum mismatch")


def test_missing_and_misshapen_tensors_are_refused(packed_file, tmp_path):
    name = "bert.encoder.layer.0.attention.self.query.weight:codes"
    missing = rewrite_packed(packed_file, tmp_path / "missing.safetensors", lambda t: t.pop(name))
    _refused(missing, f"missing tensor '{name}'")
    extra = rewrite_packed(
        packed_file, tmp_path / "extra.safetensors", lambda t: t.update(stray=torch.zeros(2))
    )
    _refused(extra, "unexpected tensor 'stray'")

    def reshape(t):
        t["classifier.weight"] = t["classifier.weight"][:, :-1].contiguous()

    _refused(
        rewrite_packed(packed_file, tmp_path / "shape.safetensors", reshape),
        r"tensor 'classifier.weight' is F16 \[2, 31\] but the manifest says F16 \[2, 32\]",
    )


def test_unknown_version_and_foreign_files_are_refused(packed_file, tmp_path):
    v2 = rewrite_packed(
        packed_file, tmp_path / "v2.safetensors", edit_meta=lambda m: m.update(format_version="2")
    )
    _refused(v2, "packed format version '2' is not supported")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    _refused(plain, "not an xtc packed file")
    text = tmp_path / "text.safetensors"
    text.write_text("hello, I am not a model")
    _refused(text, "not a readable safetensors file")
    with pytest.raises(UserError, match="not found"):
        load_packed(tmp_path / "nothing.safetensors")


def test_consistent_file_that_does_not_fit_the_model_is_refused(tmp_path):
    """A file with a valid digest whose content does not match its own model metadata."""
    source = tiny_model(CONFIGS["w1a8"])
    export_packed(source, tmp_path / "ok.safetensors", quant_cfg=CONFIGS["w1a8"], task="rte")
    ok = read_packed(tmp_path / "ok.safetensors")
    keep = {k: ok.metadata[k] for k in ok.metadata if k not in packed_format.RESERVED + ("format_version",)}

    no_pooler = {k: v for k, v in ok.plain.items() if not k.startswith("bert.pooler.dense.weight")}
    write_packed(tmp_path / "a.safetensors", ok.weights, no_pooler, metadata=keep)
    _refused(tmp_path / "a.safetensors", "do not fit the rebuilt model: missing 'bert.pooler.dense.weight'")

    modules = [dict(m) for m in keep["modules"]]
    modules[0]["name"] = "bert.encoder.layer.7.attention.self.query"
    write_packed(tmp_path / "b.safetensors", ok.weights, ok.plain, metadata={**keep, "modules": modules})
    _refused(tmp_path / "b.safetensors", "'bert.encoder.layer.7.attention.self.query' does not exist")

    wider = {**keep, "model_config": {**keep["model_config"], "hidden_size": 64, "intermediate_size": 128}}
    write_packed(tmp_path / "c.safetensors", ok.weights, ok.plain, metadata=wider)
    _refused(tmp_path / "c.safetensors", "has shape")


def test_failed_write_leaves_the_previous_file(packed_file, monkeypatch):
    before = packed_file.read_bytes()

    def crash(filename, tensors, metadata):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(packed_format, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        export_packed(tiny_model(CONFIGS["w1a8"], seed=5), packed_file, quant_cfg=CONFIGS["w1a8"], task="rte")
    assert packed_file.read_bytes() == before
    assert sorted(p.name for p in packed_file.parent.iterdir()) == ["model.safetensors"]


# ----------------------------------------------------------------------------- size report


def test_size_report_arithmetic_by_hand(tmp_path):
    binary = weight_codes(torch.randn(3, 5), WeightSpec("binary", 1, "row"))  # 15 codes -> 2 B, 3 scales
    asym = weight_codes(
        torch.randn(4, 6), WeightSpec("asymmetric", 3, 2)
    )  # 24 x 3 bits = 9 B, 2 scales + 2 zp
    plain = {
        "ln.weight": torch.randn(7),
        "steps": torch.tensor([1, 2]),
        "x.act_range": torch.tensor([-1.0, 2.0]),
    }
    path = tmp_path / "hand.safetensors"
    write_packed(path, {"a": binary, "b": asym}, plain, metadata={"note": "hand"}, exact={"x.act_range"})
    r = size_report(path, teacher_bytes=10_000)
    assert r.packed_weight_bytes == 2 + 9
    assert r.scale_bytes == 3 * 2 + 2 * 2 + 2  # fp16 scales, uint8 zero points
    assert r.other_bytes == 7 * 2 + 2 * 8 + 2 * 4  # fp16 LayerNorm, int64 kept, fp32 range kept
    assert r.quantized_params == 39 and r.other_params == 11
    assert r.quantized_params_by_bits == {1: 15, 3: 24}
    assert r.bound_bytes == (15 * 1 + 24 * 3) / 8 + 12 + 38 == 60.875
    data = path.read_bytes()
    assert r.file_bytes == len(data) == 8 + int.from_bytes(data[:8], "little") + 11 + 12 + 38
    assert r.header_bytes == r.file_bytes - 61
    assert r.bound_ratio == r.file_bytes / 60.875 and r.teacher_ratio == 10_000 / r.file_bytes
    d = r.as_dict()
    assert d["quantized_params_by_bits"] == {"1": 15, "3": 24} and d["bound_bytes"] == 60.875
    assert type(r).from_dict(json.loads(json.dumps(d))) == r
    text = r.text()
    assert "packed weights" in text and f"{r.file_bytes:,} B" in text and "teacher / file" in text


def test_size_report_of_a_model_counts_every_parameter(tmp_path):
    cfg = CONFIGS["w1a8"]
    model = tiny_model(cfg)
    r = export_packed(model, tmp_path / "m.safetensors", quant_cfg=cfg, task="rte")
    total = sum(p.numel() for p in model.parameters())
    by_bits = quantization_summary(model).params_by_bits
    assert r.quantized_params == by_bits[1] and r.quantized_params + r.other_params == total
    assert r.packed_weight_bytes == sum(math.ceil(n / 8) for n in _quantized_sizes(model))
    # beyond the bound: the header, and under one byte of padding per packed tensor
    padding = r.file_bytes - r.header_bytes - r.bound_bytes
    assert 0 <= padding < len(_quantized_sizes(model))
    assert r.header_bytes == r.file_bytes - r.packed_weight_bytes - r.scale_bytes - r.other_bytes


def _quantized_sizes(model) -> list[int]:
    return [m.weight.numel() for m in model.modules() if hasattr(m, "weight_spec")]


# ----------------------------------------------------------------------------- plain HF export


def test_hf_export_equals_packed_model_for_weight_only_quantization(tmp_path):
    cfg = CONFIGS["w4-tensor"]  # activation method none
    packed = tmp_path / "m.safetensors"
    export_packed(tiny_model(cfg), packed, quant_cfg=cfg, task="rte")
    loaded = load_packed(packed)
    export_hf(loaded, tmp_path / "hf")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    inputs = batch(4)
    assert torch.equal(logits(plain.eval(), inputs), logits(loaded, inputs))


def test_hf_export_loses_activation_quantization(tmp_path):
    cfg = CONFIGS["w1a8"]
    model = tiny_model(cfg)
    export_hf(model, tmp_path / "hf")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    inputs = batch(4)
    a, b = logits(plain.eval(), inputs), logits(model, inputs)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=5e-2)
    for m in model.modules():  # the same model without activation quantization is the plain model
        if isinstance(m, QuantLinear):
            m.activation_spec = ActivationSpec()
    assert torch.equal(logits(plain.eval(), inputs), logits(model, inputs))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_saved_alongside_and_checked(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    path = tmp_path / "model.safetensors"
    cfg = CONFIGS["w1a8"]
    export_packed(tiny_model(cfg), path, quant_cfg=cfg, task="rte", tokenizer=tok)
    assert tokenizer_dir(path) == tmp_path / "model.tokenizer" and tokenizer_dir(path).is_dir()
    assert load_packed_tokenizer(path)("a test")["input_ids"] == tok("a test")["input_ids"]
    vocab = tokenizer_dir(path) / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(UserError, match="does not match the tokenizer this file was exported with"):
        load_packed_tokenizer(path)
    export_packed(tiny_model(cfg), tmp_path / "bare.safetensors", quant_cfg=cfg, task="rte")
    with pytest.raises(UserError, match="exported without a tokenizer"):
        load_packed_tokenizer(tmp_path / "bare.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, glue_dir, tiny_bert_dir):
    """A tiny teacher -> reduce -> quantize (W1A8) pipeline run on RTE."""
    from conftest import compose_job_config
    from xtc_lightning import pipeline

    root = tmp_path_factory.mktemp("export_run")
    cfg, _ = compose_job_config(
        [
            "task=rte",
            f"model.name_or_path={tiny_bert_dir}",
            "student.num_layers=1",
            "quant=binary",
            f"data.dir={glue_dir}",
            f"paths.root_dir={root}",
            "data.max_train_examples=64",
            "data.max_length=64",
            "trainer.max_epochs=1",
            "optim.lr=1e-3",
            "num_threads=1",
        ],  # fmt: skip
        root / "run",
    )
    from xtc_lightning.export import run as export_module

    rebuilt = []
    with pytest.MonkeyPatch.context() as mp:
        real = export_module.rebuild_final_model
        mp.setattr(export_module, "rebuild_final_model", lambda *a: rebuilt.append(a) or real(*a))
        pipeline.run(cfg)
    assert not rebuilt  # the pipeline exports its in-memory student, it rebuilds nothing
    # what the pipeline exported from its in-memory student, before the tests below re-export
    shutil.copytree(root / "run" / "export", root / "exported_by_the_pipeline")
    return root / "run"


def test_the_pipeline_exports_from_memory_what_xtc_export_rebuilds(finished_run):
    """The pipeline packs its in-memory best student (the fixture checks it rebuilds nothing);
    ``xtc export`` rebuilds it from the run folder (base model, quantization,
    weights.safetensors): the same bytes, the same summary."""
    in_memory = finished_run.parent / "exported_by_the_pipeline"
    summary = export_run(finished_run)  # the run's settings: float16, hf/, evaluated on dev
    packed = (in_memory / "model.safetensors").read_bytes()
    assert packed == Path(summary["packed"]).read_bytes()
    assert read_record(in_memory / "export.json", finished_run) == summary
    assert summary["source"] == str(finished_run / "quantize" / "weights.safetensors")
    assert (in_memory / "hf" / "model.safetensors").read_bytes() == (
        finished_run / "export" / "hf" / "model.safetensors"
    ).read_bytes()


def test_export_run_reproduces_the_run_dev_metrics(finished_run, glue_dir):
    from xtc_lightning.export.evaluate import dev_data, predict
    from xtc_lightning.export.run import read_run, rebuild_final_model

    summary = export_run(finished_run, other_dtype="float32")
    results = read_record(finished_run / "results.json", finished_run)
    packed = Path(summary["packed"])
    assert packed == finished_run / "export" / "model.safetensors" and packed.is_file()
    assert read_record(finished_run / "export" / "export.json", finished_run) == summary
    assert summary["dev"]["score"] == results["score"] and summary["dev"]["score_difference"] == 0
    assert summary["dev"]["splits"] == results["metrics"]
    assert summary["size"]["teacher_bytes"] > summary["size"]["file_bytes"]
    # the same predictions, row by row, as the run's predictions file
    with open(results["predictions"]["dev"]) as f:
        run_preds = [int(r["prediction"]) for r in csv.DictReader(f, delimiter="\t")]
    model = load_packed(packed)
    from xtc_lightning.tasks import get_task

    task = get_task("rte")
    dm = dev_data(task, load_packed_tokenizer(packed), glue_dir, 64, 64)
    index, preds, _ = predict(model, task, dm)["dev"]
    assert index.tolist() == list(range(277)) and preds.long().tolist() == run_preds
    # and the same logits, bit for bit, as the student rebuilt from the checkpoint
    student, *_ = rebuild_final_model(finished_run, *read_run(finished_run))
    first = next(iter(dm.val_dataloader()[0]))
    inputs = {k: first[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert torch.equal(logits(model, inputs), logits(student, inputs))
    hf = AutoModelForSequenceClassification.from_pretrained(summary["hf"])
    assert hf.config.num_hidden_layers == 1 and hf.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert torch.equal(logits(hf, inputs), logits(model, inputs))  # packed weights, same forward
    assert summary["hf_dequantized"] is None and not (finished_run / "export" / "hf-dequantized").exists()


def test_export_folder_model_card(finished_run):
    """export/hf/ is ready for push_to_hub: weights, config, tokenizer, and a card with HF metadata."""
    from xtc_lightning.export.card import read_card_metadata

    summary = export_run(finished_run, other_dtype="float32", hf_dequantized=True)
    results = json.loads((finished_run / "results.json").read_text())
    folder = Path(summary["hf"])
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    card = (folder / "README.md").read_text()
    meta = read_card_metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert "base_model" not in meta  # the teacher was a local folder
    assert meta["datasets"] == ["nyu-mll/glue"] and "w1a8" in meta["tags"] and "rte" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {
        "name": "GLUE RTE",
        "type": "nyu-mll/glue",
        "config": "rte",
        "split": "validation",
    }
    assert result["metrics"] == [{"type": "accuracy", "value": round(100 * summary["dev"]["score"], 2)}]
    xtc = meta["xtc"]
    assert (xtc["weight_bits"], xtc["activation_bits"]) == (1, 8)
    assert list(xtc["stages"]) == ["teacher", "reduce", "quantize"]
    assert xtc["stages"]["quantize"]["score"] == results["stages"]["quantize"]["score_best"]
    assert xtc["packed"]["score"] == summary["dev"]["score"]
    assert xtc["size"]["file_bytes"] == summary["size"]["file_bytes"]
    assert xtc["size"]["bound_ratio"] == round(summary["size"]["bound_ratio"], 4)
    assert "quant.weight.method" not in card and "method: binary" in card  # the resolved config
    assert "import xtc_lightning" in card and "per-token scale" in card
    # the dequantized copy, on request: loads without the package's quantizer, fp32-sized
    plain = Path(summary["hf_dequantized"])
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    assert (plain / "model.safetensors").stat().st_size > 10 * summary["hf_file_bytes"]


def test_export_evaluates_the_packed_file_on_the_runs_hub_dataset(
    finished_run, glue_dir, tmp_path, monkeypatch
):
    """A run trained on hub data (data.dir null) gets its packed file evaluated on that hub
    dataset too, not skipped. The hub is replaced by the local copy: tests never touch the network."""
    from omegaconf import OmegaConf

    from xtc_lightning import data

    run = tmp_path / "hub_run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("export"))
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    cfg.data.dir, cfg.data.hub_dataset = None, "someone/glue-copy"
    OmegaConf.save(cfg, run / "config_resolved.yaml")
    asked = []

    def from_the_local_copy(task, dataset, split):
        asked.append((task.name, dataset, split))
        return data.read_local_split(task, glue_dir, split)

    monkeypatch.setattr(data, "read_hub_split", from_the_local_copy)
    summary = export_run(run, hf=False, other_dtype="float32")
    assert asked == [("rte", "someone/glue-copy", "dev")]
    results = json.loads((run / "results.json").read_text())
    assert summary["dev"]["score"] == results["score"] and summary["dev"]["splits"] == results["metrics"]
    cfg.data.dir = str(tmp_path / "not_here")  # a GLUE folder that is not on this machine: said, not guessed
    OmegaConf.save(cfg, run / "config_resolved.yaml")
    assert export_run(run, hf=False)["dev"] == {
        "skipped": f"the run's GLUE folder is not here (data.dir='{tmp_path / 'not_here'}')"
    }
    assert len(asked) == 1


def test_export_run_float16_and_evaluate_cli(finished_run, glue_dir, capsys):
    from xtc_lightning.export.evaluate import main as evaluate_main

    summary = export_run(finished_run, hf=False, glue_dir=glue_dir)
    assert summary["other_dtype"] == "float16" and summary["hf"] is None
    assert abs(summary["dev"]["score_difference"]) < 0.02
    evaluate_main([summary["packed"], "--data-dir", str(glue_dir), "--json", str(finished_run / "e.json")])
    out = capsys.readouterr().out
    assert "rte dev (277 examples): accuracy=" in out
    assert json.loads((finished_run / "e.json").read_text())["score"] == summary["dev"]["score"]
    direct = evaluate_packed(summary["packed"], glue_dir, "dev")
    assert direct["score"] == summary["dev"]["score"] and direct["max_length"] == 64
    # the fast int8 runtime on the same 277 RTE dev rows: the same predictions as the reference
    evaluate_main(
        [summary["packed"], "--data-dir", str(glue_dir), "--runtime", "--json", str(finished_run / "r.json")]
    )
    fast = json.loads((finished_run / "r.json").read_text())
    assert fast["model"] == "int8 runtime" and fast["examples"] == {"dev": 277}
    assert fast["score"] == direct["score"]


def test_export_cli_onnx_agrees_with_the_packed_model_on_dev(finished_run, glue_dir, capsys):
    from xtc_lightning.export.run import main as export_main

    export_main(
        [str(finished_run), "--no-hf", "--onnx", "--other-dtype", "float32", "--data-dir", str(glue_dir)]
    )
    out = capsys.readouterr().out
    summary = read_record(finished_run / "export" / "export.json", finished_run)
    agree = summary["onnx"]["dev"]
    assert Path(summary["onnx"]["path"]) == finished_run / "export" / "model.onnx"
    assert agree["examples"] == 277 and agree["agreement"] >= 0.995 and agree["max_abs_logit_diff"] < 1e-3
    assert f"onnx vs packed on dev: {agree['same_predictions']}/277 same predictions" in out


def readme_python_blocks(heading: str) -> list[str]:
    from conftest import REPO

    section = (REPO / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_using_the_compressed_model_runs_as_written(finished_run, glue_dir, capsys):
    """The three ways of the README (transformers, ONNX Runtime, the runtime), on a real export folder."""
    from conftest import readme_commands
    from xtc_lightning.export.run import main as export_main

    placeholder = "runs/<name>/<run-id>"
    (command,) = readme_commands("## Using the compressed model")
    assert command[:2] == ["xtc-export", placeholder]
    export_main([str(finished_run), *command[2:], "--no-eval"])
    blocks = readme_python_blocks("## Using the compressed model")
    assert len(blocks) == 3 and all(f'export = "{placeholder}/export"' in b for b in blocks)
    outputs = []
    for block in blocks:
        scope: dict = {}
        exec(block.replace(placeholder, str(finished_run)), scope)  # noqa: S102 (our own README)
        outputs.append(scope)
    printed = capsys.readouterr().out
    assert "'label': 'entailment'" in printed or "'label': 'not_entailment'" in printed
    onnx_logits, runtime_logits = outputs[1]["logits"], outputs[2]["logits"]
    assert onnx_logits.shape == (1, 2) and runtime_logits.shape == (1, 2)
    assert abs(torch.from_numpy(onnx_logits) - runtime_logits).max() < 1e-3


def test_predictions_files_and_glue_test_submission(finished_run, glue_dir, tmp_path, capsys):
    from xtc_lightning.predictions import main as predict_main

    # predictions_dev.tsv: label name and class probabilities beside the class id
    with open(finished_run / "predictions_dev.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == [
        "index", "prediction", "label", "prediction_name", "p_entailment", "p_not_entailment"
    ]  # fmt: skip
    assert len(rows) == 277
    for r in rows:
        p = [float(r["p_entailment"]), float(r["p_not_entailment"])]
        assert (
            abs(sum(p) - 1) <= 1e-4
            and r["prediction_name"] == ["entailment", "not_entailment"][int(r["prediction"])]
        )
        assert int(r["prediction"]) == (p[1] > p[0]) or abs(p[1] - p[0]) < 1e-4
    # xtc-predict: the GLUE submission file of the packed model, from the run folder
    export_run(finished_run, hf=False, evaluate=False)
    predict_main([str(finished_run), "--split", "test", "--data-dir", str(glue_dir), "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "RTE.tsv")
    lines = (tmp_path / "RTE.tsv").read_text().splitlines()
    test_rows = (glue_dir / "RTE" / "test.tsv").read_text().splitlines()[1:]
    assert lines[0] == "index\tprediction" and len(lines) == len(test_rows) + 1
    assert [int(x.split("\t")[0]) for x in lines[1:]] == [int(r.split("\t")[0]) for r in test_rows]
    assert {x.split("\t")[1] for x in lines[1:]} <= {"entailment", "not_entailment"}
    # the rows are the packed model's predictions of the test sentences (checked on the first 8)
    import xtc_lightning.export as export

    packed = finished_run / "export" / "model.safetensors"
    model, tok = export.load_packed(packed), export.load_packed_tokenizer(packed)
    first = [r.split("\t") for r in test_rows[:8]]
    enc = tok(
        [r[1] for r in first],
        [r[2] for r in first],
        padding=True,
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    expected = logits(model, dict(enc)).argmax(-1).tolist()
    assert [x.split("\t")[1] for x in lines[1:9]] == [["entailment", "not_entailment"][i] for i in expected]
    with pytest.raises(SystemExit) as exit_info:
        predict_main([str(tmp_path / "nothing"), "--data-dir", str(glue_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_export_run_refuses_bad_run_folders(tmp_path, finished_run):
    with pytest.raises(UserError, match="results.json is missing"):
        export_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config_resolved.yaml").write_text((finished_run / "config_resolved.yaml").read_text())
    results = json.loads((finished_run / "results.json").read_text())
    results["stages"]["reduce"]["model_dir"] = str(tmp_path / "gone")
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="the reduce stage's model folder .* is gone"):
        export_run(broken)
    results = json.loads((finished_run / "results.json").read_text())
    results["stages"]["quantize"]["weights"] = str(tmp_path / "none.safetensors")
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match=r"the quantize stage's weights .*none.safetensors' are missing"):
        export_run(broken)
    del results["stages"]["quantize"]["weights"]  # a run folder from before weights.safetensors
    results["stages"]["quantize"]["checkpoints"] = {"best": str(tmp_path / "none.ckpt"), "last": None}
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="checkpoint .* is missing"):
        export_run(broken)


def test_export_reads_the_folder_it_is_given_not_the_recorded_one(tmp_path, finished_run):
    """A copied run folder whose selected weights were deleted is refused, never exported from the original."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("export"))
    (copy / "quantize" / "weights.safetensors").unlink()
    assert (finished_run / "quantize" / "weights.safetensors").is_file()  # the original still has them
    with pytest.raises(
        UserError,
        match=rf"{copy}: the quantize stage's weights '{copy}/quantize/weights.safetensors' are missing",
    ):
        export_run(copy, hf=False, evaluate=False)
    assert not (copy / "export").exists()


def test_a_copied_run_folder_exports_reports_and_resumes_from_itself(tmp_path, finished_run):
    """results.json records the run's files relative to the run folder (the caches, outside it,
    stay absolute): a copy elsewhere reads its own files in ``xtc export``, ``xtc report`` and a resume."""
    from xtc_lightning.report import collect
    from xtc_lightning.resume import finished_stage

    recorded = json.loads((finished_run / "results.json").read_text())
    assert recorded["run_dir"] == "." and recorded["predictions"] == {"dev": "predictions_dev.tsv"}
    assert recorded["stages"]["quantize"]["weights"] == "quantize/weights.safetensors"
    assert recorded["export"]["packed"] == "export/model.safetensors"
    assert Path(recorded["stages"]["reduce"]["model_dir"]).is_absolute()  # in the cache
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run, copy)
    assert finished_stage(copy, "quantize")["weights"] == str(copy / "quantize" / "weights.safetensors")
    summary = export_run(copy, hf=False, other_dtype="float32")
    assert summary["source"] == str(copy / "quantize" / "weights.safetensors")
    assert summary["packed"] == str(copy / "export" / "model.safetensors")
    assert json.loads((copy / "export" / "export.json").read_text())["packed"] == "export/model.safetensors"
    assert summary["dev"]["score"] == recorded["score"]
    points, skipped, _ = collect([copy])
    (student,) = [p for p in points if not p.teacher]
    assert not skipped and student.run_dir == str(copy) and student.size_exact


def test_export_run_of_an_fp32_final_stage(tmp_path, finished_run):
    """A run that stopped after the reduce stage exports that stage's model, unquantized."""
    run = tmp_path / "reduce-only"
    run.mkdir()
    (run / "config_resolved.yaml").write_text((finished_run / "config_resolved.yaml").read_text())
    results = json.loads((finished_run / "results.json").read_text())
    del results["stages"]["quantize"]
    reduce = results["stages"]["reduce"]
    results.update(final_stage="reduce", score=reduce["score_best"], metrics=reduce["metrics_best"])
    (run / "results.json").write_text(json.dumps(results))
    summary = export_run(run, other_dtype="float32", hf=False)
    assert summary["stage"] == "reduce" and summary["source"] == reduce["model_dir"]
    assert summary["size"]["quantized_params"] == 0 and summary["size"]["packed_weight_bytes"] == 0
    assert summary["dev"]["splits"] == reduce["metrics_best"]


def test_export_cli_prints_the_size_table(finished_run, capsys):
    from xtc_lightning.export.run import main as export_main

    export_main([str(finished_run), "--no-hf", "--no-eval", "--other-dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "theoretical bound" in out and "teacher / file" in out
    assert packed_format.read_header(finished_run / "export" / "model.safetensors").metadata[
        "stored_dtype"
    ] == ("bfloat16")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(finished_run / "nothing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is not a finished run folder" in err


def test_mixed_precision_packs_each_role_at_its_own_width(tmp_path):
    cfg = CONFIGS["w1a8-mixed"]
    model = tiny_model(cfg)
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.weight_spec == WeightSpec("symmetric", 8, "row")
    assert layer.attention.self.value.weight_spec == WeightSpec("binary", 1, "row")
    assert model.bert.embeddings.word_embeddings.weight_spec == WeightSpec("ternary", 2, "row")
    mixed = export_packed(model, tmp_path / "mixed.safetensors", quant_cfg=cfg, task="rte")
    plain = export_packed(
        tiny_model(CONFIGS["w1a8"]), tmp_path / "w1.safetensors", quant_cfg=CONFIGS["w1a8"], task="rte"
    )
    # 2 layers x (query + key) of 32 x 32 at 8 instead of 1 bit, VOCAB x 32 at 2 instead of 1 bit
    extra_bits = 2 * 2 * 32 * 32 * 7 + VOCAB * 32 * 1
    assert mixed.packed_weight_bytes - plain.packed_weight_bytes == extra_bits / 8
    assert mixed.quantized_params_by_bits == {
        1: 2 * (2 * 32 * 32 + 2 * 32 * 64),
        2: VOCAB * 32,
        8: 2 * 2 * 32 * 32,
    }
    meta = read_packed(tmp_path / "mixed.safetensors").metadata
    assert meta["quant"]["weight_by_target"]["query"] == {"method": "symmetric", "bits": 8, "groups": "row"}
    assert quantization_summary(model).params_by_bits.keys() == {1, 2, 8, 32}


def test_readme_runtime_example_runs(finished_run):
    """The README's Python example, as written, on this run's packed file (RTE: 2 labels)."""
    from conftest import REPO

    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    (example,) = [b for b in blocks if '"runs/<...>/export/model.safetensors"' in b]  # Fast CPU inference
    packed = finished_run / "export" / "model.safetensors"
    assert packed.is_file()
    scope: dict = {}
    exec(example.replace("runs/<...>/export/model.safetensors", str(packed)), scope)
    assert scope["logits"].shape == (len(scope["sentences"]), 2)


def test_evaluation_settings_come_from_the_file_and_a_missing_length_is_an_error(tmp_path, glue_dir):
    """The sequence length decides the predictions: never assumed. The batch size does not: the
    run's, else 64. Evaluation, test predictions and the ONNX check read them the same way."""
    from xtc_lightning.export.packed import eval_settings, packed_metadata
    from xtc_lightning.predictions import predict_test

    cfg = CONFIGS["w1a8"]
    stored, bare = tmp_path / "stored.safetensors", tmp_path / "bare.safetensors"
    export_packed(tiny_model(cfg), stored, quant_cfg=cfg, task="rte", max_length=96, eval_batch_size=16)
    export_packed(tiny_model(cfg), bare, quant_cfg=cfg, task="rte")
    assert eval_settings(stored, packed_metadata(stored)) == (96, 16)
    assert eval_settings(stored, packed_metadata(stored), 32, 8) == (32, 8)
    assert eval_settings(bare, packed_metadata(bare), max_length=40) == (40, 64)
    for call in (lambda: eval_settings(bare, packed_metadata(bare)), lambda: predict_test(bare, glue_dir)):
        with pytest.raises(UserError, match=rf"^{re.escape(str(bare))}: no max_length stored with the file"):
            call()
    assert not list(tmp_path.glob("*.tsv"))  # refused before writing anything


def test_weights_that_do_not_fit_the_rebuilt_student_are_one_error():
    """load_student_weights (xtc export, recipe.start_run): a missing, an unexpected or a reshaped
    tensor is one UserError naming it; a fitting state loads exactly."""
    from torch import nn

    from xtc_lightning.export.run import load_student_weights

    student = nn.Linear(3, 2)
    fits = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    load_student_weights(student, fits, "w.safetensors")
    assert torch.equal(student.weight, torch.ones(2, 3))
    for state, message in [
        ({"weight": torch.ones(2, 3)}, "(missing ['bias'], unexpected [], other shapes [])"),
        ({**fits, "extra": torch.ones(1)}, "(missing [], unexpected ['extra'], other shapes [])"),
        ({**fits, "weight": torch.ones(3, 2)}, "(missing [], unexpected [], other shapes ['weight'])"),
    ]:
        with pytest.raises(UserError) as err:
            load_student_weights(student, state, "w.safetensors")
        assert str(err.value) == f"w.safetensors: does not fit the rebuilt student {message}"

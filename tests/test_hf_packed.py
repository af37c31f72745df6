"""The transformers folder with packed weights: from_pretrained / save_pretrained / pipeline, through the xtc quantizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, pipeline

import xtc_lightning  # noqa: F401 (registers quant_method "xtc")
from xtc_lightning.export import export_packed, load_packed, size_report
from xtc_lightning.export.hf_packed import XtcLinear, XtcQuantConfig, export_hf_packed
from xtc_lightning.inference import optimize_for_inference
from xtc_lightning.quant import QuantConfig, apply_quantization

W1A8 = {
    "name": "w1a8",
    "weight": {"method": "binary", "bits": 1},
    "activation": {"method": "symmetric", "bits": 8},
}
W2A8_STATIC = {
    "name": "w2a8s",
    "weight": {"method": "ternary", "bits": 2},
    "activation": {"method": "symmetric", "bits": 8, "range": "static"},
}
SENTENCES = ["a gripping, funny and moving film", "dull", "it is neither good nor bad, just long"]


def tiny_sst2(quant: dict, seed: int = 0):
    """A random 2-layer BERT with the MiniLM vocabulary, quantized (word embeddings too); static ranges calibrated."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    cfg = QuantConfig.from_dict({**quant, "word_embeddings": True})
    apply_quantization(model, cfg)
    if cfg.activation.range == "static":
        model.train()
        with torch.no_grad():
            model(input_ids=torch.randint(0, 30522, (4, 12)))
    return model.eval(), cfg


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def export(tmp_path, tokenizer, quant: dict, other_dtype: str = "float16"):
    model, cfg = tiny_sst2(quant)
    packed = tmp_path / "model.safetensors"
    export_packed(model, packed, quant_cfg=cfg, task="sst2", tokenizer=tokenizer, other_dtype=other_dtype)
    return model, packed, export_hf_packed(packed, tmp_path / "hf", card="# card\n")


def inputs(tokenizer):
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits


@pytest.mark.parametrize("quant", [W1A8, W2A8_STATIC], ids=["w1a8", "w2a8-static"])
def test_from_pretrained_equals_load_packed_and_save_pretrained_round_trips(quant, tmp_path, tokenizer):
    _, packed, folder = export(tmp_path, tokenizer, quant)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    # the packed buffers are what is stored: 1 bit per binary weight, 2 per ternary, same bound as the packed file
    bits = quant["weight"]["bits"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("bert.embeddings.word_embeddings.weight_packed")
        assert emb.get_dtype() == "U8" and emb.get_shape() == [30522 * 32 * bits // 8]
        assert f.get_slice("bert.encoder.layer.0.attention.self.query.weight_scale").get_dtype() == "F16"
    assert "bert.encoder.layer.0.attention.self.query.weight" not in keys
    report = size_report(packed)
    hf_bytes = (folder / "model.safetensors").stat().st_size
    header = 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert hf_bytes - header == report.file_bytes - report.header_bytes  # the same payload, byte for byte
    assert hf_bytes < report.file_bytes  # a smaller header (no manifest); file / bound: see the MiniLM test
    # config.json carries the method, bits, groups, activation spec, targets and module list
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "xtc" and qc["weight"]["bits"] == bits and qc["weight"]["groups"] == "row"
    assert qc["activation"] == {
        **quant["activation"],
        "range": quant["activation"].get("range", "dynamic"),
        "ema_momentum": 0.99,
    }
    assert qc["targets"] == ["query", "key", "value", "attention_output", "intermediate", "output"]
    assert len(qc["modules"]) == 2 * 6 + 1 and qc["other_dtype"] == "float16"
    assert isinstance(model.config.quantization_config, XtcQuantConfig)
    assert isinstance(model.bert.encoder.layer[1].output.dense, XtcLinear)
    # bit for bit the packed model (fp16 others widened the same way), activation quantization included
    batch = inputs(tokenizer)
    reference = logits(load_packed(packed), batch)
    assert torch.equal(logits(model, batch), reference)
    # save_pretrained writes the packed form again: the same tensors, byte for byte
    model.save_pretrained(tmp_path / "again")
    with (
        safe_open(str(folder / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == hf_bytes
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again, batch), reference)
    # the int8 runtime accepts the loaded model and keeps its predictions
    fast = optimize_for_inference(again, compile=False)
    assert len(fast.int8_summary["int8"]) == 12
    assert torch.equal(logits(fast, batch).argmax(-1), reference.argmax(-1))


def test_float32_folder_reproduces_the_trained_model_bit_for_bit(tmp_path, tokenizer):
    trained, _, folder = export(tmp_path, tokenizer, W1A8, other_dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    batch = inputs(tokenizer)
    assert torch.equal(logits(model, batch), logits(trained, batch))


def test_pipeline_on_raw_text_returns_label_names(tmp_path, tokenizer):
    _, packed, folder = export(tmp_path, tokenizer, W1A8)
    classify = pipeline("text-classification", model=str(folder))
    out = classify(SENTENCES)
    assert [o["label"] for o in out] == [
        ["negative", "positive"][i]
        for i in logits(load_packed(packed), inputs(tokenizer)).argmax(-1).tolist()
    ]
    assert all(0.5 <= o["score"] <= 1 for o in out)


def test_loading_and_the_runtime_do_not_import_lightning(tmp_path, tokenizer):
    """A deployment imports the package, loads a packed folder the HF way and runs the int8 runtime
    without importing Lightning (seconds of import time, and no training stack needed): the export
    package resolves its names on first use. The predictions are those of the exported model."""
    import subprocess
    import sys

    model, _, folder = export(tmp_path, tokenizer, W1A8, other_dtype="float32")
    batch = inputs(tokenizer)
    torch.save(batch, tmp_path / "batch.pt")
    code = f"""
import sys, torch
import xtc_lightning
from transformers import AutoModelForSequenceClassification
from xtc_lightning.inference import optimize_for_inference
model = optimize_for_inference(AutoModelForSequenceClassification.from_pretrained({str(folder)!r}))
batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
with torch.no_grad():
    print(model(**batch).logits.argmax(-1).tolist())
assert "lightning" not in sys.modules, "lightning was imported"
import xtc_lightning.export as export
assert callable(export.export_packed) and "export_packed" in dir(export)
try:
    export.no_such_name
except AttributeError as err:
    print(err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted, missing = proc.stdout.strip().splitlines()[-2:]
    assert predicted == str(logits(model, batch).argmax(-1).tolist())
    assert missing == "module 'xtc_lightning.export' has no attribute 'no_such_name'"


def test_bad_quantization_config_is_refused(tmp_path, tokenizer):
    _, _, folder = export(tmp_path, tokenizer, W1A8)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant.weight.bits=3 does not fit method binary"):
        AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.mark.slow
def test_real_minilm_export_folder_size_logits_and_onnx_agreement(tmp_path, minilm_dir, glue_dir):
    """The W1A8 3-layer MiniLM student (untrained head): the folder is within 2% of the bound,
    from_pretrained is bit-identical to load_packed, save_pretrained round-trips, ONNX agrees on SST-2 dev."""
    import yaml

    from conftest import REPO
    from xtc_lightning.data import read_local_split
    from xtc_lightning.export.onnx_export import export_onnx, onnx_logits, onnx_session
    from xtc_lightning.student import build_student
    from xtc_lightning.tasks import get_task

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, attn_implementation="eager"
    )
    student = build_student(teacher, [1, 3, 5]).eval()
    cfg = QuantConfig.from_dict(yaml.safe_load((REPO / "conf" / "quant" / "binary.yaml").read_text()))
    apply_quantization(student, cfg)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    packed = tmp_path / "model.safetensors"
    report = export_packed(student, packed, quant_cfg=cfg, task="sst2", tokenizer=tok)
    folder = export_hf_packed(packed, tmp_path / "hf")
    hf_bytes = (folder / "model.safetensors").stat().st_size
    assert hf_bytes / report.bound_bytes <= 1.02 and hf_bytes < 3.2e6
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    sentences = [t[0] for t in read_local_split(get_task("sst2"), glue_dir, "dev").texts[:256]]
    reference = load_packed(packed)
    batches = [dict(tok(sentences[i : i + 32], padding=True, return_tensors="pt")) for i in range(0, 256, 32)]
    ref = torch.cat([logits(reference, b) for b in batches])
    assert torch.equal(torch.cat([logits(model, b) for b in batches[:2]]), ref[:64])
    model.save_pretrained(tmp_path / "again")
    again = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert (
        len(again) == hf_bytes and again[-100_000:] == (folder / "model.safetensors").read_bytes()[-100_000:]
    )
    session = onnx_session(export_onnx(packed, tmp_path / "model.onnx"))
    out = torch.cat([onnx_logits(session, b) for b in batches])
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.995
    assert (out - ref).abs().max() < 1e-2


def test_mixed_precision_folder_loads_each_module_at_its_own_width(tmp_path, tokenizer):
    """quant.weight_by_target: 8-bit query/key beside 1-bit elsewhere, packed per module and
    loaded bit for bit like load_packed."""
    mixed = {
        **W1A8,
        "weight_by_target": {
            "query": {"method": "symmetric", "bits": 8},
            "key": {"method": "symmetric", "bits": 8},
        },
    }
    _, packed, folder = export(tmp_path, tokenizer, mixed)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    own = {m["name"]: m["weight"]["bits"] for m in qc["modules"] if "weight" in m}
    assert own == {
        f"bert.encoder.layer.{i}.attention.self.{r}": 8 for i in range(2) for r in ("query", "key")
    }
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("bert.encoder.layer.0.attention.self.key.weight_packed").get_shape() == [32 * 32]
        assert f.get_slice("bert.encoder.layer.0.attention.self.value.weight_packed").get_shape() == [
            32 * 32 // 8
        ]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    batch = inputs(tokenizer)
    assert torch.equal(logits(model, batch), logits(load_packed(packed), batch))

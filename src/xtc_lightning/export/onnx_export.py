"""An ONNX model of a packed BERT classifier that keeps the low-bit structure (``xtc-export --onnx``).

The graph is built by hand with ``onnx.helper`` from ``load_packed(path)`` (opset 17), so the
integer parts are exactly the runtime's (``xtc_lightning.inference``):

    quantized linear   weight codes as an int8 initializer ``(in, out)`` (binary {-1, 1},
                       ternary {-1, 0, 1}, k-bit codes minus zero point) + fp32 per-row scale;
                       the input quantized per token (``ReduceMax(|x|) / Q``, 1 where 0;
                       ``Round(x / scale)``, half to even, as torch) or with its calibrated static
                       scale (``Clip`` to [-Q, Q]); ``MatMulInteger`` -> int32, exact (the codes
                       enter as uint8 ``code + 128`` with zero point 128: the same integers,
                       for ONNX Runtime's optimized u8 x s8 CPU kernel);
                       then ``acc * w_scale * a_scale + bias`` in fp32
    embeddings         a quantized word embedding stays int8 codes + per-row scale: ``Gather``
                       both, ``Cast``, ``Mul`` (exactly ``dequantize_weight``); position and token
                       type tables fp32; word + type + position, LayerNorm
    attention          eager: ``q k^T * d^-0.5`` + (1 - mask) * finfo(fp32).min, Softmax, ``@ v``
    rest               LayerNormalization, exact (erf) GELU, tanh pooler on the first token,
                       classifier: fp32 (``MatMul`` with the stored weight widened to fp32)

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, ``(batch, length)``, any
batch and length up to ``max_position_embeddings``); output ``logits`` ``(batch, labels)``.
Predictions agree with the packed model up to float rounding (the integer sums are exact,
the fake-quant reference rounds in fp32): ``compare_onnx`` measures it.

Supported (``check_supported``): quantized ``BertForSequenceClassification`` (absolute
positions, GELU) whose quantized layers have per-row weight scales (groups tensor, row, or N
dividing the rows) and int8-sized codes, and symmetric activations of 4 or 8 bits (dynamic per
token, or a calibrated static range). 8-bit asymmetric weights (code - zero point needs 9
bits), asymmetric or absent activation quantization, row-splitting groups, other
architectures and unquantized models are refused with one line (``UserError``).

Size: ONNX has no 1- or 2-bit tensor type, so the codes take a byte each (a W1A8 MiniLM-3L:
18.7 MB against the packed file's 3.0 MB); the structure (integer codes, per-row scales,
integer GEMMs) is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from xtc_lightning.errors import UserError
from xtc_lightning.export.layers import PackedEmbedding, PackedLinear
from xtc_lightning.export.packed import load_packed
from xtc_lightning.inference.linear import int8_weight
from xtc_lightning.io import atomic_path
from xtc_lightning.quant import QuantEmbedding, QuantLinear, WeightSpec
from xtc_lightning.quant.quantizers import activation_qparams, activation_qrange

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'xtc-lightning[onnx]'") from None


class _Graph:
    """Nodes and initializers of the graph being built; ``op`` returns the output name."""

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _float_linear(g: _Graph, x: str, layer: nn.Linear, hint: str) -> str:
    w = g.const(f"{hint}.weight_t", _np(layer.weight.float().t().contiguous()))
    y = g.op("MatMul", [x, w], hint)
    if layer.bias is not None:
        y = g.op("Add", [y, g.const(f"{hint}.bias", _np(layer.bias.float()))], hint)
    return y


def _int8_linear(g: _Graph, x: str, layer: PackedLinear, hint: str) -> str:
    """``MatMulInteger`` over the int8 weight codes with the input quantized as the fake-quant layer does."""
    _, qmax = activation_qrange(layer.activation_spec)
    codes, w_scale = int8_weight(layer.codes, layer.out_features)
    w = g.const(f"{hint}.weight_int8", _np(codes.t().contiguous()))
    if layer.has_static_range:
        r = layer.act_range.float()
        scale, _ = activation_qparams(r[0], r[1], layer.activation_spec)
        a_scale = g.const(f"{hint}.act_scale", np.array(float(scale), dtype=np.float32))
        q = g.op("Round", [g.op("Div", [x, a_scale])])
        lim = g.const("qmax", np.array(float(qmax), dtype=np.float32))
        q = g.op("Clip", [q, g.op("Neg", [lim]), lim])
    else:
        absmax = g.op("ReduceMax", [g.op("Abs", [x])], keepdims=1, axes=[-1])
        raw = g.op("Div", [absmax, g.const("qmax", np.array(float(qmax), dtype=np.float32))])
        zero = g.const("zero", np.array(0.0, dtype=np.float32))
        one = g.const("one", np.array(1.0, dtype=np.float32))
        a_scale = g.op("Where", [g.op("Greater", [raw, zero]), raw, one], f"{hint}.act_scale")
        q = g.op("Round", [g.op("Div", [x, a_scale])])
    from onnx import TensorProto

    # uint8 codes with zero point 128 (the same integers): ONNX Runtime's fast u8 x s8 kernel
    shifted = g.op("Add", [q, g.const("u8_offset", np.array(128.0, dtype=np.float32))])
    a_zero = g.const("u8_zero_point", np.array(128, dtype=np.uint8))
    acc = g.op("MatMulInteger", [g.op("Cast", [shifted], to=TensorProto.UINT8), w, a_zero], hint)
    y = g.op(
        "Mul", [g.op("Cast", [acc], to=TensorProto.FLOAT), g.const(f"{hint}.weight_scale", _np(w_scale))]
    )
    y = g.op("Mul", [y, a_scale])
    if layer.bias is not None:
        y = g.op("Add", [y, g.const(f"{hint}.bias", _np(layer.bias.float()))], hint)
    return y


def _linear(g: _Graph, x: str, layer: nn.Module, hint: str) -> str:
    if isinstance(layer, PackedLinear):
        return _int8_linear(g, x, layer, hint)
    return _float_linear(g, x, layer, hint)


def _layer_norm(g: _Graph, x: str, ln: nn.LayerNorm, hint: str) -> str:
    scale = g.const(f"{hint}.weight", _np(ln.weight.float()))
    bias = g.const(f"{hint}.bias", _np(ln.bias.float()))
    return g.op("LayerNormalization", [x, scale, bias], hint, axis=-1, epsilon=float(ln.eps))


def _embedding(g: _Graph, ids: str, emb: nn.Embedding, hint: str) -> str:
    from onnx import TensorProto

    if isinstance(emb, PackedEmbedding):
        codes, scale = int8_weight(emb.codes, emb.num_embeddings)
        rows = g.op("Gather", [g.const(f"{hint}.codes", _np(codes)), ids], axis=0)
        s = g.op("Gather", [g.const(f"{hint}.scale", _np(scale.unsqueeze(1))), ids], axis=0)
        return g.op("Mul", [g.op("Cast", [rows], to=TensorProto.FLOAT), s], hint)
    return g.op("Gather", [g.const(f"{hint}.weight", _np(emb.weight.float())), ids], hint, axis=0)


def _rows_supported(spec: WeightSpec, rows: int) -> bool:
    """One scale per row and codes that fit int8 (``int8_weight`` of these codes is not None)."""
    groups_ok = spec.groups in ("tensor", "row") or rows % int(spec.groups) == 0
    return groups_ok and (spec.method != "asymmetric" or spec.bits <= 7)


def check_supported(model: nn.Module, where: str | Path) -> None:
    """Raise ``UserError`` (one line) unless ``model`` is a quantized BERT classifier the builder handles.

    Works on the trained model (``QuantLinear``) and on ``load_packed``'s (``PackedLinear``).
    """
    config = model.config
    if type(model).__name__ != "BertForSequenceClassification":
        raise UserError(
            f"{where}: ONNX export supports BertForSequenceClassification, not {type(model).__name__}"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute" or config.hidden_act != "gelu":
        raise UserError(f"{where}: ONNX export needs absolute positions and gelu (got {config.hidden_act})")
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)]
    if not quantized:
        raise UserError(f"{where}: ONNX export is for quantized models; this one has no quantized layer")
    for name, m in quantized:
        rows = m.out_features if isinstance(m, QuantLinear) else m.num_embeddings
        if not (m.weight_spec.enabled and _rows_supported(m.weight_spec, rows)):
            raise UserError(
                f"{where}: ONNX export needs int8 weight codes with one scale per row: binary, ternary, "
                f"symmetric, or asymmetric up to 7 bits, groups tensor / row / N dividing the rows "
                f"({name}: {m.weight_spec.describe()})"
            )
        if isinstance(m, QuantLinear):
            a = m.activation_spec
            if not (a.enabled and a.method == "symmetric"):
                raise UserError(
                    f"{where}: ONNX export needs symmetric activation quantization ({name}: {a.describe()})"
                )
            if m.has_static_range and torch.isnan(m.act_range).any():
                raise UserError(f"{where}: {name} has an uncalibrated static activation range")


def build_onnx(model: nn.Module, where: str | Path = "model"):
    """The ``onnx.ModelProto`` of a ``load_packed`` BERT classifier (see the module docstring)."""
    _require_onnx()
    from onnx import TensorProto, helper

    check_supported(model, where)
    config, bert = model.config, model.bert
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    g = _Graph()
    ids, mask, types = INPUTS
    # embeddings: (word + token type) + position, LayerNorm
    emb = bert.embeddings
    length = g.op("Gather", [g.op("Shape", [ids]), g.const("one_i", np.array(1, dtype=np.int64))], axis=0)
    positions = g.op(
        "Range",
        [
            g.const("zero_i", np.array(0, dtype=np.int64)),
            length,
            g.const("step", np.array(1, dtype=np.int64)),
        ],
    )
    h = g.op(
        "Add",
        [
            _embedding(g, ids, emb.word_embeddings, "word"),
            _embedding(g, types, emb.token_type_embeddings, "type"),
        ],
    )
    h = g.op("Add", [h, _embedding(g, positions, emb.position_embeddings, "position")])
    h = _layer_norm(g, h, emb.LayerNorm, "embeddings.LayerNorm")
    # additive key mask (batch, 1, 1, length): 0 for real tokens, finfo(fp32).min for padding
    keep = g.op("Cast", [mask], to=TensorProto.FLOAT)
    pad = g.op("Sub", [g.const("one", np.array(1.0, dtype=np.float32)), keep])
    additive = g.op("Mul", [pad, g.const("fmin", np.array(np.finfo(np.float32).min, dtype=np.float32))])
    additive = g.op("Unsqueeze", [additive, g.const("axes12", np.array([1, 2], dtype=np.int64))], "mask")
    split_shape = g.const("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("merge_heads", np.array([0, 0, heads * head_dim], dtype=np.int64))
    scaling = g.const("scaling", np.array(head_dim**-0.5, dtype=np.float32))
    for i, layer in enumerate(bert.encoder.layer):
        p = f"layer{i}"
        att = layer.attention.self

        def heads_of(x: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [x, split_shape])], perm=[0, 2, 1, 3])

        q = heads_of(_linear(g, h, att.query, f"{p}.query"))
        k = heads_of(_linear(g, h, att.key, f"{p}.key"))
        v = heads_of(_linear(g, h, att.value, f"{p}.value"))
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scaling])
        probs = g.op("Softmax", [g.op("Add", [scores, additive])], axis=-1)
        ctx = g.op(
            "Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape]
        )
        out = layer.attention.output
        h = _layer_norm(
            g,
            g.op("Add", [_linear(g, ctx, out.dense, f"{p}.attention_output"), h]),
            out.LayerNorm,
            f"{p}.ln1",
        )
        inter = _linear(g, h, layer.intermediate.dense, f"{p}.intermediate")
        sqrt2 = g.const("sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
        half = g.const("half", np.array(0.5, dtype=np.float32))
        erf = g.op("Erf", [g.op("Div", [inter, sqrt2])])
        gelu = g.op(
            "Mul",
            [g.op("Mul", [inter, half]), g.op("Add", [erf, g.const("one", np.array(1.0, dtype=np.float32))])],
        )
        dense = _linear(g, gelu, layer.output.dense, f"{p}.output")
        h = _layer_norm(g, g.op("Add", [dense, h]), layer.output.LayerNorm, f"{p}.ln2")
    first = g.op("Gather", [h, g.const("zero_i", np.array(0, dtype=np.int64))], axis=1)
    pooled = g.op("Tanh", [_linear(g, first, bert.pooler.dense, "pooler")])
    logits = _linear(g, pooled, model.classifier, "classifier")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(
        g.nodes,
        "xtc_bert_classifier",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "length"]) for n in INPUTS],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config.num_labels])],
        g.inits,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="xtc-lightning"
    )
    onnx_model.ir_version = 8
    return onnx_model


def export_onnx(packed_path: str | Path, out_path: str | Path) -> Path:
    """Write the ONNX model of a packed file (checked with ``onnx.checker``); returns ``out_path``."""
    _require_onnx()
    import onnx

    model = load_packed(packed_path)
    proto = build_onnx(model, packed_path)
    onnx.checker.check_model(proto)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of an exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, batch: dict) -> torch.Tensor:
    """Logits of a tokenized batch (``input_ids``, ``attention_mask``, optional ``token_type_ids``)."""
    ids = batch["input_ids"]
    feeds = {
        "input_ids": _np(ids).astype(np.int64),
        "attention_mask": _np(batch["attention_mask"]).astype(np.int64),
        "token_type_ids": _np(batch.get("token_type_ids", torch.zeros_like(ids))).astype(np.int64),
    }
    return torch.from_numpy(session.run(["logits"], feeds)[0])


@torch.no_grad()
def onnx_agreement(packed_path: str | Path, onnx_path: str | Path, glue_dir: str | Path | None) -> dict:
    """The ONNX model against the packed model on the task's dev sets, batched as the run evaluated.

    ``{"examples", "same_predictions", "agreement", "max_abs_logit_diff", "max_abs_logit"}``
    (regression: ``same_predictions`` and ``agreement`` are None; the logit difference is the score's).
    """
    from xtc_lightning.export.evaluate import dev_data
    from xtc_lightning.export.packed import eval_settings, load_packed_tokenizer, packed_metadata
    from xtc_lightning.modules import model_inputs
    from xtc_lightning.tasks import get_task

    meta = packed_metadata(packed_path)
    task = get_task(meta["task"])
    dm = dev_data(task, load_packed_tokenizer(packed_path), glue_dir, *eval_settings(packed_path, meta))
    model, session = load_packed(packed_path), onnx_session(onnx_path)
    ref, out = [], []
    for loader in dm.val_dataloader():
        for batch in loader:
            x = model_inputs(batch)
            ref.append(model(**x).logits)
            out.append(onnx_logits(session, x))
    ref_t, out_t = torch.cat(ref), torch.cat(out)
    same = None if task.is_regression else int((ref_t.argmax(-1) == out_t.argmax(-1)).sum())
    return {
        "examples": len(ref_t),
        "same_predictions": same,
        "agreement": None if same is None else same / len(ref_t),
        "max_abs_logit_diff": (ref_t - out_t).abs().max().item(),
        "max_abs_logit": ref_t.abs().max().item(),
    }

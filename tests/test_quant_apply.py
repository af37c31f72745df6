"""Finding and swapping the target modules, the schedule switch, the summary and the config."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from xtc_lightning.errors import UserError
from xtc_lightning.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    apply_quantization,
    find_quant_targets,
    quantization_summary,
    set_quantization_enabled,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=40)


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=16, max_position_embeddings=32, **SMALL))


def roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(
        RobertaConfig(hidden_size=16, max_position_embeddings=40, **SMALL)
    )


def distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(
        dim=16, n_layers=3, n_heads=2, hidden_dim=32, vocab_size=40, max_position_embeddings=32
    )
    return DistilBertForSequenceClassification(config)


def load(name):
    return QuantConfig.from_dict(yaml.safe_load((CONF / f"{name}.yaml").read_text()))


BERT_ROLES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
DISTILBERT_ROLES = {
    "query": "attention.q_lin",
    "key": "attention.k_lin",
    "value": "attention.v_lin",
    "attention_output": "attention.out_lin",
    "intermediate": "ffn.lin1",
    "output": "ffn.lin2",
}


@pytest.mark.parametrize(
    ("make", "stack", "roles", "layers", "embeddings", "pooler"),
    [
        (bert, "bert.encoder.layer", BERT_ROLES, 2, "bert.embeddings.word_embeddings", "bert.pooler.dense"),
        # RobertaForSequenceClassification and DistilBERT have no pooler
        (roberta, "roberta.encoder.layer", BERT_ROLES, 2, "roberta.embeddings.word_embeddings", None),
        (
            distilbert,
            "distilbert.transformer.layer",
            DISTILBERT_ROLES,
            3,
            "distilbert.embeddings.word_embeddings",
            None,
        ),
    ],
)
def test_finder_finds_the_six_linears_per_layer_the_word_embeddings_and_the_pooler(
    make, stack, roles, layers, embeddings, pooler
):
    targets = find_quant_targets(make())
    expected = [(f"{stack}.{i}.{path}", role, i) for i in range(layers) for role, path in roles.items()]
    expected.append((embeddings, "word_embeddings", None))
    if pooler:
        expected.append((pooler, "pooler", None))
    assert [(t.name, t.role, t.layer) for t in targets] == expected


def test_pooler_is_quantized_only_when_asked_and_a_model_without_one_says_so():
    model = bert()
    names = apply_quantization(model, load("binary"))
    assert "bert.pooler.dense" not in names and type(model.bert.pooler.dense) is nn.Linear
    cfg = QuantConfig.from_dict({**yaml.safe_load((CONF / "binary.yaml").read_text()), "pooler": True})
    model = bert()
    names = apply_quantization(model, cfg)
    assert names[-1] == "bert.pooler.dense" and len(names) == 14
    assert (
        isinstance(model.bert.pooler.dense, QuantLinear) and model.bert.pooler.dense.weight_spec == cfg.weight
    )
    assert type(model.classifier) is nn.Linear
    with pytest.raises(
        UserError, match=r"quant.pooler=true but DistilBertForSequenceClassification has no pooler"
    ):
        apply_quantization(distilbert(), cfg)
    with pytest.raises(UserError, match=r"quant.pooler=true needs a weight method"):
        QuantConfig.from_dict({"activation": {"method": "symmetric", "bits": 8}, "pooler": True})


def test_finder_uses_order_not_shapes_when_the_ffn_is_square():
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=40
        )
    )
    roles = {t.role: t.name for t in find_quant_targets(model)}
    assert roles["intermediate"] == "bert.encoder.layer.0.intermediate.dense"
    assert roles["output"] == "bert.encoder.layer.0.output.dense"


def test_unsupported_models_get_one_clear_error():
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16))
    with pytest.raises(UserError, match=r"unsupported architecture.*GPT2Block.*found 0") as err:
        find_quant_targets(gpt2)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"cannot quantize Sequential: not a Hugging Face encoder"):
        apply_quantization(nn.Sequential(nn.Linear(4, 4)), load("binary"))


def test_apply_binary_replaces_exactly_the_targets():
    model = bert()
    plain_types = {n: type(m) for n, m in model.named_modules()}
    names = apply_quantization(model, load("binary"))
    assert len(names) == 13
    for name, module in model.named_modules():
        if name in names:
            assert isinstance(module, QuantEmbedding if name.endswith("word_embeddings") else QuantLinear)
            assert module.weight_spec.method == "binary" and module.quant_enabled
        elif name in plain_types:
            assert type(module) is plain_types[name], name  # pooler, classifier, LayerNorms, position...
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear


def test_apply_respects_targets_and_word_embeddings():
    cfg = QuantConfig.from_dict(
        {
            "weight": {"method": "ternary"},
            "activation": {"method": "asymmetric", "bits": 4},
            "targets": ["intermediate", "output"],
            "word_embeddings": False,
        }
    )
    model = distilbert()
    names = apply_quantization(model, cfg)
    assert names == [f"distilbert.transformer.layer.{i}.ffn.lin{j}" for i in range(3) for j in (1, 2)]
    assert type(model.distilbert.embeddings.word_embeddings) is nn.Embedding
    assert type(model.distilbert.transformer.layer[0].attention.q_lin) is nn.Linear


def test_fp32_is_a_no_op():
    model = bert()
    before = copy.deepcopy(model)
    assert apply_quantization(model, load("fp32")) == []
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert not any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())


def test_bad_group_count_fails_before_changing_the_model():
    cfg = QuantConfig.from_dict({"weight": {"method": "binary", "groups": 48}, "word_embeddings": True})
    model = bert()  # the first target, a 16x16 query, has 256 weights: not a multiple of 48
    with pytest.raises(
        UserError, match=r"groups=48 does not divide the 256 elements of bert\.encoder\.layer\.0"
    ):
        apply_quantization(model, cfg)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_applying_twice_is_an_error():
    model = bert()
    apply_quantization(model, load("binary"))
    with pytest.raises(UserError, match="already quantized"):
        apply_quantization(model, load("binary"))


def test_schedule_switch_and_start_step():
    model = bert()
    cfg = QuantConfig.from_dict({**yaml.safe_load((CONF / "binary.yaml").read_text()), "start_step": 100})
    apply_quantization(model, cfg)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear | QuantEmbedding)]
    assert len(quantized) == 13 and not any(m.quant_enabled for m in quantized)  # full precision first
    assert [cfg.active_at(s) for s in (0, 99, 100, 5000)] == [False, False, True, True]
    assert set_quantization_enabled(model, cfg.active_at(100)) == 13
    assert all(m.quant_enabled for m in quantized)
    assert not load("fp32").active_at(10**6)


def test_summary_counts_parameters_per_bit_width():
    model = bert()
    apply_quantization(model, load("binary"))
    summary = quantization_summary(model)
    # per layer 4 * 16*16 + 2 * 16*32 = 2048 binary weights, 2 layers, + 40*16 word embeddings
    binary = 2 * 2048 + 40 * 16
    total = sum(p.numel() for p in model.parameters())
    assert summary.params_by_bits == {1: binary, 32: total - binary}
    assert len(summary.rows) == 13
    row = next(r for r in summary.rows if r["module"] == "bert.encoder.layer.1.output.dense")
    assert row == {
        "module": "bert.encoder.layer.1.output.dense",
        "kind": "linear",
        "shape": [16, 32],
        "weight_method": "binary",
        "weight_bits": 1,
        "groups": "row",
        "activation_method": "symmetric",
        "activation_bits": 8,
        "activation_range": "dynamic",
        "enabled": True,
    }
    assert "bert.embeddings.word_embeddings" in summary.text
    assert f"1-bit {binary:,}" in summary.text and f"32-bit {total - binary:,}" in summary.text
    fp = quantization_summary(bert())
    assert fp.rows == [] and fp.params_by_bits == {32: total}


# ------------------------------------------------------------------------- config


def test_group_files_load():
    binary, ternary, w4, w8, fp32 = (load(n) for n in ("binary", "ternary", "w4a8", "w8a8", "fp32"))
    assert (binary.name, binary.weight.method, binary.weight.bits, binary.activation.bits) == (
        "w1a8",
        "binary",
        1,
        8,
    )
    assert (ternary.name, ternary.weight.method, ternary.weight.bits) == ("w2a8", "ternary", 2)
    assert (w4.weight.method, w4.weight.bits, w8.weight.bits) == ("symmetric", 4, 8)
    assert binary.targets == ("query", "key", "value", "attention_output", "intermediate", "output")
    assert binary.word_embeddings and binary.activation.range == "dynamic"
    assert not fp32.enabled and binary.enabled


def test_from_dict_accepts_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(yaml.safe_load((CONF / "ternary.yaml").read_text()))
    cfg.weight.groups = 64
    assert QuantConfig.from_dict(cfg).weight.groups == 64
    assert QuantConfig.from_dict({"weight": {"method": "binary", "groups": "64"}}).weight.groups == 64


BASE = yaml.safe_load((CONF / "binary.yaml").read_text())


def with_(path, value):
    d = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[key] = value
    return d


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (with_("activation.bits", 3), r"quant\.activation\.bits=3 is not supported: accepted 4 or 8"),
        (with_("weight.bits", 0), r"quant\.weight\.bits=0 does not fit method binary: it needs bits=1"),
        (with_("weight.bits", 4), r"quant\.weight\.bits=4 does not fit method binary"),
        (
            with_("weight", {"method": "symmetric", "bits": 9, "groups": "row"}),
            r"quant\.weight\.bits=9 is not supported for method symmetric: accepted 2\.\.8",
        ),
        (with_("weight", {"method": "asymmetric", "groups": "row"}), r"quant\.weight\.bits is required"),
        (
            with_("weight.method", "quaternary"),
            r"quant\.weight\.method='quaternary' is not accepted: none \| binary",
        ),
        (
            with_("weight.groups", 0),
            r"quant\.weight\.groups=0 is not accepted: tensor, row or a positive integer",
        ),
        (with_("weight.groups", "column"), r"quant\.weight\.groups='column'"),
        (with_("targets", ["query", "pooler"]), r"unknown target 'pooler'; accepted: query, key"),
        (with_("targets", ["query", "query"]), r"lists a target twice"),
        (with_("targets", "query"), r"quant\.targets='query' is not a list"),
        (
            with_("activation.range", "percentile"),
            r"quant\.activation\.range='percentile' is not accepted: dynamic \| static",
        ),
        (with_("activation.method", "log"), r"quant\.activation\.method='log' is not accepted"),
        (with_("activation.ema_momentum", 1.0), r"ema_momentum=1\.0 is not accepted: a number in \(0, 1\)"),
        (
            with_("activation", {"method": "none", "bits": 8}),
            r"quant\.activation\.bits=8 does not fit method none",
        ),
        (with_("start_step", -1), r"quant\.start_step=-1 is negative"),
        (with_("start_step", "10"), r"quant\.start_step='10' is not an integer"),
        (with_("word_embeddings", "yes"), r"quant\.word_embeddings='yes' is not accepted: true or false"),
        (
            with_("weight.granularity", "row"),
            r"unknown key quant\.weight\.granularity; accepted: method, bits, groups",
        ),
        (with_("schedule", 3), r"unknown key quant\.schedule"),
        (with_("name", ""), r"quant\.name=''"),
        (
            with_("weight", {"method": "none", "bits": 32, "groups": "row"}),
            r"quant\.word_embeddings=true needs a weight method",
        ),
    ],
)
def test_bad_config_raises_one_line_naming_the_value(bad, message):
    with pytest.raises(UserError, match=message) as err:
        QuantConfig.from_dict(bad)
    assert "\n" not in str(err.value)

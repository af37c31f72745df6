"""QuantLinear / QuantEmbedding: hand-computed outputs, static ranges, a whole model, state dicts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from xtc_lightning.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    apply_quantization,
    fake_quantize_weight,
    set_quantization_enabled,
)
from xtc_lightning.quant.config import ActivationSpec, WeightSpec
from xtc_lightning.quant.layers import RANGE_BUFFER

BINARY = WeightSpec("binary", 1, "row")
A8 = ActivationSpec("symmetric", 8, "dynamic")


def plain_state_dict(state_dict: dict) -> dict:
    """The state dict without the activation-range buffers: what loads strictly into the plain HF model."""
    return {k: v for k, v in state_dict.items() if not k.endswith("." + RANGE_BUFFER)}


def linear(weight, bias=None):
    lin = nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias))
    return lin


def test_quant_linear_reuses_parameters_and_computes_by_hand():
    lin = linear([[1.0, -3.0], [2.0, 0.5]], bias=[0.5, -1.0])
    q = QuantLinear(lin, BINARY, ActivationSpec())
    assert q.weight is lin.weight and q.bias is lin.bias
    assert list(dict(q.named_parameters())) == ["weight", "bias"]
    # row 0 -> mean 2: [2, -2]; row 1 -> mean 1.25: [1.25, 1.25]
    x = torch.tensor([[1.0, 2.0]])
    assert q(x).tolist() == [[1 * 2 - 2 * 2 + 0.5, 1.25 + 2 * 1.25 - 1.0]]


def test_quant_linear_quantizes_its_input_per_token():
    lin = linear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # identity: output = quantized input
    q = QuantLinear(lin, WeightSpec(), A8)
    x = torch.tensor([[127.0, -63.4, 0.6], [-254.0, 127.4, 3.0]])
    assert q(x).tolist() == [[127.0, -63.0, 1.0], [-254.0, 128.0, 4.0]]


def test_switch_off_gives_the_plain_layer_and_gradients_reach_the_latent_weight():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    q = QuantLinear(lin, BINARY, A8)
    x = torch.randn(5, 4)
    assert not torch.equal(q(x), lin(x))
    q.quant_enabled = False
    assert torch.equal(q(x), lin(x))
    q.quant_enabled = True
    q(x).sum().backward()
    # d/dW sum(x_q @ W_q^T) = sum over tokens of x_q, passed straight through to W
    x_q = torch.round(x / (x.abs().amax(-1, keepdim=True) / 127)) * (x.abs().amax(-1, keepdim=True) / 127)
    torch.testing.assert_close(lin.weight.grad, x_q.sum(0).expand(3, 4))


def static_identity(momentum=0.5, method="symmetric"):
    lin = linear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return QuantLinear(lin, WeightSpec(), ActivationSpec(method, 8, "static", momentum))


def test_static_range_ema_updates_in_training_and_freezes_in_eval():
    q = static_identity(momentum=0.5)
    assert torch.isnan(q.act_range).all()
    q.train()
    q(torch.tensor([[-10.0, 100.0, 0.0]]))
    assert q.act_range.tolist() == [-10.0, 100.0]  # first batch initialises
    q(torch.tensor([[-30.0, 154.0, 1.0]]))
    assert q.act_range.tolist() == [-20.0, 127.0]  # 0.5 * old + 0.5 * new
    q.eval()
    out = q(torch.tensor([[300.0, -200.0, 3.3]]))
    assert q.act_range.tolist() == [-20.0, 127.0]  # frozen
    assert out.tolist() == [[127.0, -127.0, 3.0]]  # symmetric, scale 127/127 = 1: clipped


def test_static_range_observed_while_disabled_and_batch_range_before_calibration():
    q = static_identity()
    q.eval()  # e.g. Lightning's sanity validation before any training step
    out = q(torch.tensor([[254.0, -1.2, 3.0]]))  # no range yet: this batch's, scale 2
    assert out.tolist() == [[254.0, -2.0, 4.0]]
    assert torch.isnan(q.act_range).all()  # nothing stored in eval
    q.train()
    q.quant_enabled = False
    x = torch.tensor([[-4.0, 8.0, 0.3]])
    assert q(x).tolist() == x.tolist()  # plain forward ...
    assert q.act_range.tolist() == [-4.0, 8.0]  # ... but the range is calibrated


def test_quant_embedding_row_lookup_equals_quantizing_the_whole_table():
    torch.manual_seed(1)
    for spec in (BINARY, WeightSpec("ternary", 2, "row"), WeightSpec("symmetric", 4, "row")):
        emb = nn.Embedding(1000, 384, padding_idx=0)
        q = QuantEmbedding(emb, spec)
        assert q.weight is emb.weight and q.padding_idx == 0
        ids = torch.randint(0, 1000, (4, 50))
        reference = F.embedding(ids, fake_quantize_weight(emb.weight, spec))
        assert torch.equal(q(ids), reference)


def test_quant_embedding_hand_values_and_groups():
    emb = nn.Embedding(2, 4)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0, -3.0, 2.0, 0.0], [-0.5, 0.5, 1.0, -2.0]]))
    ids = torch.tensor([[1, 0, 1]])
    row = QuantEmbedding(emb, BINARY)(ids)
    assert row.tolist() == [[[-1.0, 1.0, 1.0, -1.0], [1.5, -1.5, 1.5, 1.5], [-1.0, 1.0, 1.0, -1.0]]]
    tensor = QuantEmbedding(emb, WeightSpec("binary", 1, "tensor"))(torch.tensor([0]))
    assert tensor.tolist() == [[1.25, -1.25, 1.25, 1.25]]  # mean over the whole table
    pairs = QuantEmbedding(emb, WeightSpec("binary", 1, 4))(torch.tensor([0]))
    assert pairs.tolist() == [[2.0, -2.0, 1.0, 1.0]]


def test_quant_embedding_gradient_reaches_the_looked_up_rows():
    torch.manual_seed(2)
    emb = nn.Embedding(6, 3)
    q = QuantEmbedding(emb, BINARY)
    q(torch.tensor([[1, 4, 1]])).sum().backward()
    expected = torch.zeros(6, 3)
    expected[1], expected[4] = 2.0, 1.0
    assert torch.equal(emb.weight.grad, expected)


# ------------------------------------------------------- a whole (tiny) BERT model


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


W1A8 = {
    "name": "w1a8",
    "weight": {"method": "binary", "bits": 1, "groups": "row"},
    "activation": {"method": "symmetric", "bits": 8, "range": "dynamic"},
    "word_embeddings": True,
}


def hand_binarize(w):
    """sign(w) (zero -> +1) times the row's mean |w|, written out directly."""
    signs = torch.ones_like(w)
    signs[w < 0] = -1.0
    return signs * w.abs().mean(dim=1, keepdim=True)


def hand_quantize_tokens(x):
    """8-bit symmetric per token: each last-dim row scaled by max|row| / 127."""
    out = torch.empty_like(x)
    rows, flat = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for i, row in enumerate(rows):
        scale = row.abs().max() / 127
        flat[i] = torch.round(row / scale) * scale if scale > 0 else 0.0
    return out


def test_quantized_bert_matches_a_hand_quantized_plain_bert():
    plain = tiny_bert()
    quant = copy.deepcopy(plain)
    names = apply_quantization(quant, QuantConfig.from_dict(W1A8))
    assert len(names) == 2 * 6 + 1
    # reference: the plain model with hand-binarized weights and input hooks quantizing per token
    reference = copy.deepcopy(plain)
    with torch.no_grad():
        for name in names:
            module = reference.get_submodule(name)
            module.weight.copy_(hand_binarize(module.weight))
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(lambda m, args: (hand_quantize_tokens(args[0]),))
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = quant(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        fp = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - fp).abs().max() > 0.1  # quantization really changed the output
    set_quantization_enabled(quant, False)
    with torch.no_grad():
        torch.testing.assert_close(quant(input_ids=ids, attention_mask=mask).last_hidden_state, fp)


STATIC_W2A8 = {
    "name": "w2a8-static",
    "weight": {"method": "ternary", "bits": 2, "groups": "row"},
    "activation": {"method": "asymmetric", "bits": 8, "range": "static", "ema_momentum": 0.9},
    "word_embeddings": True,
}


def test_state_dict_round_trip_with_static_ranges_and_loading_into_plain_bert():
    cfg = QuantConfig.from_dict(STATIC_W2A8)
    a = tiny_bert()
    apply_quantization(a, cfg)
    a.train()
    for _ in range(3):
        a(input_ids=torch.randint(1, 50, (2, 6)))
    a.eval()
    sd = a.state_dict()
    range_keys = [k for k in sd if k.endswith(".act_range")]
    assert len(range_keys) == 12 and "encoder.layer.0.attention.self.query.act_range" in range_keys
    assert all(torch.isfinite(sd[k]).all() and sd[k][0] < sd[k][1] for k in range_keys)

    b = tiny_bert()
    torch.nn.init.normal_(b.embeddings.word_embeddings.weight)  # differ before loading
    apply_quantization(b, cfg)
    b.load_state_dict(sd)  # strict
    b.eval()
    for k in range_keys:
        assert torch.equal(b.state_dict()[k], sd[k])
    ids = torch.randint(1, 50, (3, 6))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).last_hidden_state, b(input_ids=ids).last_hidden_state)

    plain = tiny_bert()
    torch.nn.init.normal_(plain.encoder.layer[0].attention.self.query.weight)
    plain.load_state_dict(plain_state_dict(sd))  # strict: same keys as the HF model
    assert set(plain.state_dict()) == set(plain_state_dict(sd))
    assert torch.equal(
        plain.encoder.layer[0].attention.self.query.weight, sd["encoder.layer.0.attention.self.query.weight"]
    )
    with pytest.raises(RuntimeError, match="act_range"):
        tiny_bert().load_state_dict(sd)


def test_dynamic_config_state_dict_has_exactly_the_plain_keys():
    plain = tiny_bert()
    quant = copy.deepcopy(plain)
    apply_quantization(quant, QuantConfig.from_dict(W1A8))
    assert list(quant.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in quant.named_parameters()] == [n for n, _ in plain.named_parameters()]

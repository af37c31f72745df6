"""The int8 x int8 training GEMM: same forward (up to fp32 rounding) and same gradients as the fake-quant path."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from xtc_lightning.quant import QuantConfig, QuantLinear, apply_quantization, int8
from xtc_lightning.quant.config import ActivationSpec, WeightSpec
from xtc_lightning.quant.int8 import FP32_EXACT, int8_training_supported, integer_gemm, weight_code_max

A8 = ActivationSpec("symmetric", 8, "dynamic")


def test_binary_w1a8_forward_by_hand():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -3.0], [2.0, 0.5]]))
        lin.bias.copy_(torch.tensor([0.5, -1.0]))
    q = QuantLinear(lin, WeightSpec("binary", 1, "row"), A8)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    y = q(x)
    assert type(y.grad_fn).__name__ == "_Int8LinearSTEBackward"
    # input: scale 2/127, codes round(63.5) = 64 (half to even), 127
    # weights: row 0 codes [1, -1] scale 2; row 1 codes [1, 1] scale 1.25
    s = 2 / 127
    want = [s * 2 * (64 - 127) + 0.5, s * 1.25 * (64 + 127) - 1.0]
    torch.testing.assert_close(y[0], torch.tensor(want), rtol=1e-6, atol=1e-6)
    # the saved input is its int8 codes (1 byte per element), not a float copy
    assert y.grad_fn.saved_tensors[0].dtype == torch.int8
    assert y.grad_fn.saved_tensors[0].tolist() == [[64, 127]]


WEIGHTS = [
    WeightSpec("binary", 1, "row"),
    WeightSpec("binary", 1, "tensor"),
    WeightSpec("binary", 1, 3),  # 3 groups of 2 whole rows each
    WeightSpec("ternary", 2, "row"),
    WeightSpec("symmetric", 4, "row"),
    WeightSpec("symmetric", 8, "tensor"),
]


@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: w.describe())
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("scale_grad", [False, True])
def test_int8_path_matches_the_fake_quant_path(weight, act_bits, scale_grad):
    torch.manual_seed(0)
    act = ActivationSpec("symmetric", act_bits, "dynamic")
    fast = QuantLinear(nn.Linear(64, 6), weight, act)
    fast.scale_grad = scale_grad  # binary / ternary: the gradient through the scale, on both paths
    ref = copy.deepcopy(fast)
    ref.int8_training = False
    x = torch.randn(4, 5, 64)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), ref(x_ref)
    assert type(y_fast.grad_fn).__name__ == "_Int8LinearSTEBackward"
    assert type(y_ref.grad_fn).__name__ != "_Int8LinearSTEBackward"
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    y_fast.backward(g)
    y_ref.backward(g)
    # the backward multiplies the very same quantized values: gradients agree to GEMM rounding
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec, k",
    [
        (WeightSpec("binary", 1, "row"), 1536),
        (WeightSpec("symmetric", 4, "row"), 384),
        (WeightSpec("symmetric", 8, "row"), 1536),
    ],
)
def test_the_float_route_gives_the_int_mm_sums_exactly(spec, k):
    # every code at its extreme, so the sums reach the bound (8 bits, K = 1536: past 2**24, fp64)
    g = torch.Generator().manual_seed(0)
    q = weight_code_max(spec.method, spec.bits)
    x = torch.randint(-127, 128, (33, k), generator=g, dtype=torch.int8)
    x[0] = 127
    w = torch.randint(-q, q + 1, (24, k), generator=g, dtype=torch.int8)
    w[0] = q
    bound = k * 127 * q
    exact = torch._int_mm(x, w.t())
    assert exact[0, 0] == bound
    assert torch.equal(integer_gemm(x, w, bound, int_mm=False), exact)
    assert torch.equal(integer_gemm(x, w, bound, int_mm=True), exact)


def test_the_float_route_needs_fp64_past_two_to_the_24():
    # 1041 products of 127 * 127: an odd sum just past 2**24, which fp32 cannot hold
    x, w = torch.full((1, 1041), 127, dtype=torch.int8), torch.full((1, 1041), 127, dtype=torch.int8)
    bound = 1041 * 127 * 127
    assert bound > FP32_EXACT and bound % 2 == 1
    assert integer_gemm(x, w, bound, int_mm=False).item() == bound
    assert torch.mm(x.float(), w.float().t()).item() != bound  # fp32 alone would round it


@pytest.mark.parametrize("route", [True, False])
def test_a_training_step_is_the_same_on_either_gemm_route(route, monkeypatch):
    torch.manual_seed(0)
    lin = QuantLinear(nn.Linear(64, 6), WeightSpec("binary", 1, "row"), A8)
    x = torch.randn(4, 5, 64, requires_grad=True)
    monkeypatch.setattr(int8, "int_mm_faster", lambda device_type: not route)
    other = lin(x)
    monkeypatch.setattr(int8, "int_mm_faster", lambda device_type: route)
    y = lin(x)
    assert type(y.grad_fn).__name__ == "_Int8LinearSTEBackward"
    assert torch.equal(y, other)


def test_eval_mode_keeps_the_fp32_reference_path():
    q = QuantLinear(nn.Linear(8, 4), WeightSpec("binary", 1, "row"), A8).eval()
    y = q(torch.randn(3, 8, requires_grad=True))
    assert type(y.grad_fn).__name__ != "_Int8LinearSTEBackward"


@pytest.mark.parametrize(
    "weight, act, supported",
    [
        (WeightSpec("binary", 1, "row"), A8, True),
        (WeightSpec("binary", 1, 2), A8, True),  # 6 rows / 2 groups: whole rows
        (WeightSpec("binary", 1, 4), A8, False),  # 4 groups split the 6 rows
        (WeightSpec("asymmetric", 4, "row"), A8, False),  # codes need a zero point
        (WeightSpec("binary", 1, "row"), ActivationSpec("asymmetric", 8, "dynamic"), False),
        (WeightSpec("binary", 1, "row"), ActivationSpec("symmetric", 8, "static"), False),
        (WeightSpec(), A8, False),  # unquantized weights
        (WeightSpec("binary", 1, "row"), ActivationSpec(), False),  # unquantized inputs
    ],
)
def test_which_layers_train_through_the_integer_gemm(weight, act, supported):
    assert int8_training_supported(weight, act, out_features=6) is supported
    q = QuantLinear(nn.Linear(4, 6), weight, act)
    y = q(torch.randn(2, 4, requires_grad=True))
    assert (type(y.grad_fn).__name__ == "_Int8LinearSTEBackward") is supported


def test_a_quantized_bert_training_step_matches_the_fp32_fake_quant_step():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    fast = BertForSequenceClassification(config)
    spec = {
        "name": "w1a8",
        "weight": {"method": "binary", "groups": "row"},
        "activation": {"method": "symmetric", "bits": 8, "range": "dynamic"},
    }
    apply_quantization(fast, QuantConfig.from_dict(spec))
    ref = copy.deepcopy(fast)
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.int8_training = False
    ids = torch.randint(1, 100, (4, 9))
    labels = torch.tensor([0, 1, 1, 0])
    fast.train(), ref.train()
    loss_fast = fast(input_ids=ids, labels=labels).loss
    loss_ref = ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    loss_fast.backward()
    loss_ref.backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)

"""The quantizers on hand-computed tensors: exact values, codes, STE gradients, zeros."""

import pytest
import torch

from xtc_lightning.errors import UserError
from xtc_lightning.quant.config import ActivationSpec, WeightSpec
from xtc_lightning.quant.quantizers import (
    dequantize_weight,
    ema_update,
    fake_quantize_activation,
    fake_quantize_weight,
    num_groups,
    weight_codes,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def fq(w, method, bits, groups):
    return fake_quantize_weight(w, WeightSpec(method, bits, groups))


# ------------------------------------------------------------------- binary

W_BIN = t([[1.0, -3.0, 2.0, 0.0], [-0.5, 0.5, 1.0, -2.0]])


def test_binary_per_tensor():
    # mean|w| = (1+3+2+0 + 0.5+0.5+1+2) / 8 = 1.25; the zero maps to +scale
    expected = 1.25 * t([[1, -1, 1, 1], [-1, 1, 1, -1]])
    torch.testing.assert_close(fq(W_BIN, "binary", 1, "tensor"), expected, rtol=0, atol=0)


def test_binary_per_row():
    # row 0: mean 6/4 = 1.5; row 1: mean 4/4 = 1.0
    expected = t([[1.5, -1.5, 1.5, 1.5], [-1.0, 1.0, 1.0, -1.0]])
    torch.testing.assert_close(fq(W_BIN, "binary", 1, "row"), expected, rtol=0, atol=0)


def test_binary_contiguous_groups():
    # 4 groups of 2 over the flattened weight: [1,-3] 2.0, [2,0] 1.0, [-.5,.5] .5, [1,-2] 1.5
    expected = t([[2.0, -2.0, 1.0, 1.0], [-0.5, 0.5, 1.5, -1.5]])
    torch.testing.assert_close(fq(W_BIN, "binary", 1, 4), expected, rtol=0, atol=0)


def test_binary_zeros_and_negative_zero_map_to_plus_scale():
    w = t([[0.0, -0.0, -4.0, 0.0]])  # mean 1.0
    out = fq(w, "binary", 1, "row")
    torch.testing.assert_close(out, t([[1.0, 1.0, -1.0, 1.0]]), rtol=0, atol=0)
    assert weight_codes(w, WeightSpec("binary", 1, "row")).codes.tolist() == [[1, 1, -1, 1]]
    # an all-zero group: every weight becomes +0 (scale 0), no NaN
    zero = fq(torch.zeros(2, 3), "binary", 1, "row")
    assert zero.tolist() == [[0.0] * 3] * 2


@pytest.mark.parametrize("groups", ["tensor", "row", 8])
def test_binary_has_exactly_two_values_per_group(groups):
    torch.manual_seed(0)
    w = torch.randn(16, 12)
    w[0, :3] = 0.0
    spec = WeightSpec("binary", 1, groups)
    out = fake_quantize_weight(w, spec).reshape(num_groups(w.shape, groups), -1)
    scale = weight_codes(w, spec).scale
    for g, row in enumerate(out):
        assert sorted(row.unique().tolist()) == [-scale[g].item(), scale[g].item()]
        assert scale[g].item() == pytest.approx(w.reshape(out.shape)[g].abs().mean().item())


# ------------------------------------------------------------------ ternary

W_TER = t([[4.0, -2.0, 0.5, 0.0], [1.0, 1.0, -1.0, 1.0]])


def test_ternary_per_row():
    # row 0: delta = 0.7 * 6.5/4 = 1.1375 -> 4, -2 kept, alpha = (4+2)/2 = 3
    # row 1: delta = 0.7 * 1 = 0.7 -> all kept, alpha = 1
    expected = t([[3.0, -3.0, 0.0, 0.0], [1.0, 1.0, -1.0, 1.0]])
    torch.testing.assert_close(fq(W_TER, "ternary", 2, "row"), expected, rtol=0, atol=0)


def test_ternary_per_tensor():
    # delta = 0.7 * 10.5/8 = 0.91875 -> kept 4, 2, 1, 1, 1, 1 -> alpha = 10/6
    a = 10 / 6
    expected = t([[a, -a, 0.0, 0.0], [a, a, -a, a]])
    torch.testing.assert_close(fq(W_TER, "ternary", 2, "tensor"), expected)


def test_ternary_contiguous_groups():
    # pairs: [4,-2] delta 2.1 -> only 4, alpha 4; [.5,0] delta .175 -> .5; [1,1]; [-1,1]
    expected = t([[4.0, 0.0, 0.5, 0.0], [1.0, 1.0, -1.0, 1.0]])
    torch.testing.assert_close(fq(W_TER, "ternary", 2, 4), expected, rtol=0, atol=0)


def test_ternary_group_with_nothing_above_threshold_is_zero():
    w = t([[0.0, 0.0, 0.0, 0.0], [2.0, -2.0, 0.0, 0.0]])
    wc = weight_codes(w, WeightSpec("ternary", 2, "row"))
    assert wc.scale.tolist() == [0.0, 2.0]
    assert fq(w, "ternary", 2, "row").tolist() == [[0.0] * 4, [2.0, -2.0, 0.0, 0.0]]


@pytest.mark.parametrize("groups", ["tensor", "row", 6])
def test_ternary_has_at_most_three_values_per_group(groups):
    torch.manual_seed(1)
    w = torch.randn(12, 10)
    spec = WeightSpec("ternary", 2, groups)
    out = fake_quantize_weight(w, spec).reshape(num_groups(w.shape, groups), -1)
    alpha = weight_codes(w, spec).scale
    for g, row in enumerate(out):
        values = set(row.unique().tolist())
        assert values <= {-alpha[g].item(), 0.0, alpha[g].item()} and len(values) >= 2
    assert set(out.unique().tolist()) != {0.0}


# ------------------------------------------------------ uniform symmetric / asymmetric


def test_symmetric_4bit_rounds_half_to_even():
    # Q = 7, scale = 7/7 = 1: round(-3.5) = -4, round(0.2) = 0
    w = t([[7.0, -3.5, 1.0, 0.2]])
    assert fq(w, "symmetric", 4, "row").tolist() == [[7.0, -4.0, 1.0, 0.0]]
    assert weight_codes(w, WeightSpec("symmetric", 4, "row")).codes.tolist() == [[7, -4, 1, 0]]


def test_symmetric_8bit_and_2bit():
    # 8 bit: Q = 127, scale 1: -63.5 -> -64 (half to even), 0.4 -> 0
    assert fq(t([[127.0, -63.5, 0.4, 0.0]]), "symmetric", 8, "tensor").tolist() == [[127.0, -64.0, 0.0, 0.0]]
    # 2 bit: Q = 1, scale = 3: w/3 = [1, -1/3, 2/3, 0] -> [1, 0, 1, 0]
    assert fq(t([[3.0, -1.0, 2.0, 0.0]]), "symmetric", 2, "row").tolist() == [[3.0, 0.0, 3.0, 0.0]]


def test_symmetric_per_row_vs_tensor():
    w = t([[3.0, -1.0], [6.0, 2.5]])
    # 3 bit, Q = 3. row: scales 1 and 2 (2.5/2 = 1.25 -> 1); tensor: scale 2 (1.5 -> 2, -0.5 -> 0)
    assert fq(w, "symmetric", 3, "row").tolist() == [[3.0, -1.0], [6.0, 2.0]]
    assert fq(w, "symmetric", 3, "tensor").tolist() == [[4.0, 0.0], [6.0, 2.0]]


def test_asymmetric_2bit_and_positive_rows_keep_zero_in_range():
    w = t([[-1.0, 0.0, 1.0, 2.0], [0.5, 1.0, 1.5, 3.0]])
    wc = weight_codes(w, WeightSpec("asymmetric", 2, "row"))
    # row 0: [-1, 2] -> scale 1, zp 1, codes round(w) + 1; row 1: range [0, 3] -> zp 0
    assert wc.codes.dtype == torch.uint8
    assert wc.codes.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert wc.zero_point.tolist() == [1, 0]
    assert wc.scale.tolist() == [1.0, 1.0]
    assert fq(w, "asymmetric", 2, "row").tolist() == [[-1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]]


def test_asymmetric_8bit():
    # range [-100, 155] -> scale 255/255 = 1, zp 100
    w = t([[-100.0, 155.0, 0.0, 20.4]])
    wc = weight_codes(w, WeightSpec("asymmetric", 8, "tensor"))
    assert wc.codes.tolist() == [[0, 255, 100, 120]]
    assert wc.zero_point.tolist() == [100]
    assert fq(w, "asymmetric", 8, "tensor").tolist() == [[-100.0, 155.0, 0.0, 20.0]]


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_uniform_all_zero_group_gives_zeros_not_nan(method):
    w = t([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]])
    out = fq(w, method, 4, "row")
    assert out[0].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(out).all()
    assert weight_codes(w, WeightSpec(method, 4, "row")).scale[0].item() == 0.0


# --------------------------------------------- codes, dequantize, STE, granularity

ALL_WEIGHT_SPECS = (
    [WeightSpec("binary", 1, g) for g in ("tensor", "row", 12)]
    + [WeightSpec("ternary", 2, g) for g in ("tensor", "row", 12)]
    + [
        WeightSpec(m, b, g)
        for m in ("symmetric", "asymmetric")
        for b in (2, 3, 4, 8)
        for g in ("tensor", "row", 12)
    ]
)


@pytest.mark.parametrize("spec", ALL_WEIGHT_SPECS, ids=str)
def test_dequantized_codes_equal_fake_quant_bit_exactly(spec):
    torch.manual_seed(2)
    w = torch.randn(24, 16) * 0.05
    w[3] = 0.0  # an all-zero row
    w[5, ::2] = 0.0
    w[7, 1::2] = -0.0
    w[9, :4] = -1e-5  # rounds to -0.0 in the uniform methods
    wc = weight_codes(w, spec)
    # bit for bit (also no -0.0 against +0.0)
    fake = fake_quantize_weight(w, spec)
    assert torch.equal(dequantize_weight(wc).view(torch.int32), fake.view(torch.int32))
    # the codes fit the advertised bit-width
    lo, hi = {
        "binary": (-1, 1),
        "ternary": (-1, 1),
        "symmetric": (-(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1),
        "asymmetric": (0, 2**spec.bits - 1),
    }[spec.method]
    assert wc.codes.min().item() >= lo and wc.codes.max().item() <= hi
    assert wc.codes.shape == w.shape and wc.scale.shape == (wc.num_groups,)
    if spec.method == "binary":
        assert set(wc.codes.unique().tolist()) == {-1, 1}  # exactly two codes: 1 bit
    assert (wc.zero_point is None) == (spec.method != "asymmetric")


@pytest.mark.parametrize("spec", ALL_WEIGHT_SPECS[::3], ids=str)
def test_weight_ste_gradient_is_identity(spec):
    torch.manual_seed(3)
    w = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(6, 4)
    (fake_quantize_weight(w, spec) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        # binary: scale 0.3, codes (1, -1, 1, -1); sum g * code = -2; term = code * -2 / 4
        ("binary", [0.5, 2.5, 2.5, 4.5]),
        # ternary: delta 0.21, codes (1, 0, 0, -1), scale 0.45; sum g * code = -3; term = code * -3 / 2
        ("ternary", [-0.5, 2.0, 3.0, 5.5]),
    ],
)
def test_scale_gradient_by_hand(method, expected):
    """With ``scale_grad`` the gradient also flows through the scale (mean |w| over nonzero codes)."""
    w = torch.tensor([[0.5, -0.1, 0.2, -0.4]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    spec = WeightSpec(method, 1 if method == "binary" else 2, "row")
    out = fake_quantize_weight(w, spec, scale_grad=True)
    assert torch.equal(out, fake_quantize_weight(w, spec))  # the forward is unchanged
    (out * g).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([expected]))


@pytest.mark.parametrize("groups", ["row", "tensor", 4])
@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_scale_gradient_matches_autograd_through_the_mean(method, groups):
    """Independent check: identity STE plus autograd through the scale computed with plain torch
    ops (codes held constant) gives the same gradient."""
    torch.manual_seed(5)
    spec = WeightSpec(method, 1 if method == "binary" else 2, groups)
    w = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 8)
    (fake_quantize_weight(w, spec, scale_grad=True) * g).sum().backward()
    v = w.detach().clone().requires_grad_()
    vg = v.reshape(num_groups(v.shape, groups), -1)
    codes = weight_codes(v, spec).codes.reshape(vg.shape).float()
    nonzero = codes.ne(0).float()
    scale = (vg.abs() * nonzero).sum(1, keepdim=True) / nonzero.sum(1, keepdim=True)
    ((v - v.detach()) * g).sum().add((scale * codes * g.reshape(vg.shape)).sum()).backward()
    torch.testing.assert_close(w.grad, v.grad)


def test_scale_gradient_leaves_other_methods_alone():
    w = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(6, 4)
    (fake_quantize_weight(w, WeightSpec("symmetric", 4, "row"), scale_grad=True) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_group_count_must_divide_numel():
    assert num_groups((6, 4), "tensor") == 1
    assert num_groups((6, 4), "row") == 6
    assert num_groups((6, 4), 8) == 8
    with pytest.raises(UserError, match=r"groups=5 does not divide the 24 elements"):
        num_groups((6, 4), 5)
    with pytest.raises(UserError, match="groups=7"):
        fq(torch.ones(6, 4), "binary", 1, 7)


def test_none_method_is_identity():
    w = torch.randn(3, 3)
    assert fake_quantize_weight(w, WeightSpec()) is w


# -------------------------------------------------------------------- activations


def act(method, bits, range_="dynamic"):
    return ActivationSpec(method, bits, range_)


def test_dynamic_symmetric_8bit_per_token():
    x = t([[127.0, -63.4, 0.6, 0.0], [-254.0, 127.4, 1.2, 3.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: scale 1; row 1: scale 254/127 = 2 -> x/2 = [-127, 63.7, .6, 1.5] -> 64, 1, 2; row 2: zeros
    expected = t([[127.0, -63.0, 1.0, 0.0], [-254.0, 128.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert fake_quantize_activation(x, act("symmetric", 8)).tolist() == expected.tolist()
    # a 3-d (batch, token, hidden) input is quantized per token the same way
    out3 = fake_quantize_activation(x.reshape(1, 3, 4), act("symmetric", 8))
    assert out3.tolist() == [expected.tolist()]


def test_dynamic_symmetric_4bit():
    # Q = 7, scale 1: -3.4 -> -3, 0.5 -> 0, 2.5 -> 2 (half to even)
    x = t([[7.0, -3.4, 0.5, 2.5]])
    assert fake_quantize_activation(x, act("symmetric", 4)).tolist() == [[7.0, -3.0, 0.0, 2.0]]


def test_dynamic_asymmetric():
    # 8 bit: range [-100, 155], scale 1, zp 100
    x8 = t([[-100.0, 155.0, 0.0, 20.4]])
    assert fake_quantize_activation(x8, act("asymmetric", 8)).tolist() == [[-100.0, 155.0, 0.0, 20.0]]
    # 4 bit (15 levels): [-5, 10] scale 1 zp 5; a positive row's range starts at 0: [0, 15]
    x4 = t([[-5.0, 10.0, 0.3, 2.6], [1.0, 2.0, 3.4, 15.0]])
    expected = [[-5.0, 10.0, 0.0, 3.0], [1.0, 2.0, 3.0, 15.0]]
    assert fake_quantize_activation(x4, act("asymmetric", 4)).tolist() == expected


def test_dynamic_activation_gradient_is_identity():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    g = torch.randn(2, 5, 8)
    for spec in (act("symmetric", 8), act("asymmetric", 4)):
        x.grad = None
        (fake_quantize_activation(x, spec) * g).sum().backward()
        assert torch.equal(x.grad, g)


def test_static_symmetric_clips_and_zeroes_the_gradient_outside():
    # range [-63.5, 127] -> scale 127/127 = 1
    x = t([200.0, -300.0, 5.4, -0.5, 126.6]).requires_grad_()
    out = fake_quantize_activation(
        x, act("symmetric", 8, "static"), (torch.tensor(-63.5), torch.tensor(127.0))
    )
    assert out.tolist() == [127.0, -127.0, 5.0, 0.0, 127.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_static_asymmetric():
    # range [-5, 10], 4 bit -> scale 1, zp 5; 12 and -7 clip
    x = t([12.0, -7.0, 2.4, 0.0])
    out = fake_quantize_activation(
        x, act("asymmetric", 4, "static"), (torch.tensor(-5.0), torch.tensor(10.0))
    )
    assert out.tolist() == [10.0, -5.0, 2.0, 0.0]


def test_ema_update():
    running = torch.tensor([float("nan"), float("nan")])
    first = ema_update(running, torch.tensor([-2.0, 4.0]), 0.5)
    assert first.tolist() == [-2.0, 4.0]  # never observed: takes the batch value
    assert ema_update(first, torch.tensor([-6.0, 8.0]), 0.5).tolist() == [-4.0, 6.0]

"""KD losses on hand-made tensors, the attention-scores implementation, and the schedules."""

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_classifier
from xtc_lightning.distill import (
    SCORES_IMPLEMENTATION,
    DistillConfig,
    attention_loss,
    distill_forward,
    distill_losses,
    enable_attention_scores,
    ground_truth_loss,
    hidden_direction_loss,
    hidden_loss,
    logits_loss,
    loss_weights_at,
    qkv_direction_loss,
    record_projections,
    similarity,
    teacher_needed,
)
from xtc_lightning.errors import UserError
from xtc_lightning.student import build_student

CONF = Path(__file__).resolve().parents[1] / "conf" / "distill"
ALL = {"logits": 1.0, "attention": 1.0, "hidden": 1.0, "ground_truth": 1.0}
LN2, LN3 = math.log(2), math.log(3)


def padded_batch():
    ids = torch.randint(3, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 1  # RoBERTa's pad id
    return ids, mask


# ----------------------------------------------------------------------------- logits / ground truth


def test_logits_loss_soft_cross_entropy_by_hand():
    # teacher softmax [3/4, 1/4]; student uniform -> CE = ln 2
    assert logits_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])).item() == pytest.approx(
        LN2, abs=1e-6
    )
    # T=2: teacher [2 ln3, 0]/2 -> [3/4, 1/4]; student [0, 2 ln2]/2 -> [1/3, 2/3]
    # CE = -(3/4 ln(1/3) + 1/4 ln(2/3)) = ln3 - ln2/4 ; batch mean with the first row (ln 2)
    student = torch.tensor([[0.0, 2 * LN2], [0.0, 0.0]])
    teacher = torch.tensor([[2 * LN3, 0.0], [7.0, 7.0]])
    expected = ((LN3 - LN2 / 4) + LN2) / 2
    assert logits_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_logits_loss_regression_is_mse():
    loss = logits_loss(
        torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), temperature=5.0, regression=True
    )
    assert loss.item() == pytest.approx(2.5)


def test_ground_truth_loss_skips_unlabelled_examples():
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0], [5.0, 5.0]], requires_grad=True)
    loss = ground_truth_loss(logits, torch.tensor([0, -100, 1]))
    assert loss.item() == pytest.approx(LN2, abs=1e-6)  # mean of rows 0 and 2, both ln 2
    loss = ground_truth_loss(logits, torch.tensor([-100, -100, -100]))
    assert loss.item() == 0.0
    loss.backward()  # stays in the graph
    assert torch.equal(logits.grad, torch.zeros_like(logits))

    reg = ground_truth_loss(
        torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0.0, float("nan"), 5.0]), regression=True
    )
    assert reg.item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert ground_truth_loss(torch.ones(2, 1), torch.full((2,), float("nan")), regression=True).item() == 0.0


# ----------------------------------------------------------------------------- attention / hidden


def test_attention_loss_by_hand_masks_padding_and_normalises_by_real_pairs():
    # one example, one head, 3 positions of which the last is padding
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.tensor([[[[1.0, 2.0, 50.0], [3.0, 4.0, 60.0], [70.0, 80.0, 90.0]]]])
    student = torch.zeros_like(teacher)
    assert attention_loss([student], [teacher], mask).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # two layers are summed
    assert attention_loss([student, student], [teacher, 2 * teacher], mask).item() == pytest.approx(
        7.5 + 30.0
    )


def test_attention_loss_counts_real_elements_per_example_and_head():
    # lengths 2 and 1 -> 4 + 1 real (query, key) pairs per head, 2 heads -> 10 elements
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    student = torch.ones(2, 2, 3, 3)
    teacher = torch.zeros(2, 2, 3, 3)
    assert attention_loss([student], [teacher], mask).item() == pytest.approx(1.0)
    student[:, :, 2, :] = 100.0  # padded queries
    student[:, :, :, 2] = -100.0  # padded keys
    student[1, :, 1, 0] = 100.0  # query 1 of example 1 is padding too
    assert attention_loss([student], [teacher], mask).item() == pytest.approx(1.0)
    # unmasked (all real) the same tensors give a different value: the mask matters
    assert attention_loss([student], [teacher], torch.ones(2, 3)).item() > 100


def test_attention_and_hidden_losses_ignore_any_padded_content():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s_att, t_att = torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5)
    s_hid, t_hid = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    att = attention_loss([s_att], [t_att], mask)
    hid = hidden_loss([s_hid], [t_hid], mask)
    for junk in (torch.randn(()).item() * 1e3, float("nan"), float("inf")):
        s2, t2 = s_att.clone(), t_att.clone()
        s2[0, :, 3:, :] = junk
        t2[0, :, :, 3:] = -junk
        h2 = s_hid.clone()
        h2[0, 3:] = junk
        assert torch.equal(attention_loss([s2], [t2], mask), att)
        assert torch.equal(hidden_loss([h2], [t_hid], mask), hid)
    s_att.requires_grad_(True)
    s3 = s_att.clone()
    s3[0, :, 3:, :] = float("nan")
    attention_loss([s3], [t_att], mask).backward()
    assert torch.isfinite(s_att.grad).all()
    assert torch.equal(s_att.grad[0, :, 3:, :], torch.zeros(2, 2, 5))


def test_hidden_loss_by_hand():
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [99.0, 99.0]]])
    student = torch.zeros_like(teacher)
    # (1 + 1 + 4 + 0) / (2 real tokens * 2 dims)
    assert hidden_loss([student], [teacher], mask).item() == pytest.approx(1.5)
    assert hidden_loss([student, student], [teacher, teacher], mask).item() == pytest.approx(3.0)


def test_hidden_loss_rejects_different_widths():
    with pytest.raises(UserError, match="student hidden size 4 differs from the teacher's 6"):
        hidden_loss([torch.zeros(1, 3, 4)], [torch.zeros(1, 3, 6)], torch.ones(1, 3))


# ----------------------------------------------------------------------------- combiner


def fake_outputs(num_layers: int, seed: int, logits=None):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        logits=torch.randn(2, 3, generator=g) if logits is None else logits,
        attentions=tuple(torch.randn(2, 2, 4, 4, generator=g) for _ in range(num_layers)),
        hidden_states=tuple(torch.randn(2, 4, 6, generator=g) for _ in range(num_layers + 1)),
    )


def test_distill_losses_uses_the_layer_map_and_weights():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    teacher = fake_outputs(4, seed=0)
    # student layers copy teacher layers 1 and 3 exactly -> zero intermediate losses
    exact = SimpleNamespace(
        logits=teacher.logits.clone(),
        attentions=(teacher.attentions[1], teacher.attentions[3]),
        hidden_states=(teacher.hidden_states[0], teacher.hidden_states[2], teacher.hidden_states[4]),
    )
    labels = torch.tensor([0, -100])
    losses = distill_losses(exact, teacher, mask, [1, 3], ALL, labels=labels)
    assert set(losses) == {"logits", "attention", "hidden", "ground_truth", "total"}
    assert losses["attention"].item() == 0.0 and losses["hidden"].item() == 0.0
    # the wrong layers are not zero
    assert distill_losses(exact, teacher, mask, [0, 2], ALL, labels=labels)["attention"].item() > 0.1

    student = fake_outputs(2, seed=1)
    weights = {"logits": 2.0, "attention": 0.5, "hidden": 3.0, "ground_truth": 0.25}
    losses = distill_losses(student, teacher, mask, [1, 3], weights, labels=labels)
    expected = {
        "logits": logits_loss(student.logits, teacher.logits),
        "attention": attention_loss(student.attentions, [teacher.attentions[1], teacher.attentions[3]], mask),
        "hidden": hidden_loss(student.hidden_states, [teacher.hidden_states[i] for i in (0, 2, 4)], mask),
        "ground_truth": ground_truth_loss(student.logits, labels),
    }
    for k, v in expected.items():
        assert torch.equal(losses[k], v), k
    total = (
        2.0 * expected["logits"]
        + 0.5 * expected["attention"]
        + 3.0 * expected["hidden"]
        + 0.25 * expected["ground_truth"]
    )
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_distill_losses_skips_zero_weights_and_explains_missing_outputs():
    mask = torch.ones(2, 4)
    student = SimpleNamespace(logits=torch.zeros(2, 3), attentions=None, hidden_states=None)
    teacher = SimpleNamespace(logits=torch.zeros(2, 3), attentions=None, hidden_states=None)
    only_logits = {"logits": 1.0, "attention": 0.0, "hidden": 0.0, "ground_truth": 0.0}
    losses = distill_losses(student, teacher, mask, [0], only_logits)
    assert set(losses) == {"logits", "total"}
    assert losses["total"].item() == pytest.approx(math.log(3))
    ft = {"logits": 0.0, "attention": 0.0, "hidden": 0.0, "ground_truth": 1.0}
    assert set(distill_losses(student, None, mask, [0], ft, labels=torch.tensor([1, 2]))) == {
        "ground_truth",
        "total",
    }
    with pytest.raises(
        ValueError,
        match="attentions missing from the student outputs: call the model with output_attentions=True",
    ):
        distill_losses(student, teacher, mask, [0], {**only_logits, "attention": 1.0})
    with pytest.raises(ValueError, match="no labels"):
        distill_losses(student, teacher, mask, [0], ft)
    with pytest.raises(UserError, match="exactly the keys"):
        distill_losses(student, teacher, mask, [0], {"logits": 1.0})


# ----------------------------------------------------------------------------- direction matching


def test_hidden_direction_loss_by_hand_is_blind_to_scale_and_padding():
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [99.0, 99.0]]])  # ||real|| = 5
    # the same direction at another scale: 0, whatever the padded token holds
    scaled = 7 * teacher
    scaled[0, 2] = -1e4
    assert hidden_direction_loss([scaled], [teacher], mask).item() == pytest.approx(0.0, abs=1e-7)
    # (0.6, 0, 0, 0.8) against (0, 1, 0, 0): sqrt(0.36 + 1 + 0.64)
    other = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    assert hidden_direction_loss([other], [teacher], mask).item() == pytest.approx(math.sqrt(2.0))
    # opposite directions are the farthest apart (2); layers are summed
    assert hidden_direction_loss([-teacher, other], [teacher, teacher], mask).item() == pytest.approx(
        2.0 + math.sqrt(2.0)
    )


def test_similarity_and_qkv_direction_loss_by_hand():
    x = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])  # (batch 1, head 1, seq 2, d 2)
    expected = torch.tensor([[[[1.0, 1.0], [1.0, 2.0]]]]) / math.sqrt(2)
    torch.testing.assert_close(similarity(x), expected)
    mask = torch.tensor([[1, 1]])
    same = (x, 2 * x, x)
    # q and v match in direction exactly; k = 3x has similarity 9x: still the same direction
    assert qkv_direction_loss([same], [(x, 3 * x, x)], mask).item() == pytest.approx(0.0, abs=1e-6)
    y = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])  # similarity [[1, 0], [0, 1]] / sqrt 2
    # S/||S|| = [1, 1, 1, 2]/sqrt 7, T/||T|| = [1, 0, 0, 1]/sqrt 2, once (the query only)
    a = torch.tensor([1.0, 1.0, 1.0, 2.0]) / math.sqrt(7)
    b = torch.tensor([1.0, 0.0, 0.0, 1.0]) / math.sqrt(2)
    loss = qkv_direction_loss([same], [(y, 2 * x, x)], mask)
    assert loss.item() == pytest.approx((a - b).norm().item(), rel=1e-6)


def test_qkv_direction_loss_ignores_padded_pairs():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    student = [tuple(torch.randn(2, 2, 4, 3) for _ in range(3))]
    teacher = [tuple(torch.randn(2, 2, 4, 3) for _ in range(3))]
    base = qkv_direction_loss(student, teacher, mask)
    junk = [tuple(t.clone() for t in student[0])]
    junk[0][1][0, :, 3] = 1e3  # example 0's padded token
    assert qkv_direction_loss(junk, teacher, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert qkv_direction_loss(junk, teacher, torch.ones(2, 4)).item() != pytest.approx(base.item(), rel=1e-3)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_record_projections_gives_each_layers_q_k_v_by_heads(arch):
    ids, mask = padded_batch()
    model = tiny_classifier(arch, num_layers=3)
    with record_projections(model) as qkv:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(qkv) == 3
    if arch == "distilbert":
        attn = model.distilbert.transformer.layer[1].attention
        lins = (attn.q_lin, attn.k_lin, attn.v_lin)
    else:
        attn = model.bert.encoder.layer[1].attention.self
        lins = (attn.query, attn.key, attn.value)
    h = out.hidden_states[1]  # layer 1's input
    for got, lin in zip(qkv[1], lins, strict=True):
        assert got.shape == (3, 2, 8, 8)
        torch.testing.assert_close(got, _heads(lin(h), 2))
    # the hooks are gone after the block; a disabled block records nothing
    with record_projections(model, enabled=False) as nothing:
        model(input_ids=ids, attention_mask=mask)
    assert nothing is None
    assert not any(lin._forward_hooks for lin in lins)
    # no forward ran inside the block: an error, not an empty record
    with pytest.raises(RuntimeError, match="no forward"), record_projections(model):
        pass


def test_direction_matching_losses_of_real_models_are_blind_to_the_projections_scale():
    """A 1-layer teacher and a student equal to it but with its query projection x3: the attention
    scores' MSE sees the difference, the q/k/v direction loss does not (the similarity matrices
    differ by x9 only); the hidden states differ in direction (softmax is not scale-free)."""
    ids, mask = padded_batch()
    teacher = enable_attention_scores(tiny_classifier("bert", num_layers=1))
    student = build_student(teacher, [0])
    with torch.no_grad():
        student.bert.encoder.layer[0].attention.self.query.weight.mul_(3)
        student.bert.encoder.layer[0].attention.self.query.bias.mul_(3)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with record_projections(teacher) as t_qkv:
        t_out = distill_forward(teacher, inputs, attention=True, hidden=True)
    with record_projections(student) as s_qkv:
        s_out = distill_forward(student, inputs, attention=True, hidden=True)
    kd = {"logits": 1.0, "attention": 1.0, "hidden": 1.0, "ground_truth": 0.0}
    plain = distill_losses(s_out, t_out, mask, [0], kd)
    matched = distill_losses(
        s_out, t_out, mask, [0], kd, direction=("attention", "hidden"), projections=(s_qkv, t_qkv)
    )
    assert set(matched) == {"logits", "qkv_direction", "hidden_direction", "total"}
    assert plain["attention"].item() > 1.0
    assert matched["qkv_direction"].item() == pytest.approx(0.0, abs=1e-5)
    assert matched["hidden_direction"].item() > 1e-3
    assert torch.equal(matched["logits"], plain["logits"])
    weighted = distill_losses(
        s_out,
        t_out,
        mask,
        [0],
        {**kd, "attention": 2.0, "hidden": 0.5},
        direction=("attention", "hidden"),
        projections=(s_qkv, t_qkv),
    )
    expected = weighted["logits"] + 2.0 * weighted["qkv_direction"] + 0.5 * weighted["hidden_direction"]
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the student's gradient flows through its recorded projections
    matched["total"].backward()
    assert student.bert.encoder.layer[0].attention.self.key.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the projections"):
        distill_losses(s_out, t_out, mask, [0], kd, direction=("attention", "hidden"))
    # the attention loss alone in its direction form: the hidden MSE stays
    attention_only = distill_losses(
        s_out, t_out, mask, [0], kd, direction=("attention",), projections=(s_qkv, t_qkv)
    )
    assert set(attention_only) == {"logits", "qkv_direction", "hidden", "total"}
    assert torch.equal(attention_only["hidden"], plain["hidden"])
    with pytest.raises(ValueError, match="only attention and hidden have a direction form"):
        distill_losses(s_out, t_out, mask, [0], kd, direction=("logits",))


# ----------------------------------------------------------------------------- scores implementation


def _heads(x, num_heads):
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_scores_implementation_matches_eager_and_returns_raw_scores(arch):
    ids, mask = padded_batch()
    model = tiny_classifier(arch, attn="eager")
    eager = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert enable_attention_scores(model) is model
    enable_attention_scores(model)  # idempotent
    assert model.config._attn_implementation == SCORES_IMPLEMENTATION
    out = distill_forward(model, {"input_ids": ids, "attention_mask": mask}, attention=True, hidden=True)

    assert torch.equal(out.logits, eager.logits)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    for a, b in zip(out.hidden_states, eager.hidden_states, strict=True):
        assert torch.equal(a, b)

    # layer 2's scores, by hand from the layer's weights: q.k^T / sqrt(d_head)
    if arch == "distilbert":
        attn = model.distilbert.transformer.layer[2].attention
        q_lin, k_lin, heads = attn.q_lin, attn.k_lin, model.config.n_heads
    else:
        attn = getattr(model, arch).encoder.layer[2].attention.self
        q_lin, k_lin, heads = attn.query, attn.key, model.config.num_attention_heads
    h = out.hidden_states[2]
    q, k = _heads(q_lin(h), heads), _heads(k_lin(h), heads)
    by_hand = q @ k.transpose(-1, -2) / math.sqrt(16 // heads)
    scores = out.attentions[2]
    assert scores.shape == (3, heads, 8, 8)
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-5)
    assert scores.abs().max() > 1.0  # not probabilities
    # eager's probabilities are the softmax of these scores over real keys only
    probs = torch.softmax(scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")), dim=-1)
    torch.testing.assert_close(eager.attentions[2], probs, rtol=1e-5, atol=1e-6)


def test_scores_implementation_from_sdpa_and_student_inherits_it():
    ids, mask = padded_batch()
    model = tiny_classifier("bert", attn="sdpa")
    sdpa_logits = model(input_ids=ids, attention_mask=mask).logits
    enable_attention_scores(model)
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask).logits, sdpa_logits, rtol=1e-5, atol=1e-5
    )
    student = build_student(model, [0, 3])
    assert student.config._attn_implementation == SCORES_IMPLEMENTATION
    assert student(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0].abs().max() > 1.0


def test_distill_forward_refuses_probabilities():
    model = tiny_classifier("distilbert", attn="eager")
    ids, mask = padded_batch()
    with pytest.raises(RuntimeError, match="enable_attention_scores"):
        distill_forward(model, {"input_ids": ids, "attention_mask": mask}, attention=True, hidden=False)
    out = distill_forward(model, {"input_ids": ids, "attention_mask": mask}, attention=False, hidden=True)
    assert out.attentions is None and len(out.hidden_states) == 5


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_end_to_end_losses_do_not_depend_on_padded_tokens(arch):
    teacher = enable_attention_scores(tiny_classifier(arch, num_layers=4))
    student = build_student(teacher, [1, 3])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, mask = padded_batch()
    labels = torch.tensor([0, 2, -100])

    def losses(input_ids, attention_mask):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.no_grad():
            t = distill_forward(teacher, inputs, attention=True, hidden=True)
        s = distill_forward(student, inputs, attention=True, hidden=True)
        return distill_losses(s, t, attention_mask, [1, 3], ALL, labels=labels)

    base = losses(ids, mask)
    assert all(v.item() > 1e-3 for v in base.values())
    other = ids.clone()
    other[mask == 0] = torch.randint(
        3, 40, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(5)
    )
    changed = losses(other, mask)
    for k in base:
        assert torch.equal(base[k], changed[k]), k
    # negative control: had the padded tokens been real, the losses would change
    assert not torch.equal(
        losses(other, torch.ones_like(mask))["attention"], losses(ids, torch.ones_like(mask))["attention"]
    )


# ----------------------------------------------------------------------------- schedules


def preset(name) -> DistillConfig:
    return DistillConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))


def test_xtc_is_one_stage_with_all_kd_losses():
    cfg = preset("xtc")
    assert cfg.name == "xtc"
    for epoch in range(3):
        assert loss_weights_at(cfg, epoch, 3) == {
            "logits": 1.0,
            "attention": 1.0,
            "hidden": 1.0,
            "ground_truth": 0.0,
        }
    # step-bounded runs (Lightning max_epochs=-1) need no epoch count for one stage
    assert loss_weights_at(cfg, 7, -1) == loss_weights_at(cfg, 0, 3)


def test_two_stage_switches_from_intermediate_to_prediction():
    cfg = preset("two_stage")
    intermediate = {"logits": 0.0, "attention": 1.0, "hidden": 1.0, "ground_truth": 0.0}
    prediction = {"logits": 1.0, "attention": 0.0, "hidden": 0.0, "ground_truth": 0.0}
    assert [loss_weights_at(cfg, e, 4) for e in range(4)] == [intermediate] * 2 + [prediction] * 2
    # 0.5 * 3 = 1.5 rounds half up to 2 intermediate epochs
    assert [loss_weights_at(cfg, e, 3) for e in range(3)] == [intermediate] * 2 + [prediction]
    assert [loss_weights_at(cfg, e, 2) for e in range(2)] == [intermediate, prediction]
    with pytest.raises(UserError, match="gives 1 intermediate epoch.*both stages need at least one epoch"):
        loss_weights_at(cfg, 0, 1)
    with pytest.raises(UserError, match="two-stage distillation needs max_epochs >= 2, got -1"):
        loss_weights_at(cfg, 0, -1)
    tenth = replace(cfg, intermediate_fraction=0.1)
    with pytest.raises(UserError, match="gives 0 intermediate epoch"):
        loss_weights_at(tenth, 0, 4)
    assert loss_weights_at(tenth, 0, 10) == intermediate and loss_weights_at(tenth, 1, 10) == prediction


def test_logits_only_and_none():
    assert loss_weights_at(preset("logits_only"), 1, 2) == {
        "logits": 1.0,
        "attention": 0.0,
        "hidden": 0.0,
        "ground_truth": 0.0,
    }
    none = loss_weights_at(preset("none"), 0, 1)
    assert none == {"logits": 0.0, "attention": 0.0, "hidden": 0.0, "ground_truth": 1.0}
    assert not teacher_needed(none)
    assert teacher_needed(loss_weights_at(preset("logits_only"), 0, 1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 0}, "temperature=0 is invalid"),
        ({"temperature": True}, "temperature=True is invalid"),
        (
            {"intermediate_fraction": 1.0},
            r"intermediate_fraction=1.0 is invalid: expected a number in \[0, 1\)",
        ),
        (
            {"weights": {"logits": -1, "attention": 1, "hidden": 1, "ground_truth": 0}},
            r"weights.logits=-1 is invalid",
        ),
        ({"weights": {"logits": 1, "attention": 1, "hidden": 1}}, "exactly the keys"),
        (
            {"weights": {"logits": 0, "attention": 0, "hidden": 0, "ground_truth": 0}},
            "all loss weights are 0",
        ),
        (
            {"weights": {"logits": 0, "attention": 1, "hidden": 1, "ground_truth": 0}},
            "needs a weight > 0 in both stages",
        ),
        ({"stages": 2}, r"unknown keys \['stages'\]"),
        ({"name": ""}, "distill.name='' is invalid"),
    ],
)
def test_distill_config_validation(change, message):
    cfg = {**preset("two_stage").as_dict(), **change}
    with pytest.raises(UserError, match=message):
        DistillConfig.from_dict(cfg)


def test_distill_config_missing_key():
    cfg = preset("xtc").as_dict()
    del cfg["temperature"]
    with pytest.raises(UserError, match=r"missing keys \['temperature'\]"):
        DistillConfig.from_dict(cfg)


def test_distill_config_keeps_the_values_as_given():
    """The reduced student's cache key hashes ``as_dict()``: an int stays an int."""
    given = {
        **preset("xtc").as_dict(),
        "temperature": 2,
        "weights": {"logits": 1, "attention": 0.5, "hidden": 0, "ground_truth": 0},
    }
    config = DistillConfig.from_dict(given)
    assert config.as_dict() == given and isinstance(config.as_dict()["temperature"], int)
    assert loss_weights_at(config, 0, 1) == {
        "logits": 1.0,
        "attention": 0.5,
        "hidden": 0.0,
        "ground_truth": 0.0,
    }

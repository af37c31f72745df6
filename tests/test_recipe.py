"""The quantize stage's recipe: validation, the progressive schedule by hand, mixed-weight layers,
the ternary -> binary hand-off, and the latent-weight optimizer group."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import tiny_classifier
from xtc_lightning.config import OptimConfig
from xtc_lightning.distill import DistillConfig, enable_attention_scores
from xtc_lightning.errors import UserError
from xtc_lightning.modules import DistillModule
from xtc_lightning.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    apply_quantization,
    clip_latent_weights,
    fake_quantize_weight,
    latent_weights,
    pull_latent_weights,
    set_weight_form,
)
from xtc_lightning.quant.config import ActivationSpec, WeightSpec
from xtc_lightning.recipe import Recipe

BINARY = WeightSpec("binary", 1, "row")
TERNARY = WeightSpec("ternary", 2, "row")
A8 = ActivationSpec("symmetric", 8, "dynamic")
W1A8 = QuantConfig(name="w1a8", weight=BINARY, activation=A8, word_embeddings=True)
W2A8 = QuantConfig(name="w2a8", weight=TERNARY, activation=A8, word_embeddings=True)
XTC_DISTILL = DistillConfig.from_dict(
    {
        "name": "xtc",
        "temperature": 1.0,
        "weights": {"logits": 1.0, "attention": 1.0, "hidden": 1.0, "ground_truth": 0.0},
        "intermediate_fraction": 0.0,
    }
)
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_epochs=0.0, betas=(0.9, 0.999), eps=1e-8)
XTC_RECIPE = {  # conf/recipe/xtc.yaml, its latent_weight_decay resolved (optim.weight_decay)
    "name": "xtc",
    "progressive": "none",
    "progressive_epochs": 0.0,
    "latent_lr": None,
    "latent_weight_decay": 0.01,
    "latent_clip": None,
    "latent_pull": None,
    "attention_scale": 1.0,
    "direction_matching": "none",
    "dropout": None,
    "scale_gradient": False,
    "teacher": "teacher",
    "start_run": None,
}


def recipe(**kw) -> Recipe:
    return Recipe.from_dict({**XTC_RECIPE, **kw}, W1A8, quantize_epochs=3)


@pytest.mark.parametrize(
    ("given", "quant", "message"),
    [
        ({"progresive": "ramp"}, W1A8, "recipe: unknown keys ['progresive'] / missing keys []"),
        ({"progressive": "linear"}, W1A8, "recipe.progressive='linear' is not accepted: none | ramp | ternary"),
        ({"progressive": "ramp", "progressive_epochs": 3}, W1A8, "a number in (0, quantize.max_epochs=3)"),
        ({"progressive": "ramp", "progressive_epochs": 0}, W1A8, "a number in (0, quantize.max_epochs=3)"),
        ({"progressive_epochs": 1}, W1A8, "needs recipe.progressive=ramp or ternary (it is none)"),
        ({"progressive": "ternary", "progressive_epochs": 1}, W2A8, "needs quant.weight.method=binary, not ternary"),
        ({"latent_lr": 0}, W1A8, "recipe.latent_lr=0.0 is not accepted: a number > 0, or null"),
        ({"latent_lr": "fast"}, W1A8, "recipe.latent_lr='fast' is not accepted: a finite number"),
        ({"latent_weight_decay": -0.1}, W1A8, "recipe.latent_weight_decay=-0.1 is not accepted: a number >= 0"),
        ({"latent_clip": 1}, W1A8, "recipe.latent_clip=1.0 is not accepted: a number > 1 (a multiple of the group's mean|w|), or null"),
        ({"latent_clip": "tight"}, W1A8, "recipe.latent_clip='tight' is not accepted: a finite number"),
        ({"latent_clip": 2}, QuantConfig(), "recipe.latent_clip=2.0 needs binary or ternary weights"),
        ({"latent_pull": 0}, W1A8, "recipe.latent_pull=0.0 is not accepted: a fraction in (0, 1], or null"),
        ({"latent_pull": 1.5}, W1A8, "recipe.latent_pull=1.5 is not accepted: a fraction in (0, 1], or null"),
        ({"latent_pull": "some"}, W1A8, "recipe.latent_pull='some' is not accepted: a finite number"),
        ({"latent_pull": 0.01}, W2A8, "recipe.latent_pull=0.01 needs binary weights (quant.weight.method=ternary)"),
        ({"attention_scale": float("nan")}, W1A8, "recipe.attention_scale=nan is not accepted: a finite number"),
        ({"progressive": "ramp", "progressive_epochs": 1}, QuantConfig(), "needs quantized weights"),
        ({"direction_matching": True}, W1A8, "recipe.direction_matching=True is not accepted: none | attention | all"),
        ({"direction_matching": ["all"]}, W1A8, "recipe.direction_matching=['all'] is not accepted: none | attention | all"),
        ({"dropout": 1}, W1A8, "recipe.dropout=1.0 is not accepted: a probability in [0, 1), or null"),
        ({"dropout": -0.1}, W1A8, "recipe.dropout=-0.1 is not accepted: a probability in [0, 1), or null"),
        ({"dropout": "off"}, W1A8, "recipe.dropout='off' is not accepted: a finite number"),
        ({"scale_gradient": "yes"}, W1A8, "recipe.scale_gradient='yes' is not accepted: true or false"),
        ({"scale_gradient": True}, QuantConfig(), "scale_gradient=true needs binary or ternary weights"),
        ({"teacher": "student"}, W1A8, "recipe.teacher='student' is not accepted: teacher | fp32_student | start_run"),
        ({"teacher": "start_run"}, W1A8, "recipe.teacher=start_run needs recipe.start_run (a finished quantized run folder)"),
        ({"start_run": ""}, W1A8, "recipe.start_run='' is not accepted: a run folder, or null"),
    ],
)  # fmt: skip
def test_bad_recipes_fail_in_one_line(given, quant, message):
    with pytest.raises(UserError, match=None) as err:
        Recipe.from_dict({**XTC_RECIPE, **given}, quant, quantize_epochs=3)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_recipe_without_a_key_is_refused():
    given = {k: v for k, v in XTC_RECIPE.items() if k != "latent_weight_decay"}
    with pytest.raises(
        UserError, match=r"recipe: unknown keys \[\] / missing keys \['latent_weight_decay'\]"
    ):
        Recipe.from_dict(given, W1A8, quantize_epochs=3)


def test_ramp_schedule_by_hand():
    r = recipe(progressive="ramp", progressive_epochs=0.5)
    # 10 steps per epoch: P = 5 steps; m = (step + 1) / 6 for steps 0..4, then exactly 1
    assert r.progressive_steps(10) == 5
    assert [r.mix_at(s, 10) for s in range(7)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0]
    assert r.weight_spec_at(0, 10, BINARY) == BINARY  # a ramp keeps the configured quantizer
    plain = recipe()
    assert plain.progressive_steps(10) == 0 and plain.mix_at(0, 10) == 1.0


def test_ternary_phase_then_binary():
    r = recipe(progressive="ternary", progressive_epochs=1.5)
    assert r.progressive_steps(4) == 6
    assert [r.weight_spec_at(s, 4, BINARY).method for s in (0, 5, 6, 100)] == [
        "ternary",
        "ternary",
        "binary",
        "binary",
    ]
    assert r.weight_spec_at(0, 4, BINARY).groups == "row" and r.mix_at(0, 4) == 1.0


def test_mixed_linear_forward_and_identity_gradient_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -3.0], [2.0, 0.5]]))
    q = QuantLinear(lin, BINARY, ActivationSpec())
    q.mix = 0.25
    # Q(w) = [[2, -2], [1.25, 1.25]]; w + 0.25 (Q(w) - w) = [[1.25, -2.75], [1.8125, 0.6875]]
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    y = q(x)
    assert y.tolist() == [[1.25 - 2 * 2.75, 1.8125 + 2 * 0.6875]]
    y.sum().backward()
    assert q.weight.grad.tolist() == [[1.0, 2.0], [1.0, 2.0]]  # identity to w: dL/dW = x per row
    q.mix = 1.0
    assert q(x).tolist() == [[2 - 4.0, 1.25 + 2.5]]  # exactly the binary layer again


def test_mixed_training_leaves_the_int8_path_and_returns_to_it():
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(8, 4), BINARY, A8).train()
    x = torch.randn(3, 8)
    w_q = fake_quantize_weight(q.weight, BINARY)
    q.mix = 0.5
    from xtc_lightning.quant.quantizers import fake_quantize_activation

    expected = F.linear(fake_quantize_activation(x, A8), torch.lerp(q.weight, w_q, 0.5), q.bias)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
    q.mix = 1.0
    assert q.int8_training
    torch.testing.assert_close(q(x), F.linear(fake_quantize_activation(x, A8), w_q, q.bias))


def test_mixed_embedding_rows():
    emb = nn.Embedding(3, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0, -3.0], [2.0, 0.5], [0.0, 4.0]]))
    q = QuantEmbedding(emb, BINARY)
    q.mix = 0.5
    assert q(torch.tensor([0, 2])).tolist() == [[1.5, -2.5], [1.0, 3.0]]  # Q rows [2,-2], [2,2]


def test_set_weight_form_hands_ternary_over_to_binary():
    model = tiny_classifier("bert", num_layers=2)
    apply_quantization(model, W1A8)
    n = set_weight_form(model, W1A8, lambda configured: TERNARY)
    assert n == 2 * 6 + 1  # six linears per layer and the word embeddings
    q = model.bert.encoder.layer[0].attention.self.query
    codes = fake_quantize_weight(q.weight, q.weight_spec) / q.weight.abs().mean()
    assert q.weight_spec == TERNARY and (fake_quantize_weight(q.weight, q.weight_spec) == 0).any()
    assert codes.isfinite().all()
    set_weight_form(model, W1A8)
    assert q.weight_spec == BINARY and q.mix == 1.0 and q.int8_training
    assert (fake_quantize_weight(q.weight, q.weight_spec) != 0).all()


def distill_module(r: Recipe, quant: QuantConfig = W1A8) -> DistillModule:
    teacher = tiny_classifier("bert", num_layers=2)
    student = tiny_classifier("bert", num_layers=2)
    apply_quantization(student, quant)
    module = DistillModule(teacher, student, "mnli", [0, 1], XTC_DISTILL, OPTIM, 1e-3, quant, r)
    module.trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=2, global_step=0)
    return module


def test_latent_weights_get_their_own_lr_and_decay():
    module = distill_module(recipe(latent_lr=1e-2, latent_weight_decay=0.0))
    groups = module.configure_optimizers()["optimizer"].param_groups
    latent = {id(p) for p in latent_weights(module.student)}
    assert len(latent) == 13
    assert [len(g["params"]) for g in groups][2] == 13 and {id(p) for p in groups[2]["params"]} == latent
    assert groups[2]["lr"] == pytest.approx(1e-2) and groups[2]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.01
    assert not latent & {id(p) for g in groups[:2] for p in g["params"]}
    # every trainable parameter is optimized exactly once
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_eight_bit_weights_train_at_the_stage_lr():
    """The latent-weight group holds binary and ternary weights only: an 8-bit code changes with
    small steps, so recipe.latent_lr (made for sign flips) leaves 4/8-bit weights alone."""
    w8a8 = QuantConfig(
        name="w8a8", weight=WeightSpec("symmetric", 8, "row"), activation=A8, word_embeddings=True
    )
    module = distill_module(
        Recipe.from_dict({**XTC_RECIPE, "latent_lr": 1e-2}, w8a8, quantize_epochs=3), w8a8
    )
    assert latent_weights(module.student) == []
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 2 and all(g["lr"] == 1e-3 for g in groups)
    ternary = distill_module(
        Recipe.from_dict({**XTC_RECIPE, "latent_lr": 1e-2}, W2A8, quantize_epochs=3), W2A8
    )
    assert len(latent_weights(ternary.student)) == 13


HAND_W = torch.tensor([[1.0, -2.0, 3.0, -6.0], [0.5, 0.5, -0.5, 4.5]])  # the by-hand tests' latent weights


def layer(spec: WeightSpec) -> QuantLinear:
    """A 4 -> 2 quantized linear on ``HAND_W``."""
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(HAND_W)
    return QuantLinear(lin, spec, A8)


def test_clip_latent_weights_by_hand():
    """Each binary/ternary latent weight is clamped to +-clip * mean|w| of its group; signs stay,
    8-bit weights are left alone."""
    w = HAND_W

    def clamped(model: nn.Module, clip: float) -> int:
        """Clamp; return how many weights it changed."""
        before = [p.detach().clone() for p in model.parameters()]
        assert clip_latent_weights(model, clip) is None  # nothing read back: no device sync
        return sum(int((b != a).sum()) for b, a in zip(before, model.parameters(), strict=True))

    rows, tensor, ternary = layer(BINARY), layer(WeightSpec("binary", 1, "tensor")), layer(TERNARY)
    eight = layer(WeightSpec("symmetric", 8, "row"))
    model = nn.ModuleList([rows, tensor, ternary, eight])
    # rows: mean|w| 3 and 1.5 -> bounds 4.5 and 2.25; tensor: mean|w| 18 / 8 = 2.25 -> bound 3.375
    assert clamped(model, 1.5) == 2 + 2 + 2
    assert rows.weight.tolist() == [[1.0, -2.0, 3.0, -4.5], [0.5, 0.5, -0.5, 2.25]]
    assert ternary.weight.tolist() == rows.weight.tolist()
    assert tensor.weight.tolist() == [[1.0, -2.0, 3.0, -3.375], [0.5, 0.5, -0.5, 3.375]]
    assert torch.equal(eight.weight, w)
    emb = QuantEmbedding(nn.Embedding(2, 4), BINARY)
    with torch.no_grad():
        emb.weight.copy_(w)
    clip_latent_weights(emb, 1.5)  # an embedding's groups are its token rows
    assert emb.weight.tolist() == rows.weight.tolist()
    # the bound comes from the weights before the clamp: the clamped groups' mean|w| shrank, so a
    # second clamp cuts again, nearer (rows: mean|w| 10.5 / 4 and 3.75 / 4; tensor: 14.25 / 8)
    assert clamped(model, 1.5) == 2 + 2 + 3
    assert rows.weight.tolist() == [[1.0, -2.0, 3.0, -3.9375], [0.5, 0.5, -0.5, 1.40625]]
    assert tensor.weight.tolist() == [[1.0, -2.0, 2.671875, -2.671875], [0.5, 0.5, -0.5, 2.671875]]


def test_pull_latent_weights_by_hand():
    """Each binary latent weight moves the fraction rate of the way to mean|w| * sign(w) of its
    group; signs and group means stay, so the binary weights the forward uses do too; ternary and
    8-bit weights are left alone."""
    w = HAND_W

    rows, tensor = layer(BINARY), layer(WeightSpec("binary", 1, "tensor"))
    ternary, eight = layer(TERNARY), layer(WeightSpec("symmetric", 8, "row"))
    x = torch.randn(5, 4)
    before = rows(x)
    assert pull_latent_weights(nn.ModuleList([rows, tensor, ternary, eight]), 0.25) is None  # no sync
    # rows: mean|w| 3 and 1.5: w + (+-3 - w) / 4 and w + (+-1.5 - w) / 4
    assert rows.weight.tolist() == [[1.5, -2.25, 3.0, -5.25], [0.75, 0.75, -0.75, 3.75]]
    # tensor: mean|w| 18 / 8 = 2.25
    assert tensor.weight.tolist() == [[1.3125, -2.0625, 2.8125, -5.0625], [0.9375, 0.9375, -0.9375, 3.9375]]
    assert torch.equal(ternary.weight, w) and torch.equal(eight.weight, w)
    assert rows.weight.abs().mean(dim=1).tolist() == [3.0, 1.5]  # the scales
    assert torch.equal(rows.weight.sign(), w.sign())  # the codes
    assert torch.equal(rows(x), before)  # so the forward is unchanged
    emb = QuantEmbedding(nn.Embedding(2, 4), BINARY)
    with torch.no_grad():
        emb.weight.copy_(w)
    pull_latent_weights(emb, 0.25)  # an embedding's groups are its token rows
    assert emb.weight.tolist() == rows.weight.tolist()
    pull_latent_weights(emb, 1.0)  # the whole way: the binary weight itself
    assert emb.weight.tolist() == [[3.0, -3.0, 3.0, -3.0], [1.5, 1.5, -1.5, 1.5]]


def test_quantize_steps_clip_and_pull_the_latent_weights(monkeypatch):
    """With recipe.latent_clip (latent_pull), every optimizer step of a real Lightning fit ends with
    the clamp (the pull), on the student's weights as the step left them; without it there is none."""
    import lightning as L
    from torch.utils.data import DataLoader

    import xtc_lightning.modules as modules

    torch.manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 20, (4, 8)),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,)),
        }
        for _ in range(3)
    ]
    calls = []

    def spy(model, clip):
        before = [w.detach().clone() for w in latent_weights(model)]
        clip_latent_weights(model, clip)
        pairs = list(zip(before, latent_weights(model), strict=True))
        changed = sum(int((b != a).sum()) for b, a in pairs)
        bounds = [clip * b.abs().mean(dim=1, keepdim=True) for b in before]
        n = sum(int((b.abs() > bound).sum()) for b, bound in zip(before, bounds, strict=True))
        # every group here is a row (the padding row is all zeros): no weight is left beyond
        # clip * its row's mean|w| before the clamp
        worst = max(
            float((a.abs() / b.abs().mean(dim=1, keepdim=True).clamp(min=1e-30)).max()) for b, a in pairs
        )
        calls.append((clip, n, changed, worst))

    monkeypatch.setattr(modules, "clip_latent_weights", spy)

    def fit(r: Recipe) -> None:
        module = distill_module(r)
        enable_attention_scores(module.teacher)
        enable_attention_scores(module.student)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        assert trainer.global_step == 3

    pulls = []

    def pull_spy(model, rate):
        before = [w.detach().clone() for w in latent_weights(model)]
        pull_latent_weights(model, rate)
        for b, a in zip(before, latent_weights(model), strict=True):
            target = b.abs().mean(dim=1, keepdim=True) * torch.where(b >= 0, 1.0, -1.0)
            assert torch.equal(a.sign(), b.sign())
            torch.testing.assert_close(a - target, (1 - rate) * (b - target))
        pulls.append(
            (rate, sum(int((b != a).sum()) for b, a in zip(before, latent_weights(model), strict=True)))
        )

    monkeypatch.setattr(modules, "pull_latent_weights", pull_spy)

    fit(recipe(latent_lr=1e-2, latent_clip=1.5))
    assert [c for c, *_ in calls] == [1.5] * 3
    assert all(n > 100 and changed == n for _, n, changed, _ in calls)  # it clamps what is beyond the bound
    assert [worst for *_, worst in calls] == pytest.approx([1.5] * 3), calls
    assert pulls == []
    calls.clear()
    fit(recipe(latent_lr=1e-2, latent_pull=0.1))
    assert calls == [] and [r for r, _ in pulls] == [0.1] * 3
    assert all(n > 1000 for _, n in pulls), pulls  # it moves the student's latent weights
    pulls.clear()
    fit(recipe(latent_lr=1e-2))
    assert calls == [] and pulls == []


def test_direction_matching_trains_the_quantized_student_on_the_direction_losses():
    """recipe.direction_matching in a real Lightning fit of a W1A8 student: the logged losses are
    the logits, q/k/v direction and hidden direction losses (no attention-score or hidden MSE),
    the total is their weighted sum (attention_scale applies), and the first step's values equal
    the losses computed apart from the module, on the quantized student's own projections."""
    import lightning as L
    from torch.utils.data import DataLoader

    from xtc_lightning.distill import distill_forward, distill_losses, record_projections

    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 20, (4, 8)),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 8, [1] * 2 + [0] * 6]),
        "labels": torch.randint(0, 3, (4,)),
    }
    # no dropout (recipe.dropout=0): the first step's forward is computed again below
    module = distill_module(
        recipe(latent_lr=1e-2, direction_matching="all", attention_scale=0.5, dropout=0.0)
    )
    enable_attention_scores(module.teacher)
    enable_attention_scores(module.student)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    module.on_train_batch_start(batch, 0)  # the training form of step 0
    with torch.no_grad(), record_projections(module.teacher) as t_qkv:
        t_out = distill_forward(module.teacher, inputs, attention=False, hidden=True)
    with torch.no_grad(), record_projections(module.student) as s_qkv:
        s_out = distill_forward(module.student, inputs, attention=False, hidden=True)
    expected = distill_losses(
        s_out, t_out, batch["attention_mask"], [0, 1], {"logits": 1.0, "attention": 0.5, "hidden": 1.0,
        "ground_truth": 0.0}, direction=("attention", "hidden"), projections=(s_qkv, t_qkv),
    )  # fmt: skip
    before = module.student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in outputs.items() if k != "loss"})

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, callbacks=[Record()],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    assert set(seen[0]) == {
        "train/logits_loss",
        "train/qkv_direction_loss",
        "train/hidden_direction_loss",
        "train/loss",
    }
    first = seen[0]
    total = (
        first["train/logits_loss"]
        + 0.5 * first["train/qkv_direction_loss"]
        + first["train/hidden_direction_loss"]
    )
    assert first["train/loss"] == pytest.approx(total, rel=1e-5)
    assert 0 < first["train/qkv_direction_loss"] < 2 * 3 * 2  # 2 layers x q, k, v, each in [0, 2]
    for name in ("logits", "qkv_direction", "hidden_direction"):
        assert first[f"train/{name}_loss"] == pytest.approx(expected[name].item(), rel=1e-5), name
    assert seen[1]["train/loss"] != pytest.approx(first["train/loss"], rel=1e-4)  # it trains
    assert module.student.bert.encoder.layer[0].attention.self.query.weight.ne(before).any()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_set_dropout_reaches_every_dropout_of_the_model(arch):
    """set_dropout(model, 0) in training mode gives exactly the eval-mode output (the attention
    probabilities' dropout included); at 0.5 every dropout is at 0.5 and the output is random."""
    from xtc_lightning.models import set_dropout

    model = tiny_classifier(arch, num_layers=2)
    ids = torch.randint(0, 20, (3, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, expected)  # dropout 0.1 is on
        count = set_dropout(model, 0.5)
        assert count == sum(isinstance(m, nn.Dropout) for m in model.modules()) > 2 * 2
        assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.5}
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        set_dropout(model, 0.0)
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("dropout", [0.0, None])
def test_quantize_stage_trains_the_student_at_the_recipes_dropout(dropout):
    """recipe.dropout=0 in a real Lightning fit: the first step's logged logits loss is exactly the
    loss of the student's eval-mode forward (no dropout anywhere); with null the student keeps its
    dropout 0.1 and the training loss differs. The teacher is untouched (it never drops out)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from xtc_lightning.distill import distill_forward, distill_losses

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 20, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    batch["labels"] = torch.randint(0, 3, (4,))
    module = distill_module(recipe(dropout=dropout))
    enable_attention_scores(module.teacher)
    enable_attention_scores(module.student)
    assert {m.p for m in module.teacher.modules() if isinstance(m, nn.Dropout)} == {0.1}
    module.on_train_batch_start(batch, 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        module.student.eval()
        s_out = distill_forward(module.student, inputs, attention=False, hidden=False)
        t_out = distill_forward(module.teacher, inputs, attention=False, hidden=False)
        module.student.train()
    weights = {"logits": 1.0, "attention": 0.0, "hidden": 0.0, "ground_truth": 0.0}
    expected = distill_losses(s_out, t_out, batch["attention_mask"], [0, 1], weights)["logits"].item()
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["train/logits_loss"]))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[Record()],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    if dropout == 0.0:
        assert seen[0] == pytest.approx(expected, rel=1e-6)
    else:
        assert seen[0] != pytest.approx(expected, rel=1e-3)


def test_training_follows_the_recipe_and_evaluation_sees_the_final_form():
    module = distill_module(recipe(progressive="ternary", progressive_epochs=1, attention_scale=0.5))
    assert module.weights["attention"] == 0.5 and module.weights["hidden"] == 1.0
    q = module.student.bert.encoder.layer[1].output.dense
    module.on_train_batch_start(None, 0)  # step 0 of 10 per epoch: ternary phase
    assert q.weight_spec == TERNARY
    module.on_validation_start()
    assert q.weight_spec == BINARY
    module.trainer.global_step = 10
    module.on_train_batch_start(None, 0)
    assert q.weight_spec == BINARY

    assert not q.scale_grad  # the default recipe: no gradient through the scales
    learned = distill_module(recipe(scale_gradient=True))
    layer = learned.student.bert.encoder.layer[0].attention.self.query
    learned.on_train_batch_start(None, 0)
    assert layer.scale_grad and learned.student.get_input_embeddings().scale_grad

    ramp = distill_module(recipe(progressive="ramp", progressive_epochs=1))
    emb = ramp.student.get_input_embeddings()
    ramp.on_train_batch_start(None, 0)
    assert emb.mix == pytest.approx(1 / 11)
    ramp.on_validation_start()
    assert emb.mix == 1.0


@pytest.mark.parametrize(
    "recipe_args",
    [
        ["recipe.progressive=ternary", "recipe.progressive_epochs=1", "recipe.latent_weight_decay=0"],
        ["recipe.teacher=fp32_student"],
    ],
    ids=["ternary_then_binary", "fp32_student_teacher"],
)
def test_pipeline_with_a_recipe_exports_a_binary_model(tmp_path, glue_dir, tiny_bert_dir, recipe_args):
    """A ternary phase then binary with no latent decay, or distilling from the fp32 student: the
    stage records its score right after quantization, and the export holds 1-bit weights whose
    packed score matches the run's."""
    from conftest import run_dirs, run_train

    args = [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "quant=binary",
        "data.max_train_examples=64", "data.max_length=64", "trainer.max_epochs=1", "quantize.max_epochs=2",
        "optim.lr=1e-3", *recipe_args, "export.other_dtype=float32", "export.hf=false",
    ]  # fmt: skip
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    import json

    results = json.loads((run / "results.json").read_text())
    quantize = results["stages"]["quantize"]
    start = json.loads((run / "quantize" / "start.json").read_text())
    assert quantize["score_at_start"] == start["score"] and 0 <= start["score"] <= 1
    assert quantize["bits"]["weights"] == 1
    assert results["export"]["dev"]["score"] == results["score"]  # fp32 rest: the same predictions


def test_bad_recipe_value_fails_before_any_work(tmp_path, glue_dir, tiny_bert_dir):
    from conftest import run_train

    proc = run_train(
        ["task=rte", f"model.name_or_path={tiny_bert_dir}", "recipe.progressive=ramp"], tmp_path, glue_dir
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: recipe.progressive_epochs=0.0 is not accepted with recipe.progressive=ramp: "
        "a number in (0, quantize.max_epochs=3)"
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))


def test_ternary_phase_leaves_mixed_precision_roles_alone():
    mixed = QuantConfig.from_dict(
        {
            "name": "m",
            "weight": {"method": "binary"},
            "activation": {"method": "symmetric", "bits": 8},
            "weight_by_target": {"query": {"method": "symmetric", "bits": 8}},
        }
    )
    module = distill_module(
        Recipe.from_dict({**XTC_RECIPE, "progressive": "ternary", "progressive_epochs": 1}, mixed, 3), mixed
    )
    attention = module.student.bert.encoder.layer[0].attention.self
    module.on_train_batch_start(None, 0)
    assert (
        attention.query.weight_spec == WeightSpec("symmetric", 8, "row")
        and attention.key.weight_spec == TERNARY
    )
    module.on_validation_start()
    assert (
        attention.query.weight_spec == WeightSpec("symmetric", 8, "row")
        and attention.key.weight_spec == BINARY
    )


@pytest.mark.parametrize(
    ("by_target", "message"),
    [
        ({"pooler": {"method": "ternary"}}, "quant.weight_by_target.pooler: not a quantized role of this config"),
        ({"query": {"method": "symmetric"}}, "quant.weight_by_target.query.bits is required for method symmetric"),
        ({"query": {"method": "binary", "bits": 2}}, "quant.weight_by_target.query.bits=2 does not fit method binary"),
        ({"query": {"method": "ternary", "groups": 0}}, "quant.weight_by_target.query.groups=0 is not accepted"),
    ],
)  # fmt: skip
def test_bad_mixed_precision_fails_in_one_line(by_target, message):
    with pytest.raises(UserError) as err:
        QuantConfig.from_dict({"weight": {"method": "binary"}, "weight_by_target": by_target})
    assert message in str(err.value)


def test_quantize_stage_has_its_own_warmup(tmp_path):
    """quantize.warmup_epochs reaches the quantize stage's scheduler only (DeepSpeed's 1-bit budget
    warms up 1 of 18 epochs); the other stages keep optim.warmup_epochs, so their caches stay valid."""
    from conftest import compose_job_config
    from xtc_lightning.config import run_config

    cfg, _ = compose_job_config(["optim.warmup_epochs=0.1", "quantize.warmup_epochs=1.0"], tmp_path / "run")
    config = run_config(cfg)
    assert config.stage_optim("quantize").as_dict() == {**config.optim.as_dict(), "warmup_epochs": 1.0}
    assert config.stage_optim("reduce") == config.optim
    assert config.optim.warmup_epochs == 0.1
    default, _ = compose_job_config(["optim.warmup_epochs=0.1"], tmp_path / "run")  # the YAML default
    assert run_config(default).stage_optim("quantize").warmup_epochs == 0.1


@pytest.mark.parametrize("quant", ["binary", "ternary"])
def test_mixed_precision_override_from_the_command_line(quant):
    """The README's override composes: the YAML default is null, which a command line may replace by
    a whole mapping (an empty mapping would be a closed struct that rejects the roles)."""
    from hydra import compose, initialize_config_dir

    from xtc_lightning.config import CONF_DIR

    override = (
        "quant.weight_by_target={query: {method: symmetric, bits: 8}, key: {method: symmetric, bits: 8}}"
    )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plain = compose("config", overrides=[f"quant={quant}"])
        mixed = compose("config", overrides=[f"quant={quant}", override])
    assert QuantConfig.from_dict(OmegaConf.to_container(plain.quant)).weight_by_target == ()
    q = QuantConfig.from_dict(OmegaConf.to_container(mixed.quant))
    assert q.weight_for("query").bits == 8 and q.weight_for("key").bits == 8
    assert q.weight_for("value") == q.weight


def test_binary_qk2_preset_keeps_query_and_key_ternary():
    """quant=binary_qk2: the W1A8 preset with ternary query and key, everything else as quant=binary."""
    from hydra import compose, initialize_config_dir

    from xtc_lightning.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        mixed = compose("config", overrides=["quant=binary_qk2"]).quant
        plain = compose("config", overrides=["quant=binary"]).quant
    q = QuantConfig.from_dict(OmegaConf.to_container(mixed))
    assert q.name == "w1a8_qk2"
    assert q.weight_for("query") == q.weight_for("key") == WeightSpec("ternary", 2, "row")
    for role in ("value", "attention_output", "intermediate", "output", "word_embeddings"):
        assert q.weight_for(role) == WeightSpec("binary", 1, "row")
    rest = {k: v for k, v in OmegaConf.to_container(mixed).items() if k not in ("name", "weight_by_target")}
    assert rest == {
        k: v for k, v in OmegaConf.to_container(plain).items() if k not in ("name", "weight_by_target")
    }


def test_fp32_student_teacher_is_the_student_before_quantization_layer_for_layer():
    """recipe.teacher=fp32_student: a frozen copy of the reduced student, matched layer for layer.
    Against it the unquantized student's attention and hidden losses are exactly 0 and the logits
    loss is its minimum (against the task's teacher they are not), so after binarization the losses
    measure only what quantization changed."""
    from xtc_lightning.distill import distill_forward, distill_losses, enable_attention_scores
    from xtc_lightning.stages import Models, quantize_teacher
    from xtc_lightning.student import build_student

    teacher = enable_attention_scores(tiny_classifier("bert", num_layers=4))
    models = Models(teacher=teacher, student=build_student(teacher, [1, 3]), layers=[1, 3])
    assert quantize_teacher(recipe(), models) == (teacher, [1, 3])
    own, own_layers = quantize_teacher(recipe(teacher="fp32_student"), models)
    assert own is not models.student and own_layers == [0, 1]

    inputs = {"input_ids": torch.tensor([[2, 7, 9, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    weights = {"logits": 1.0, "attention": 1.0, "hidden": 1.0, "ground_truth": 0.0}

    def losses(t, layers):
        with torch.no_grad():
            s_out, t_out = (distill_forward(m, inputs, True, True) for m in (models.student, t))
        return distill_losses(s_out, t_out, inputs["attention_mask"], layers, weights)

    same = losses(own, own_layers)
    assert same["attention"].item() == 0 and same["hidden"].item() == 0
    with torch.no_grad():  # soft cross-entropy against itself: the entropy of its own prediction
        p = own(**inputs).logits.softmax(-1)
    assert same["logits"].item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    assert losses(teacher, [1, 3])["hidden"].item() > 0
    apply_quantization(models.student, W1A8)
    assert not any(isinstance(m, QuantLinear) for m in own.modules())  # the copy stays fp32
    damage = losses(own, own_layers)
    assert damage["attention"].item() > 0 and damage["hidden"].item() > 0


def test_fast_latent_is_xtc_with_fast_latent_weights_and_no_dropout():
    """recipe=fast_latent (the default) is recipe=xtc plus two keys: a new key in xtc.yaml reaches
    both recipes, and the default differs from the paper's step 2 only in the latent weights' lr and
    the quantize stage's dropout."""
    from hydra import compose, initialize_config_dir

    from xtc_lightning.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = OmegaConf.to_container(compose("config").recipe)
        xtc = OmegaConf.to_container(compose("config", overrides=["recipe=xtc"]).recipe)
    assert default["name"] == "fast_latent" and xtc["name"] == "xtc"
    assert default["latent_lr"] == 2e-3 and xtc["latent_lr"] is None
    assert default["dropout"] == 0 and xtc["dropout"] is None
    own = ("name", "latent_lr", "dropout")
    assert {k: v for k, v in default.items() if k not in own} == {
        k: v for k, v in xtc.items() if k not in own
    }


def test_start_run_hands_a_ternary_run_over_to_a_binary_one(tmp_path, glue_dir, tiny_bert_dir):
    """recipe.start_run (multi-step distillation, fp32 -> ternary -> binary): a quantize stage that
    starts from a finished ternary run with the same quant config starts exactly where that run
    ended (its dev score right after loading is the ternary run's best score), and distilling a
    binary student from that run (recipe.teacher=start_run) ends in a 1-bit export: the README's
    two multi-step commands, at test size. Folders that cannot be a start are refused at startup,
    before any work."""
    import json

    from conftest import run_dirs, run_train

    base = [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "data.max_train_examples=64",
        "data.max_length=64", "trainer.max_epochs=1", "optim.lr=1e-3", "export.other_dtype=float32", "export.hf=false",
        f"paths.cache_dir={tmp_path / 'cache'}",  # one teacher and one reduced student for every run
    ]  # fmt: skip

    def train(name: str, *args: str) -> dict:
        proc = run_train([*base, *args], tmp_path / name, glue_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = run_dirs(tmp_path / name)
        return {**json.loads((run / "results.json").read_text()), "run_dir": run}

    ternary = train("ternary", "quant=ternary")
    start = ternary["run_dir"]
    again = train("again", "quant=ternary", f"recipe.start_run={start}", "recipe.teacher=start_run")
    assert again["stages"]["quantize"]["score_at_start"] == ternary["score"]

    binary = train("binary", "quant=binary", f"recipe.start_run={start}", "recipe.teacher=start_run")
    assert binary["stages"]["quantize"]["bits"]["weights"] == 1
    assert binary["export"]["dev"]["score"] == binary["score"]  # fp32 rest: the same predictions

    def refused(*args: str) -> str:
        proc = run_train([*base, *args], tmp_path / "refused", glue_dir)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert not (tmp_path / "refused" / "runs").exists() or not run_dirs(tmp_path / "refused")
        return proc.stderr.strip().splitlines()[-1]

    key = f"error: recipe.start_run={start} is not accepted"
    assert refused("task=mrpc", "quant=binary", f"recipe.start_run={start}") == (
        f"{key}: it is a run of task 'rte', not 'mrpc'"
    )
    assert refused("quant=binary", "student.num_layers=2", f"recipe.start_run={start}") == (
        f"{key}: its student keeps teacher layers [1], this run's keeps [0, 1]"
    )
    teacher_only = train("teacher_only", "stage=teacher")["run_dir"]
    assert refused("quant=binary", f"recipe.start_run={teacher_only}") == (
        f"error: recipe.start_run={teacher_only} is not accepted: its last stage is 'teacher'; a run "
        f"that ends with a quantize stage (and its quantize/weights.safetensors) is needed"
    )
    missing = tmp_path / "no_such_run"
    assert refused("quant=binary", f"recipe.start_run={missing}") == (
        f"error: recipe.start_run={missing} is not accepted: no such folder (a finished quantized run of this task)"
    )

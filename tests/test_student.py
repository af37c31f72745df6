"""Layer selection and layer-reduced students built from tiny random teachers."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import tiny_classifier
from xtc_lightning.errors import UserError
from xtc_lightning.models import encoder_layers
from xtc_lightning.student import (
    build_student,
    evenly_spaced_layers,
    layer_map,
    layers_from_config,
    select_layers,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "student"


# ----------------------------------------------------------------------------- select_layers


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (12, 6, [1, 3, 5, 7, 9, 11]),
        (6, 3, [1, 3, 5]),
        (12, 4, [2, 5, 8, 11]),
        (12, 3, [3, 7, 11]),
        (6, 4, [1, 2, 4, 5]),  # 1.5 -> 2 and 4.5 -> 5: round half up (banker's rounding gives [1,2,3,5])
        (12, 12, list(range(12))),
        (5, 1, [4]),
    ],
)
def test_select_layers_evenly(n, k, expected):
    assert select_layers(n, num_layers=k) == expected
    assert evenly_spaced_layers(n, k) == expected


def test_evenly_spaced_is_strictly_increasing_and_ends_at_last_layer():
    for n in range(1, 40):
        for k in range(1, n + 1):
            chosen = evenly_spaced_layers(n, k)
            assert len(chosen) == k and chosen[0] >= 0 and chosen[-1] == n - 1
            assert all(b > a for a, b in zip(chosen, chosen[1:], strict=False))


def test_select_layers_explicit_and_default():
    assert select_layers(12, layers=[2, 4, 6, 8, 10]) == [2, 4, 6, 8, 10]
    assert select_layers(12, layers=(0,)) == [0]
    assert select_layers(4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("n", "layers", "num_layers", "message"),
    [
        (12, [1, 3], 2, "not both"),
        (12, [-1, 3], None, "invalid index -1"),
        (12, [1, 12], None, "invalid index 12"),
        (6, [1, 3, 5, 7, 9, 11], None, "invalid index 7: expected integers from 0 to 5"),
        (12, [3, 3], None, "strictly increasing"),
        (12, [5, 1], None, "strictly increasing"),
        (12, [], None, "empty"),
        (2, [0, 1, 1], None, "teacher has only 2 layers"),
        (12, [1.0, 2], None, "invalid index 1.0"),
        (12, [True], None, "invalid index True"),
        (12, "1,3", None, "expected a list"),
        (12, None, 0, "num_layers=0 is invalid: expected an integer from 1 to 12"),
        (6, None, 7, "num_layers=7 is invalid"),
        (6, None, 2.0, "num_layers=2.0 is invalid"),
    ],
)
def test_select_layers_rejects_bad_input(n, layers, num_layers, message):
    with pytest.raises(UserError, match=message):
        select_layers(n, layers=layers, num_layers=num_layers)


@pytest.mark.parametrize(
    ("preset", "n", "expected"),
    [
        ("teacher", 6, [0, 1, 2, 3, 4, 5]),
        ("l6", 12, [1, 3, 5, 7, 9, 11]),
        ("l5", 12, [2, 4, 6, 8, 10]),
        ("l4", 12, [2, 5, 8, 11]),
        ("l3", 12, [3, 7, 11]),
        ("l3", 6, [1, 3, 5]),
    ],
)
def test_student_presets(preset, n, expected):
    cfg = OmegaConf.load(CONF / f"{preset}.yaml")
    assert cfg.name == preset
    assert layers_from_config(cfg, n) == expected


def test_student_config_errors_name_the_preset_and_keys():
    with pytest.raises(UserError, match=r"student 'l6': .*invalid index 7"):
        layers_from_config(OmegaConf.load(CONF / "l6.yaml"), 6)
    with pytest.raises(UserError, match=r"unknown keys \['num_layer'\]"):
        layers_from_config({"name": "x", "layers": None, "num_layers": None, "num_layer": 3}, 6)
    with pytest.raises(UserError, match=r"missing keys \['name'\]"):
        layers_from_config({"layers": None, "num_layers": 3}, 6)


def test_layer_map():
    m = layer_map([1, 3, 5])
    assert m.attention == [1, 3, 5]
    assert m.hidden == [0, 2, 4, 6]
    assert layer_map([2, 5, 8, 11]).hidden == [0, 3, 6, 9, 12]


# ----------------------------------------------------------------------------- build_student


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_build_student_copies_every_tensor_by_name(arch):
    teacher = tiny_classifier(arch, num_layers=5)
    layers = [0, 2, 4]
    student = build_student(teacher, layers)

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 5  # the teacher's config is untouched
    if arch == "distilbert":
        assert student.config.n_layers == 3
    stack, student_layers = encoder_layers(student)
    assert len(student_layers) == 3

    teacher_tensors = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
    student_tensors = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    # Exactly the teacher tensors outside the dropped layers 1 and 3, renumbered.
    expected_names = {
        name.replace(f"{stack}.2.", f"{stack}.1.").replace(f"{stack}.4.", f"{stack}.2.")
        for name in teacher_tensors
        if not name.startswith((f"{stack}.1.", f"{stack}.3."))
    }
    assert set(student_tensors) == expected_names
    for name, tensor in student_tensors.items():
        src = name
        for i, t in enumerate(layers):
            if name.startswith(f"{stack}.{i}."):
                src = f"{stack}.{t}." + name[len(f"{stack}.{i}.") :]
        assert torch.equal(tensor, teacher_tensors[src]), name
        assert tensor.data_ptr() != teacher_tensors[src].data_ptr(), f"{name} shares storage with the teacher"
    # Spot check one layer weight with an explicit name.
    if arch == "bert":
        assert torch.equal(
            student.bert.encoder.layer[1].attention.self.query.weight,
            teacher.bert.encoder.layer[2].attention.self.query.weight,
        )
        assert torch.equal(student.classifier.weight, teacher.classifier.weight)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_full_student_reproduces_the_teacher(arch):
    teacher = tiny_classifier(arch)
    student = build_student(teacher, [0, 1, 2, 3])
    ids = torch.randint(3, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert not student.training
    assert torch.equal(
        student(input_ids=ids, attention_mask=mask).logits, teacher(input_ids=ids, attention_mask=mask).logits
    )


def test_student_layer_i_computes_teacher_layer_layers_i():
    teacher = tiny_classifier("bert", num_layers=4)
    student = build_student(teacher, [1, 3])
    ids = torch.randint(3, 40, (2, 7))
    t_out = teacher(input_ids=ids, output_hidden_states=True)
    s_out = student(input_ids=ids, output_hidden_states=True)
    assert torch.equal(s_out.hidden_states[0], t_out.hidden_states[0])  # same embeddings
    by_hand = teacher.bert.encoder.layer[1](t_out.hidden_states[0])
    assert torch.equal(s_out.hidden_states[1], by_hand)
    assert not torch.allclose(s_out.hidden_states[1], t_out.hidden_states[2])
    assert torch.equal(student.bert.encoder.layer[1](by_hand), s_out.hidden_states[2])


def test_buffers_are_copied_and_student_is_trainable():
    teacher = tiny_classifier("bert")
    teacher.bert.embeddings.token_type_ids.fill_(1)  # a non-default buffer value
    teacher.requires_grad_(False)
    teacher.train()
    student = build_student(teacher, [3])
    assert torch.equal(
        student.bert.embeddings.token_type_ids, torch.ones_like(student.bert.embeddings.token_type_ids)
    )
    assert all(p.requires_grad for p in student.parameters())
    assert student.training


def test_student_keeps_dtype_and_attention_implementation():
    teacher = tiny_classifier("bert", attn="eager").to(torch.bfloat16)
    student = build_student(teacher, [0, 2])
    assert student.config._attn_implementation == "eager"
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.bert.embeddings.position_ids.dtype == torch.long

    sdpa_teacher = tiny_classifier("distilbert", attn="sdpa")
    assert build_student(sdpa_teacher, [1]).config._attn_implementation == "sdpa"


def test_build_student_fails_loudly_on_structure_mismatch():
    teacher = tiny_classifier("bert")
    teacher.extra = nn.Linear(2, 2)  # a teacher tensor the student class does not have
    with pytest.raises(UserError, match=r"teacher tensors not copied into the student: \['extra.weight'"):
        build_student(teacher, [0, 1])

    teacher = tiny_classifier("bert")
    teacher.classifier = nn.Linear(16, 5)  # config still says 3 labels
    with pytest.raises(
        UserError,
        match=r"student tensor 'classifier.weight' \(3, 16\).*teacher 'classifier.weight' \(5, 16\)",
    ):
        build_student(teacher, [0, 1])


def test_build_student_rejects_bad_layers():
    teacher = tiny_classifier("distilbert")
    with pytest.raises(UserError, match="invalid index 4"):
        build_student(teacher, [1, 4])
    with pytest.raises(UserError, match="strictly increasing"):
        build_student(teacher, [2, 1])

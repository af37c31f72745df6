"""Layer reduction: a shallower student made of copies of chosen teacher layers.

XTC's first step: keep the teacher's width, keep a subset of its encoder layers
(e.g. layers 1,3,5,7,9,11 of a 12-layer BERT), and copy everything else
(embeddings, pooler, classifier) unchanged. The student is then trained by
knowledge distillation (``distill.py``) against the teacher.

Layer indices are 0-based teacher layer numbers. ``layers[i]`` is the teacher
layer that student layer ``i`` is copied from and distilled against.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from xtc_lightning.errors import UserError, check_exact_keys
from xtc_lightning.models import encoder_layers, num_layers_of

STUDENT_KEYS = ("name", "layers", "num_layers")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``k`` teacher layers spread evenly, always ending with the last one.

    Rule: layer ``i`` (0-based, ``i < k``) is ``round((i+1)*n/k) - 1`` with ``round``
    meaning round-half-up, computed exactly in integers as
    ``(2*(i+1)*n + k) // (2*k) - 1``. For n=12: k=6 -> [1,3,5,7,9,11],
    k=4 -> [2,5,8,11], k=3 -> [3,7,11]; for n=6, k=3 -> [1,3,5].
    The result is strictly increasing whenever ``1 <= k <= n``.
    """
    n, k = num_teacher_layers, num_layers
    return [(2 * (i + 1) * n + k) // (2 * k) - 1 for i in range(k)]


def select_layers(
    num_teacher_layers: int, layers: Sequence[int] | None = None, num_layers: int | None = None
) -> list[int]:
    """The teacher layers the student keeps, validated.

    ``layers`` (explicit 0-based, strictly increasing) or ``num_layers`` (``k`` evenly
    spaced, see :func:`evenly_spaced_layers`) -- not both; neither keeps every layer.
    Bad values raise a one-line ``UserError`` naming the value and what is accepted.
    """
    n = num_teacher_layers
    if not _is_int(n) or n < 1:
        raise UserError(f"the teacher must have at least one encoder layer, got {n!r}")
    if layers is not None and num_layers is not None:
        raise UserError(
            f"student: give either layers ({list(layers)}) or num_layers ({num_layers}), not both"
        )
    if num_layers is not None:
        if not _is_int(num_layers) or not 1 <= num_layers <= n:
            raise UserError(
                f"student num_layers={num_layers!r} is invalid: expected an integer from 1 to {n} "
                f"(the teacher has {n} layers)"
            )
        return evenly_spaced_layers(n, num_layers)
    if layers is None:
        return list(range(n))
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise UserError(
            f"student layers={layers!r} is invalid: expected a list of 0-based teacher layer indices"
        )
    chosen = list(layers)
    if not chosen:
        raise UserError(
            f"student layers=[] is empty: give at least one teacher layer index from 0 to {n - 1}"
        )
    if len(chosen) > n:
        raise UserError(
            f"student layers={chosen} has {len(chosen)} entries but the teacher has only {n} layers"
        )
    bad = [x for x in chosen if not _is_int(x) or not 0 <= x < n]
    if bad:
        raise UserError(
            f"student layers={chosen} has invalid index {bad[0]!r}: expected integers from 0 to {n - 1} "
            f"(the teacher has {n} layers; use num_layers=k to pick k evenly)"
        )
    if any(b <= a for a, b in zip(chosen, chosen[1:], strict=False)):
        raise UserError(
            f"student layers={chosen} must be strictly increasing (teacher order, no duplicates), "
            f"e.g. {sorted(set(chosen))}"
        )
    return chosen


def layers_from_config(student_cfg: Mapping, num_teacher_layers: int) -> list[int]:
    """Validate a ``cfg.student`` group (keys ``name``, ``layers``, ``num_layers``) and select the layers."""
    if not isinstance(student_cfg, Mapping):
        raise UserError(
            f"student config must be a mapping with keys {list(STUDENT_KEYS)}, got {student_cfg!r}"
        )
    check_exact_keys(student_cfg, STUDENT_KEYS, "student config")
    name = student_cfg["name"]
    try:
        return select_layers(num_teacher_layers, student_cfg["layers"], student_cfg["num_layers"])
    except UserError as e:
        raise UserError(f"student '{name}': {e}") from None


class LayerMap(NamedTuple):
    """Which teacher output each student output is distilled against.

    ``attention[i]``: teacher layer index for student layer ``i`` (= ``layers[i]``).
    ``hidden[j]``: index into the teacher's ``hidden_states`` for the student's
    ``hidden_states[j]``; index 0 is the embedding output (student 0 <-> teacher 0)
    and student ``i+1`` (output of layer ``i``) <-> teacher ``layers[i]+1``.
    """

    attention: list[int]
    hidden: list[int]


def layer_map(layers: Sequence[int]) -> LayerMap:
    """The teacher->student correspondence for attention scores and hidden states."""
    layers = [int(x) for x in layers]
    return LayerMap(attention=layers, hidden=[0] + [x + 1 for x in layers])


def _teacher_name(student_name: str, stack: str, layers: Sequence[int]) -> str:
    """``<stack>.<i>.rest`` -> ``<stack>.<layers[i]>.rest``; names outside the stack are unchanged."""
    prefix = stack + "."
    if not student_name.startswith(prefix):
        return student_name
    index, _, rest = student_name[len(prefix) :].partition(".")
    return f"{prefix}{layers[int(index)]}.{rest}"


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not) by qualified name."""
    tensors = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        if name in tensors:
            raise UserError(f"{type(model).__name__} has a parameter and a buffer both named '{name}'")
        tensors[name] = buf
    return tensors


def build_student(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A new model of the teacher's class with ``len(layers)`` encoder layers copied from the teacher.

    Student layer ``i`` is a copy of teacher layer ``layers[i]``; every other tensor
    (embeddings, pooler, classifier, buffers) is copied under the same name. The copy
    is by name and shape: any student tensor without a teacher counterpart, any shape
    or dtype mismatch, or any teacher tensor outside the dropped layers left unused
    raises ``UserError``. The student has the teacher's config (deep copy, only the
    layer count changed), attention implementation, dtype, device and train/eval mode;
    all its parameters are trainable even if the teacher is frozen.
    """
    n = num_layers_of(teacher.config)
    layers = select_layers(n, layers=list(layers))
    stack, _ = encoder_layers(teacher)

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # DistilBERT maps this to n_layers via attribute_map
    if num_layers_of(config) != len(layers):
        raise UserError(f"cannot set the layer count of a '{config.model_type}' config to {len(layers)}")
    student = type(teacher)(config)
    attn = teacher.config._attn_implementation
    if student.config._attn_implementation != attn:
        student.set_attn_implementation(attn)
    student.to(device=next(teacher.parameters()).device, dtype=next(teacher.parameters()).dtype)

    student_stack, _ = encoder_layers(student)
    if student_stack != stack:
        raise UserError(f"student layer stack '{student_stack}' does not match the teacher's '{stack}'")

    source = _named_tensors(teacher)
    target = _named_tensors(student)
    used: set[str] = set()
    with torch.no_grad():
        for name, dst in target.items():
            src_name = _teacher_name(name, stack, layers)
            src = source.get(src_name)
            if src is None:
                raise UserError(f"student tensor '{name}' has no teacher tensor '{src_name}' to copy from")
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise UserError(
                    f"student tensor '{name}' {tuple(dst.shape)} {dst.dtype} does not match teacher "
                    f"'{src_name}' {tuple(src.shape)} {src.dtype}"
                )
            dst.copy_(src)
            used.add(src_name)

    kept = {f"{stack}.{x}." for x in layers}
    dropped = {f"{stack}.{x}." for x in range(n)} - kept
    unused = [name for name in source if name not in used and not name.startswith(tuple(dropped))]
    if unused:
        raise UserError(
            f"teacher tensors not copied into the student: {unused[:5]}{' ...' if len(unused) > 5 else ''}"
        )
    student.train(teacher.training)
    return student

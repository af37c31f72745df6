"""Knowledge-distillation losses (XTC / TinyBERT style) and their schedule.

Losses, all pure functions of tensors:

* ``logits``: soft cross-entropy ``-sum_c softmax(t/T)_c * log_softmax(s/T)_c``, averaged over
  examples, **without** the Hinton ``T**2`` factor (TinyBERT and XTC use plain soft CE with
  T=1, where the factor is 1 anyway; scale the weight instead if you change T). Note the
  reference code takes ``.mean()`` over examples *and* classes, i.e. it is ours divided by the
  number of classes. Regression tasks (STS-B, one output): MSE between the logits, T unused.
* ``attention``: MSE between attention **scores before softmax** (``q.k^T * scaling``, without
  the additive padding mask), over pairs where both the query and the key are real tokens;
  summed over the distilled layers, each layer normalised by its number of real elements.
* ``hidden``: MSE between hidden states (embedding output included) over real tokens only,
  summed over layers, each normalised by ``real tokens * hidden size``.
* ``ground_truth``: CE (or MSE for regression) against labels, on labelled examples only
  (label ``-100`` / ``NaN`` marks an unlabelled, e.g. augmented, example).

Direction matching (BiBERT, Qin et al. 2022; ``recipe.direction_matching`` in the quantize
stage) replaces the attention loss, or the attention and hidden losses, under their weights,
with scale-free ones:

* ``qkv_direction``: for each distilled layer and each of the query, key and value projections
  ``x`` (per head), the similarity matrix ``x.x^T / sqrt(d_head)`` of shape ``(batch, heads, seq,
  seq)``; the loss is ``|| S/||S|| - T/||T|| ||`` (Frobenius norms over the whole batch's tensor,
  padded pairs zeroed), summed over the three projections and the layers. A 1-bit student's
  projections can point where the teacher's do at any scale; the MSE of attention scores also
  pays for the scale, and dominates its gradient.
* ``hidden_direction``: the same normalised distance between hidden states (real tokens),
  summed over layers (embedding output included).

BiBERT's reference takes these norms over padded positions too; here they are masked out.

Summing over layers follows TinyBERT and the XTC reference; masking and the normalisation by
real elements fix the reference, whose MSE also ran over padded positions and the mask itself.

Attention scores: transformers returns post-softmax probabilities for ``output_attentions``.
Importing this module registers an attention implementation ``"xtc_scores"`` that computes
exactly what ``"eager"`` computes but returns the raw scaled scores as the attention weights;
:func:`enable_attention_scores` switches a model to it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from xtc_lightning.errors import UserError, check_exact_keys
from xtc_lightning.student import layer_map

SCORES_IMPLEMENTATION = "xtc_scores"
LOSS_NAMES = ("logits", "attention", "hidden", "ground_truth")
KD_LOSSES = ("logits", "attention", "hidden")  # the ones that need a teacher
DISTILL_KEYS = ("name", "temperature", "weights", "intermediate_fraction")
# The weight each direction-matching loss is counted under (see the module docstring).
DIRECTION_LOSSES = {"qkv_direction": "attention", "hidden_direction": "hidden"}
# Query, key and value projections of a self-attention module: BERT / RoBERTa, DistilBERT.
PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


# --------------------------------------------------------------------------- attention scores


def scores_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention that returns the pre-softmax scores ``q.k^T * scaling`` (no mask) as weights.

    The attention output is computed exactly as transformers' ``eager_attention_forward`` for
    BERT-style encoders (additive float mask, softmax, dropout on probabilities).
    """
    if key.shape[1] != query.shape[1]:
        raise NotImplementedError(
            f"{SCORES_IMPLEMENTATION} attention supports equal query/key head counts only "
            f"(got {query.shape[1]} query and {key.shape[1]} key heads)"
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = scores if attention_mask is None else scores + attention_mask
    weights = F.softmax(weights, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, scores


def _register_scores_implementation() -> None:
    # Both registries are needed: without a mask function, transformers builds no padding mask at all.
    AttentionInterface.register(SCORES_IMPLEMENTATION, scores_attention_forward)
    AttentionMaskInterface.register(SCORES_IMPLEMENTATION, eager_mask)


_register_scores_implementation()


def enable_attention_scores(model: nn.Module) -> nn.Module:
    """Switch an HF model to the ``"xtc_scores"`` attention (idempotent); returns the model.

    Afterwards ``model(..., output_attentions=True).attentions`` holds one
    ``(batch, heads, query, key)`` tensor of pre-softmax scores per layer; logits and hidden
    states are identical to ``attn_implementation="eager"``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UserError(f"{type(model).__name__} is not a transformers model: cannot return attention scores")
    if config._attn_implementation == SCORES_IMPLEMENTATION:
        return model
    if not model._can_set_attn_implementation():
        raise UserError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            f"so attention scores cannot be distilled: set distill.weights.attention=0"
        )
    model.set_attn_implementation(SCORES_IMPLEMENTATION)
    if config._attn_implementation != SCORES_IMPLEMENTATION:
        raise UserError(f"could not switch {type(model).__name__} to {SCORES_IMPLEMENTATION} attention")
    return model


def scores_enabled(model: nn.Module) -> bool:
    """Whether ``output_attentions=True`` returns pre-softmax scores for this model."""
    return getattr(model.config, "_attn_implementation", None) == SCORES_IMPLEMENTATION


def distill_forward(model: nn.Module, inputs: Mapping[str, Tensor], attention: bool, hidden: bool):
    """Call an HF model asking only for the outputs the active losses need.

    ``inputs``: model inputs (``input_ids``, ``attention_mask``, ...; no ``labels``).
    ``attention=True`` requires :func:`enable_attention_scores` on the model first.
    """
    if attention and not scores_enabled(model):
        raise RuntimeError(
            f"{type(model).__name__} returns attention probabilities, not scores: "
            f"call enable_attention_scores(model) first"
        )
    return model(**inputs, output_attentions=attention, output_hidden_states=hidden)


def _projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """The (query, key, value) projections of each self-attention layer of ``model``, in order."""
    found = []
    for module in model.modules():
        for names in PROJECTIONS:
            if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                found.append(tuple(getattr(module, n) for n in names))
                break
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not found or len(found) != layers:
        raise UserError(
            f"{type(model).__name__}: found {len(found)} self-attention layers with query, key and value "
            f"projections for {layers} layers: direction matching cannot distil it "
            f"(set recipe.direction_matching=none)"
        )
    return found


@contextmanager
def record_projections(model: nn.Module, enabled: bool = True) -> Iterator[list[tuple] | None]:
    """Within the block, record the query, key and value projections of each layer of ``model``.

    Yields a list that the model's next forward fills with one ``(q, k, v)`` per layer, each
    ``(batch, heads, seq, d_head)`` as the attention receives it (the projection's output; the
    gradient flows through it). Yields ``None`` and records nothing if not ``enabled``.
    """
    if not enabled:
        yield None
        return
    heads = model.config.num_attention_heads
    layers = _projections(model)
    recorded: list[list] = [[None] * 3 for _ in layers]

    def keep(i: int, j: int):
        def hook(_module, _inputs, output: Tensor) -> None:
            b, n, width = output.shape
            recorded[i][j] = output.view(b, n, heads, width // heads).transpose(1, 2)

        return hook

    handles = [
        projection.register_forward_hook(keep(i, j))
        for i, projections in enumerate(layers)
        for j, projection in enumerate(projections)
    ]
    out: list[tuple] = []
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()
    if any(x is None for layer in recorded for x in layer):
        raise RuntimeError("record_projections: the block ran no forward of every layer's projections")
    out.extend(tuple(layer) for layer in recorded)


# --------------------------------------------------------------------------- losses


def logits_loss(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, regression: bool = False
) -> Tensor:
    """Soft cross-entropy with temperature (no ``T**2``), or MSE for regression; mean over examples."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} vs teacher logits {tuple(teacher.shape)}")
    if regression:
        return F.mse_loss(student.float(), teacher.float())
    teacher_prob = F.softmax(teacher.float() / temperature, dim=-1)
    student_logprob = F.log_softmax(student.float() / temperature, dim=-1)
    return -(teacher_prob * student_logprob).sum(-1).mean()


def _check_pairs(kind: str, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"{kind} loss needs matched, non-empty layer lists ({len(student)} vs {len(teacher)})"
        )
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            if kind == "hidden" and s.shape[:-1] == t.shape[:-1]:
                raise UserError(
                    f"student hidden size {s.shape[-1]} differs from the teacher's {t.shape[-1]}: "
                    f"layer reduction keeps the teacher's width"
                )
            raise ValueError(f"{kind} loss: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")


def _real_pairs(attention_mask: Tensor) -> Tensor:
    """``(batch, 1, seq, seq)``: whether both the query and the key of a pair are real tokens."""
    real = attention_mask.bool()
    return (real[:, :, None] & real[:, None, :])[:, None]


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
    """MSE of pre-softmax attention scores over real (query, key) pairs, summed over layers.

    ``student[l]``, ``teacher[l]``: ``(batch, heads, seq, seq)`` for matched layers.
    ``attention_mask``: ``(batch, seq)``, nonzero for real tokens. Each layer's squared error is
    divided by ``heads * sum_b len_b**2``; padded positions never contribute (not even NaN/inf).
    """
    _check_pairs("attention", student, teacher)
    pairs = _real_pairs(attention_mask)
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        count = pairs.sum().clamp_min(1) * s.shape[1]
        diff = torch.where(pairs, s.float() - t.float(), 0.0)
        total = total + diff.pow(2).sum() / count
    return total


def hidden_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
    """MSE of hidden states over real tokens, summed over layers.

    ``student[l]``, ``teacher[l]``: ``(batch, seq, hidden)`` for matched positions (index 0 is the
    embedding output). Each layer's squared error is divided by ``real tokens * hidden``.
    """
    _check_pairs("hidden", student, teacher)
    real = attention_mask.bool()[:, :, None]  # (batch, seq, 1)
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        count = real.sum().clamp_min(1) * s.shape[-1]
        diff = torch.where(real, s.float() - t.float(), 0.0)
        total = total + diff.pow(2).sum() / count
    return total


def _direction(student: Tensor, teacher: Tensor, keep: Tensor) -> Tensor:
    """``|| s/||s|| - t/||t|| ||`` over the entries where ``keep`` (broadcast) holds."""
    s = torch.where(keep, student.float(), 0.0)
    t = torch.where(keep, teacher.float(), 0.0)
    return (s / s.norm().clamp_min(1e-12) - t / t.norm().clamp_min(1e-12)).norm()


def similarity(x: Tensor) -> Tensor:
    """``x.x^T / sqrt(d)`` over the last two dimensions: ``(..., seq, d) -> (..., seq, seq)``."""
    return torch.matmul(x, x.transpose(-1, -2)) * x.shape[-1] ** -0.5


def qkv_direction_loss(
    student: Sequence[tuple[Tensor, Tensor, Tensor]],
    teacher: Sequence[tuple[Tensor, Tensor, Tensor]],
    attention_mask: Tensor,
) -> Tensor:
    """BiBERT's direction matching of the query, key and value similarity matrices.

    ``student[l]``, ``teacher[l]``: ``(q, k, v)``, each ``(batch, heads, seq, d_head)``, for
    matched layers. For each layer and projection: the normalised distance (see ``_direction``)
    between the ``similarity`` matrices over real (query, key) pairs; summed.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"qkv_direction loss needs matched, non-empty layer lists ({len(student)} vs {len(teacher)})"
        )
    pairs = _real_pairs(attention_mask)
    total = 0.0
    for s_layer, t_layer in zip(student, teacher, strict=True):
        for s, t in zip(s_layer, t_layer, strict=True):
            if s.shape[:-1] != t.shape[:-1]:
                raise ValueError(f"qkv_direction loss: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
            total = total + _direction(similarity(s.float()), similarity(t.float()), pairs)
    return total


def hidden_direction_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor
) -> Tensor:
    """The normalised distance (see ``_direction``) between hidden states over real tokens, summed
    over layers (BiBERT's intermediate loss)."""
    _check_pairs("hidden", student, teacher)
    real = attention_mask.bool()[:, :, None]
    return sum(_direction(s, t, real) for s, t in zip(student, teacher, strict=True))


def ground_truth_loss(logits: Tensor, labels: Tensor, regression: bool = False) -> Tensor:
    """CE (classification, label ``-100`` = unlabelled) or MSE (regression, ``NaN`` = unlabelled).

    Averaged over labelled examples; a batch without any label gives 0 (still in the graph).
    """
    if regression:
        pred = logits.float().reshape(-1) if logits.shape[-1:] == (1,) else logits.float()
        labels = labels.float().reshape(pred.shape)
        keep = ~torch.isnan(labels)
        if not keep.any():
            return logits.sum() * 0.0
        return F.mse_loss(pred[keep], labels[keep])
    labels = labels.long().reshape(-1)
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def distill_losses(
    student_out,
    teacher_out,
    attention_mask: Tensor,
    layers: Sequence[int],
    weights: Mapping[str, float],
    temperature: float = 1.0,
    regression: bool = False,
    labels: Tensor | None = None,
    direction: Collection[str] = (),
    projections: tuple[Sequence[tuple], Sequence[tuple]] | None = None,
) -> dict[str, Tensor]:
    """All active losses, each returned separately, plus ``total`` (the weighted sum).

    ``student_out`` / ``teacher_out``: HF outputs (``.logits``, ``.attentions``,
    ``.hidden_states``; ``teacher_out`` may be ``None`` when only ``ground_truth`` is weighted).
    ``layers[i]``: teacher layer of student layer ``i`` (see ``student.layer_map``).
    ``weights``: ``{logits, attention, hidden, ground_truth}``; a zero weight skips that loss, and
    only computed losses appear in the result.
    ``direction``: of ``attention`` and ``hidden``, the losses computed in their direction-matching
    form, ``qkv_direction`` and ``hidden_direction``, under the same weights; ``qkv_direction``
    needs ``projections`` = (student's, teacher's) per layer, as :func:`record_projections` gives
    them (every layer of each model).
    """
    _check_weights(weights, "weights")
    if not set(direction) <= set(DIRECTION_LOSSES.values()):
        raise ValueError(f"direction={sorted(direction)}: only attention and hidden have a direction form")
    if teacher_out is None and any(weights[k] > 0 for k in KD_LOSSES):
        raise ValueError("teacher outputs are needed when a logits/attention/hidden weight is > 0")
    lmap = layer_map(layers)
    losses: dict[str, Tensor] = {}
    if weights["logits"] > 0:
        losses["logits"] = logits_loss(student_out.logits, teacher_out.logits, temperature, regression)
    if weights["attention"] > 0 and "attention" in direction:
        if projections is None:
            raise ValueError("direction matching with an attention weight > 0 needs the projections")
        student_qkv, teacher_qkv = projections
        if len(student_qkv) != len(lmap.attention):
            raise ValueError(f"{len(student_qkv)} student projections for {len(lmap.attention)} layers")
        matched = [teacher_qkv[i] for i in lmap.attention]
        losses["qkv_direction"] = qkv_direction_loss(student_qkv, matched, attention_mask)
    elif weights["attention"] > 0:
        s_att, t_att = _outputs(student_out, teacher_out, "attentions", lmap.attention)
        losses["attention"] = attention_loss(s_att, t_att, attention_mask)
    if weights["hidden"] > 0:
        s_hid, t_hid = _outputs(student_out, teacher_out, "hidden_states", lmap.hidden)
        if "hidden" in direction:
            losses["hidden_direction"] = hidden_direction_loss(s_hid, t_hid, attention_mask)
        else:
            losses["hidden"] = hidden_loss(s_hid, t_hid, attention_mask)
    if weights["ground_truth"] > 0:
        if labels is None:
            raise ValueError("the ground_truth loss has weight > 0 but no labels were given")
        losses["ground_truth"] = ground_truth_loss(student_out.logits, labels, regression)
    if not losses:
        raise ValueError("all loss weights are 0: nothing to compute")
    losses["total"] = sum(weights[DIRECTION_LOSSES.get(k, k)] * v for k, v in losses.items())
    return losses


def _outputs(student_out, teacher_out, field: str, teacher_index: list[int]):
    """Student outputs and the matching teacher outputs (``teacher_index[j]`` for student ``j``)."""
    flag = "output_attentions" if field == "attentions" else "output_hidden_states"
    s, t = getattr(student_out, field, None), getattr(teacher_out, field, None)
    if s is None or t is None:
        who = "student" if s is None else "teacher"
        raise ValueError(f"{field} missing from the {who} outputs: call the model with {flag}=True")
    if len(s) != len(teacher_index):
        raise ValueError(f"student returned {len(s)} {field} but the layer map expects {len(teacher_index)}")
    if max(teacher_index) >= len(t):
        raise ValueError(f"teacher has {len(t)} {field}, the layer map needs index {max(teacher_index)}")
    return list(s), [t[i] for i in teacher_index]


# --------------------------------------------------------------------------- schedule / config


def _check_weights(weights: Mapping, where: str) -> dict[str, float]:
    if not isinstance(weights, Mapping) or set(weights) != set(LOSS_NAMES):
        keys = sorted(weights) if isinstance(weights, Mapping) else weights
        raise UserError(f"distill {where} must have exactly the keys {list(LOSS_NAMES)}, got {keys}")
    out = {}
    for k in LOSS_NAMES:
        v = weights[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise UserError(f"distill {where}.{k}={v!r} is invalid: expected a finite number >= 0")
        out[k] = float(v)
    return out


@dataclass(frozen=True)
class DistillConfig:
    """``distill``: the losses' weights, temperature and schedule; built and checked once, at startup.

    ``name`` (str), ``temperature`` (> 0), ``weights`` ({logits, attention, hidden, ground_truth},
    each >= 0, not all 0), ``intermediate_fraction`` (in [0, 1): the first
    ``intermediate_epochs(fraction, max_epochs)`` epochs (``fraction * max_epochs`` rounded half
    up) use only the attention+hidden losses, the rest only logits+ground_truth; 0 = one stage,
    all losses together). Values are kept as given (an ``int`` weight stays an ``int``): the cache
    key of the reduced student hashes ``as_dict()``. ``weights`` is not to be changed.
    """

    name: str
    temperature: float
    weights: Mapping[str, float]
    intermediate_fraction: float

    @classmethod
    def from_dict(cls, d: Mapping) -> DistillConfig:
        """The ``distill`` group checked: the first bad value raises one ``UserError`` line."""
        if not isinstance(d, Mapping):
            raise UserError(f"distill config must be a mapping with keys {list(DISTILL_KEYS)}, got {d!r}")
        check_exact_keys(d, DISTILL_KEYS, "distill config")
        name = d["name"]
        if not isinstance(name, str) or not name:
            raise UserError(f"distill.name={name!r} is invalid: expected a non-empty string")
        t = d["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise UserError(f"distill '{name}': temperature={t!r} is invalid: expected a number > 0")
        weights = _check_weights(d["weights"], f"'{name}' weights")
        if not any(weights.values()):
            raise UserError(f"distill '{name}': all loss weights are 0, nothing would be trained")
        frac = d["intermediate_fraction"]
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
            raise UserError(
                f"distill '{name}': intermediate_fraction={frac!r} is invalid: expected a number in [0, 1)"
            )
        if frac > 0:
            stage1 = weights["attention"] + weights["hidden"]
            stage2 = weights["logits"] + weights["ground_truth"]
            if stage1 == 0 or stage2 == 0:
                raise UserError(
                    f"distill '{name}': two-stage (intermediate_fraction={frac}) needs a weight > 0 in both "
                    f"stages: attention/hidden first, then logits/ground_truth"
                )
        return cls(name, t, {k: d["weights"][k] for k in LOSS_NAMES}, frac)

    def as_dict(self) -> dict:
        """The group as given: the reduced student's cache key and the checkpoints' hyperparameters."""
        return {
            "name": self.name,
            "temperature": self.temperature,
            "weights": dict(self.weights),
            "intermediate_fraction": self.intermediate_fraction,
        }


def intermediate_epochs(fraction: float, max_epochs: int) -> int:
    """Number of leading epochs of the intermediate stage: ``round_half_up(fraction * max_epochs)``."""
    return math.floor(fraction * max_epochs + 0.5)


def two_stage_split(distill: DistillConfig, max_epochs: int | None, budget: str = "max_epochs") -> int:
    """The intermediate epochs of a two-stage run of ``max_epochs`` epochs (named ``budget`` in the
    error: the stage's key). Raises ``UserError`` unless both stages get at least one epoch; the
    config check calls it for every distilling stage before any work, ``loss_weights_at`` again."""
    frac = distill.intermediate_fraction
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise UserError(
            f"distill '{distill.name}': two-stage distillation needs {budget} >= 2, got {max_epochs!r}"
        )
    n = intermediate_epochs(frac, max_epochs)
    if not 0 < n < max_epochs:
        raise UserError(
            f"distill '{distill.name}': intermediate_fraction={frac} of {budget}={max_epochs} "
            f"gives {n} intermediate epoch(s); both stages need at least one epoch"
        )
    return n


def loss_weights_at(distill: DistillConfig, epoch: int, max_epochs: int | None) -> dict[str, float]:
    """Loss weights for ``epoch`` (0-based) of a run of ``max_epochs`` epochs.

    One stage (``intermediate_fraction == 0``): the configured weights throughout (``epoch`` and
    ``max_epochs`` unused, so step-bounded runs with ``max_epochs=-1`` work). Two stages: epochs
    ``< intermediate_epochs(fraction, max_epochs)`` keep only attention+hidden, later epochs only
    logits+ground_truth. Raises ``UserError`` if a stage would get no epoch.
    """
    weights = {k: float(v) for k, v in distill.weights.items()}
    if distill.intermediate_fraction == 0:
        return weights
    n = two_stage_split(distill, max_epochs)
    if not 0 <= epoch < max_epochs:
        raise ValueError(f"epoch {epoch} outside [0, {max_epochs})")
    off = ("logits", "ground_truth") if epoch < n else ("attention", "hidden")
    return {k: 0.0 if k in off else v for k, v in weights.items()}


def teacher_needed(weights: Mapping[str, float]) -> bool:
    """Whether any loss with these weights needs the teacher's outputs."""
    return any(weights[k] > 0 for k in KD_LOSSES)

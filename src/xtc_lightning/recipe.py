"""How the quantize stage trains a 1/2-bit student (``cfg.recipe``): validated once, at startup.

Plain XTC (``recipe=xtc``) quantizes every target from the first step and optimizes the
latent full-precision weights like any other weight. A small model (MiniLM, hidden 384)
loses most of its accuracy at that first step and recovers slowly, so the recipe adds
levers, each one key, each a pure function of the optimizer step (a resumed run recomputes
the same state). The default, ``recipe=fast_latent``, is ``xtc`` with ``latent_lr: 2e-3`` and
``dropout: 0``::

    name: xtc                   # label
    progressive: none           # none | ramp | ternary  (how the student reaches its bit-width)
    progressive_epochs: 0.0     # length of that phase, in quantize epochs (may be fractional)
    latent_lr: null             # lr of the binary/ternary latent weights (null: the stage's lr)
    latent_weight_decay: ${optim.weight_decay}  # AdamW decay of the quantized latent weights
    latent_clip: null           # clamp latent weights to +-this * their group's mean|w| (null: off)
    latent_pull: null           # move binary latent weights this fraction toward mean|w| * sign(w) (null: off)
    attention_scale: 1.0        # quantize stage: distill.weights.attention * this
    direction_matching: none    # none | attention | all  (quantize stage: BiBERT's scale-free losses)
    dropout: null               # quantize stage: every dropout of the student at this p (null: the model's)
    scale_gradient: false       # binary / ternary scales get a gradient too
    teacher: teacher            # teacher | fp32_student | start_run: whom the quantize stage distils from
    start_run: null             # a finished quantized run of this task and student to start from

``progressive``
    ``none``     the configured weights from the first step (XTC).
    ``ramp``     for the first ``P = progressive_epochs * steps_per_epoch`` optimizer steps the
                 forward uses ``w + m * (Q(w) - w)`` with ``m = (step + 1) / (P + 1)``, rising
                 to 1; from step ``P`` on, ``m = 1``: exactly ``Q(w)``. The gradient to ``w``
                 is the identity for every ``m`` (straight-through on the ``Q`` part).
    ``ternary``  binary configs only: the first ``P`` steps train ternary weights (TWN, same
                 groups), then the same latent weights are binarized (a ternary -> binary
                 hand-off, after BinaryBERT's observation that binary training is easier from
                 a good ternary start, without its width-doubling split).

``scale_gradient``
    The scale of a binary or ternary group is ``mean|w|`` (over its nonzero codes): plain XTC
    (BWN / TWN with a straight-through estimator) treats it as a constant, so it moves only as
    far as ``|w|`` drifts (0.1% in 100 steps on MiniLM). With ``true`` the gradient also flows
    through it (``quant.quantizers.scale_gradient``: XNOR-Net's derivative of the mean), so the
    scales are learned from the loss. It is still ``mean|w|``: the forward, the state dict and
    the packed export are unchanged, only the backward differs.

``latent_clip``
    After every optimizer step of the quantize stage (while quantization is on), each latent
    weight behind a binary or ternary weight is clamped to ``±latent_clip * mean|w|`` of its
    quantization group, the mean taken before the clamp (``quant.clip_latent_weights``). At the
    fast latent lr the latent weights random-walk away from zero: the largest rows' scales grow
    2-3x and a weight far out needs many steps to flip back. Clamping keeps the sign (so the
    codes) and cuts the tails, bounding both; it needs no state, so a resumed run clamps exactly
    as an uninterrupted one. Measured on MiniLM it bounds the drift but lifts no score (CoLA at
    c = 2: 19.4 +- 2.3 over 3 seeds against 20.1 +- 1.6; BENCHMARKS.md): off by default.

``latent_pull``
    After every optimizer step of the quantize stage (while quantization is on), each latent
    weight behind a binary weight moves the fraction ``latent_pull`` (in (0, 1]) of the way to
    its binary value ``mean|w| * sign(w)`` (``quant.pull_latent_weights``): a decoupled form of
    the oscillation dampening of Nagel et al. (2022). Signs and group means are kept, so the
    forward's binary weights are too; near-zero latent weights are pushed away from the sign
    threshold, so a sign flips only when its gradient persists, not on Adam's step-to-step noise
    at the fast latent lr. Against a latent lr ``eta`` a weight at the binary value ``a`` can
    still flip under a gradient of constant sign only if ``eta > latent_pull * a``; as the lr
    decays to 0 the pull takes over and freezes the signs. Stateless, exact on resume. Measured
    on MiniLM CoLA it removes the early noise but halves the signs that change, and ends lower
    (0.003: 18.0, 0.01: 13.6, against 20.7 at seed 42; BENCHMARKS.md): off by default.

``direction_matching``
    ``none``       the attention-score and hidden-state MSE (XTC).
    ``attention``  the quantize stage's attention loss becomes BiBERT's direction matching (Qin et
                   al. 2022; ``distill.qkv_direction_loss``) under its weight (times
                   ``attention_scale``): instead of the MSE of the attention scores, the
                   normalised distance ``|| S/||S|| - T/||T|| ||`` between the student's and the
                   teacher's query, key and value similarity matrices ``x.x^T``. Blind to scale
                   and bounded (each term lies in [0, 2]): the binary student's attention-score
                   MSE is ~95% of its gradient and pays for scales its binary weights cannot reach.
    ``all``        the hidden loss too (``distill.hidden_direction_loss``): the same normalised
                   distance between the hidden states, as BiBERT distils them.
    The reduce stage is unchanged. Measured on MiniLM at W1A8 (seed 42; BENCHMARKS.md) both
    lower the score: ``all`` CoLA 18.9 and STS-B 54.3, ``attention`` STS-B 49.3, against the
    default's 20.7 and 67.7. With 8-bit activations the attention scores are what the student
    computes, and their MSE supervises them directly; BiBERT made its losses for fully binary
    (W1A1) students, whose binary queries and keys cannot reproduce the teacher's scores. Off by
    default.

``dropout``
    The quantize stage sets every dropout of the student (embeddings, attention probabilities,
    hidden states, classifier) to this probability in [0, 1); null keeps the model's own (MiniLM
    and BERT: 0.1). The teacher never uses dropout; the reduce stage and evaluation are unchanged.
    A binary student underfits its teacher (on MiniLM CoLA its distillation loss ends near 3.3
    where the same stage at 8 bits ends near 2.6), and binarization is itself a strong
    regularizer, so dropout on top costs more than it protects. Measured on MiniLM at W1A8
    (BENCHMARKS.md "tenth screen"): CoLA 21.7 +- 1.5 against 20.1 +- 1.6 (3 seeds), STS-B
    augmented x2 76.8 +- 0.7 against 72.4 +- 0.7 (3 seeds), MRPC 80.7 and 79.8 against 77.9
    (seed 42), SST-2 on 24,000 sentences 84.5 (seed 42; 84.1 +- 0.7 with dropout, the same
    teacher score on an earlier machine). ``recipe=fast_latent`` (the default) sets 0; ``xtc``
    keeps the model's dropout, as the paper.

``teacher``
    ``teacher``       the task's teacher, as in XTC's one-stage distillation: student layer ``i``
                      learns from teacher layer ``layers[i]``.
    ``fp32_student``  a frozen copy of the full-precision student the quantize stage starts
                      from (after layer reduction, if any): student layer ``i`` learns from its
                      own full-precision self, as TernaryBERT and BinaryBERT distil a quantized
                      model from the same-depth model it was initialized from. At step 0 the
                      losses measure only what quantization changed.
    ``start_run``     the final model of ``start_run`` (below), frozen in its own bit-width,
                      layer for layer: multi-step distillation (BiT, Liu et al. 2022), where
                      each lower bit-width learns from the one above it (fp32 -> 2 bits -> 1 bit)
                      instead of from the far-away full-precision teacher.

``start_run``
    The folder of a finished run of the same task and student layers whose last stage is
    ``quantize`` (a ternary student, say). The quantize stage starts from that run's selected
    weights (``quantize/weights.safetensors``: its latent weights and every other parameter)
    instead of the full-precision student, then quantizes them with this run's ``quant``: a
    ternary -> binary hand-off at the end of a whole ternary training rather than after a
    phase of this one. With ``teacher: start_run`` it also distils from that run's model.
    Checked at startup (a finished quantized run, this task, these layers); the weights must
    fit this run's student. Measured on MiniLM CoLA (3 seeds), it does not help: multi-step 16.4,
    from a W8A8 start 18.9, against the default's 20.1 (BENCHMARKS.md): off by default.

Evaluation always uses the final form (``m = 1``, the configured method): every dev score,
and so the best-on-dev checkpoint, is that of the model the export writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from xtc_lightning.errors import UserError, check_exact_keys
from xtc_lightning.quant.config import LOW_BIT_METHODS, QuantConfig, WeightSpec

PROGRESSIVE = ("none", "ramp", "ternary")
DIRECTION_MATCHING = {"none": (), "attention": ("attention",), "all": ("attention", "hidden")}
TEACHERS = ("teacher", "fp32_student", "start_run")


@dataclass(frozen=True)
class Recipe:
    name: str
    progressive: str
    progressive_epochs: float
    latent_lr: float | None
    latent_weight_decay: float
    latent_clip: float | None
    latent_pull: float | None
    attention_scale: float
    direction_matching: str
    dropout: float | None
    scale_gradient: bool
    teacher: str
    start_run: str | None

    @classmethod
    def from_dict(cls, d: Mapping, quant: QuantConfig, quantize_epochs: int) -> Recipe:
        """Validate ``cfg.recipe`` (every key above, no other) against the quant config and the
        quantize stage's epochs."""
        if not isinstance(d, Mapping):
            raise UserError(f"recipe must be a mapping, got {d!r}")
        check_exact_keys(d, [f.name for f in fields(cls)], "recipe")
        name = d["name"]
        if not isinstance(name, str) or not name:
            raise UserError(f"recipe.name={name!r} is not accepted: a non-empty string")
        progressive = d["progressive"]
        if progressive not in PROGRESSIVE:
            raise UserError(f"recipe.progressive={progressive!r} is not accepted: {' | '.join(PROGRESSIVE)}")
        epochs = _number(d["progressive_epochs"], "recipe.progressive_epochs")
        if progressive == "none" and epochs != 0:
            raise UserError(
                f"recipe.progressive_epochs={epochs} needs recipe.progressive=ramp or ternary (it is none)"
            )
        if progressive != "none":
            if not 0 < epochs < quantize_epochs:
                raise UserError(
                    f"recipe.progressive_epochs={epochs} is not accepted with recipe.progressive={progressive}: "
                    f"a number in (0, quantize.max_epochs={quantize_epochs})"
                )
            if not quant.weight.enabled:
                raise UserError(
                    f"recipe.progressive={progressive} needs quantized weights (quant={quant.name})"
                )
        if progressive == "ternary" and quant.weight.method != "binary":
            raise UserError(
                f"recipe.progressive=ternary hands ternary weights over to binary ones: it needs "
                f"quant.weight.method=binary, not {quant.weight.method}"
            )
        latent_lr = d["latent_lr"]
        if latent_lr is not None:
            latent_lr = _number(latent_lr, "recipe.latent_lr")
            if latent_lr <= 0:
                raise UserError(f"recipe.latent_lr={latent_lr} is not accepted: a number > 0, or null")
        latent_clip = d["latent_clip"]
        if latent_clip is not None:
            latent_clip = _number(latent_clip, "recipe.latent_clip")
            if latent_clip <= 1:
                raise UserError(
                    f"recipe.latent_clip={latent_clip} is not accepted: a number > 1 (a multiple of "
                    f"the group's mean|w|), or null"
                )
            if quant.weight.method not in LOW_BIT_METHODS:
                raise UserError(
                    f"recipe.latent_clip={latent_clip} needs binary or ternary weights "
                    f"(quant.weight.method={quant.weight.method})"
                )
        latent_pull = d["latent_pull"]
        if latent_pull is not None:
            latent_pull = _number(latent_pull, "recipe.latent_pull")
            if not 0 < latent_pull <= 1:
                raise UserError(
                    f"recipe.latent_pull={latent_pull} is not accepted: a fraction in (0, 1], or null"
                )
            if quant.weight.method != "binary":
                raise UserError(
                    f"recipe.latent_pull={latent_pull} needs binary weights "
                    f"(quant.weight.method={quant.weight.method})"
                )
        direction = d["direction_matching"]
        if not isinstance(direction, str) or direction not in DIRECTION_MATCHING:
            raise UserError(
                f"recipe.direction_matching={direction!r} is not accepted: {' | '.join(DIRECTION_MATCHING)}"
            )
        dropout = d["dropout"]
        if dropout is not None:
            dropout = _number(dropout, "recipe.dropout")
            if not 0 <= dropout < 1:
                raise UserError(f"recipe.dropout={dropout} is not accepted: a probability in [0, 1), or null")
        scale_grad = d["scale_gradient"]
        if not isinstance(scale_grad, bool):
            raise UserError(f"recipe.scale_gradient={scale_grad!r} is not accepted: true or false")
        if scale_grad and quant.weight.method not in LOW_BIT_METHODS:
            raise UserError(
                f"recipe.scale_gradient=true needs binary or ternary weights (quant.weight.method="
                f"{quant.weight.method})"
            )
        teacher = d["teacher"]
        if teacher not in TEACHERS:
            raise UserError(f"recipe.teacher={teacher!r} is not accepted: {' | '.join(TEACHERS)}")
        start_run = d["start_run"]
        if start_run is not None and (not isinstance(start_run, str) or not start_run):
            raise UserError(f"recipe.start_run={start_run!r} is not accepted: a run folder, or null")
        if teacher == "start_run" and start_run is None:
            raise UserError(
                "recipe.teacher=start_run needs recipe.start_run (a finished quantized run folder)"
            )
        return cls(
            name=name,
            progressive=progressive,
            progressive_epochs=epochs,
            latent_lr=latent_lr,
            latent_weight_decay=_non_negative(d["latent_weight_decay"], "recipe.latent_weight_decay"),
            latent_clip=latent_clip,
            latent_pull=latent_pull,
            attention_scale=_non_negative(d["attention_scale"], "recipe.attention_scale"),
            direction_matching=direction,
            dropout=dropout,
            scale_gradient=scale_grad,
            teacher=teacher,
            start_run=start_run,
        )

    @property
    def direction_losses(self) -> tuple[str, ...]:
        """The distillation losses the quantize stage computes in direction-matching form."""
        return DIRECTION_MATCHING[self.direction_matching]

    def progressive_steps(self, steps_per_epoch: float) -> int:
        """``P``: optimizer steps of the progressive phase (0 without one)."""
        if self.progressive == "none":
            return 0
        return max(1, round(self.progressive_epochs * steps_per_epoch))

    def mix_at(self, step: int, steps_per_epoch: float) -> float:
        """The quantized share ``m`` of the forward weight at optimizer ``step`` (1 = fully quantized)."""
        p = self.progressive_steps(steps_per_epoch)
        if self.progressive != "ramp" or step >= p:
            return 1.0
        return (step + 1) / (p + 1)

    def weight_spec_at(self, step: int, steps_per_epoch: float, final: WeightSpec) -> WeightSpec:
        """The weight quantizer at ``step`` of a module configured as ``final``: ternary for a binary
        one during a ternary phase, else ``final``."""
        ternary_phase = self.progressive == "ternary" and step < self.progressive_steps(steps_per_epoch)
        if ternary_phase and final.method == "binary":
            return WeightSpec(method="ternary", bits=2, groups=final.groups)
        return final


def check_start_run(path: str, task: str, layers: list[int] | None) -> None:
    """``recipe.start_run``: a finished run folder of ``task`` whose last stage is ``quantize``, its
    student on the teacher ``layers`` (None: not known before the teacher is read). Reads only the
    folder's records; whether its weights fit the student is checked when the stage loads them."""
    from xtc_lightning.export.run import quantize_base, read_run

    key = f"recipe.start_run={path}"
    if not Path(path).is_dir():
        raise UserError(f"{key} is not accepted: no such folder (a finished quantized run of this task)")
    try:
        results, _ = read_run(Path(path))
        if "quantize" in results["stages"]:
            quantize_base(results, Path(path))  # the folder its student is rebuilt on is still there
    except UserError as err:
        raise UserError(f"{key} is not accepted: {err}") from None
    if results.get("task") != task:
        raise UserError(f"{key} is not accepted: it is a run of task {results.get('task')!r}, not {task!r}")
    quantize = results["stages"].get("quantize")
    if results.get("final_stage") != "quantize" or not (quantize or {}).get("weights"):
        raise UserError(
            f"{key} is not accepted: its last stage is {results.get('final_stage')!r}; a run that ends "
            f"with a quantize stage (and its quantize/weights.safetensors) is needed"
        )
    if layers is not None and quantize.get("layers") != layers:
        raise UserError(
            f"{key} is not accepted: its student keeps teacher layers {quantize.get('layers')}, "
            f"this run's keeps {layers}"
        )


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} is not accepted: a finite number")
    return float(value)


def _non_negative(value, key: str) -> float:
    v = _number(value, key)
    if v < 0:
        raise UserError(f"{key}={v} is not accepted: a number >= 0")
    return v

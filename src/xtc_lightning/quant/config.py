"""The quantization config (``cfg.quant``): dataclasses validated once, at startup.

Schema (every key is read; a bad value raises ``UserError`` naming the key, the
value and what is accepted)::

    name: w1a8                 # label for logs and run names
    start_step: 0              # optimizer steps in full precision before quantizing
    weight:
      method: binary           # none | binary | ternary | symmetric | asymmetric
      bits: 1                  # none 32, binary 1, ternary 2, symmetric/asymmetric 2..8
      groups: row              # tensor | row | N (N contiguous groups of the flattened weight)
    activation:
      method: symmetric        # none | symmetric | asymmetric
      bits: 8                  # 4 or 8; 32 with none
      range: dynamic           # dynamic (per token, on the fly) | static (EMA of per-tensor min/max)
      ema_momentum: 0.99       # static: running = m * running + (1 - m) * batch
    targets: [query, key, value, attention_output, intermediate, output]
    word_embeddings: true      # quantize the word embedding rows (weights only)
    pooler: false              # the pooler's hidden -> hidden linear too
    weight_by_target: {}       # mixed precision: {role: {method, bits, groups}} replaces `weight`
                               # for that role (a target, word_embeddings or pooler), e.g.
                               # {query: {method: symmetric, bits: 8}, key: {method: symmetric, bits: 8}}

A missing key takes the default of the matching field below (the defaults mean
"no quantization"), except ``weight.bits`` / ``activation.bits`` of a uniform
method, which must be given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from xtc_lightning.errors import UserError

WEIGHT_METHODS = ("none", "binary", "ternary", "symmetric", "asymmetric")
ACTIVATION_METHODS = ("none", "symmetric", "asymmetric")
ACTIVATION_BITS = (4, 8)
RANGES = ("dynamic", "static")
# The six linears of an encoder layer, in data-flow order (see apply.find_quant_targets).
TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
FULL_PRECISION_BITS = 32
# The 1- and 2-bit methods: a weight's code changes only when its latent weight crosses a
# threshold (0 for binary, the per-group ±Δ for ternary), however the gradient pushes it; their
# scale is a group's mean|w| (what the recipe's latent-weight levers and scale gradient act on).
LOW_BIT_METHODS = ("binary", "ternary")


@dataclass(frozen=True)
class WeightSpec:
    """How a weight tensor is quantized. ``groups``: "tensor", "row" or a positive int N."""

    method: str = "none"
    bits: int = FULL_PRECISION_BITS
    groups: str | int = "row"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        return "fp32" if not self.enabled else f"{self.method} {self.bits}b, groups={self.groups}"


@dataclass(frozen=True)
class ActivationSpec:
    """How the input of a quantized linear is quantized."""

    method: str = "none"
    bits: int = FULL_PRECISION_BITS
    range: str = "dynamic"
    ema_momentum: float = 0.99

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        return "fp32" if not self.enabled else f"{self.method} {self.bits}b {self.range}"


@dataclass(frozen=True)
class QuantConfig:
    """The whole ``cfg.quant`` group. ``QuantConfig()`` means no quantization."""

    name: str = "fp32"
    start_step: int = 0
    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    targets: tuple[str, ...] = TARGETS
    word_embeddings: bool = False
    pooler: bool = False
    weight_by_target: tuple[tuple[str, WeightSpec], ...] = ()

    def weight_for(self, role: str) -> WeightSpec:
        """The weight quantizer of ``role`` (a target, ``word_embeddings`` or ``pooler``)."""
        return dict(self.weight_by_target).get(role, self.weight)

    @property
    def mixed(self) -> bool:
        return bool(self.weight_by_target)

    @property
    def enabled(self) -> bool:
        """False for fp32: applying the config is then a no-op."""
        return self.weight.enabled or self.activation.enabled

    def active_at(self, global_step: int) -> bool:
        """Whether quantization is on at this optimizer step (the schedule)."""
        return self.enabled and global_step >= self.start_step

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantConfig:
        """Validate a plain dict or an OmegaConf ``DictConfig`` (``cfg.quant``)."""
        d = _mapping(d, "quant")
        _no_unknown_keys(d, "quant", [f.name for f in fields(cls)])
        cfg = cls(
            name=_name(d.get("name", cls.name)),
            start_step=_non_negative_int(d.get("start_step", cls.start_step), "quant.start_step"),
            weight=_weight_spec(_mapping(d.get("weight", {}), "quant.weight")),
            activation=_activation_spec(_mapping(d.get("activation", {}), "quant.activation")),
            targets=_targets(d.get("targets", list(TARGETS))),
            word_embeddings=_bool(d.get("word_embeddings", cls.word_embeddings), "quant.word_embeddings"),
            pooler=_bool(d.get("pooler", cls.pooler), "quant.pooler"),
        )
        # null (the YAML default, so that a command line may set the whole mapping) = none
        by_target = _mapping(d.get("weight_by_target") or {}, "quant.weight_by_target")
        if by_target:
            quantized = [*cfg.targets, *(["word_embeddings"] if cfg.word_embeddings else [])]
            quantized += ["pooler"] if cfg.pooler else []
            specs = []
            for role, spec in by_target.items():
                if role not in quantized:
                    raise UserError(
                        f"quant.weight_by_target.{role}: not a quantized role of this config; "
                        f"accepted: {', '.join(quantized)}"
                    )
                spec = dict(_mapping(spec, f"quant.weight_by_target.{role}"))
                spec.setdefault("groups", cfg.weight.groups)
                specs.append((role, _weight_spec(spec, f"quant.weight_by_target.{role}")))
            if not cfg.weight.enabled:
                raise UserError("quant.weight_by_target needs a weight method (quant.weight.method is none)")
            cfg = dataclasses.replace(cfg, weight_by_target=tuple(specs))
        if cfg.word_embeddings and not cfg.weight.enabled:
            raise UserError(
                "quant.word_embeddings=true needs a weight method (quant.weight.method is none); "
                "set quant.word_embeddings=false"
            )
        if cfg.pooler and not cfg.weight.enabled:
            raise UserError(
                "quant.pooler=true needs a weight method (quant.weight.method is none); set quant.pooler=false"
            )
        return cfg


def _weight_spec(d: Mapping, key: str = "quant.weight") -> WeightSpec:
    _no_unknown_keys(d, key, [f.name for f in fields(WeightSpec)])
    method = _choice(d.get("method", "none"), f"{key}.method", WEIGHT_METHODS)
    implied = {"none": FULL_PRECISION_BITS, "binary": 1, "ternary": 2}
    if "bits" not in d and method not in implied:
        raise UserError(f"{key}.bits is required for method {method} (2..8)")
    bits = _int(d.get("bits", implied.get(method)), f"{key}.bits")
    if method in implied and bits != implied[method]:
        raise UserError(f"{key}.bits={bits} does not fit method {method}: it needs bits={implied[method]}")
    if method not in implied and not 2 <= bits <= 8:
        raise UserError(f"{key}.bits={bits} is not supported for method {method}: accepted 2..8")
    return WeightSpec(method=method, bits=bits, groups=_groups(d.get("groups", "row"), f"{key}.groups"))


def _activation_spec(d: Mapping) -> ActivationSpec:
    _no_unknown_keys(d, "quant.activation", [f.name for f in fields(ActivationSpec)])
    method = _choice(d.get("method", "none"), "quant.activation.method", ACTIVATION_METHODS)
    if "bits" not in d and method != "none":
        raise UserError(f"quant.activation.bits is required for method {method} (4 or 8)")
    bits = _int(d.get("bits", FULL_PRECISION_BITS), "quant.activation.bits")
    if method == "none" and bits != FULL_PRECISION_BITS:
        raise UserError(f"quant.activation.bits={bits} does not fit method none: it needs bits=32")
    if method != "none" and bits not in ACTIVATION_BITS:
        raise UserError(
            f"quant.activation.bits={bits} is not supported: accepted 4 or 8 (32 with method none)"
        )
    range_ = _choice(d.get("range", "dynamic"), "quant.activation.range", RANGES)
    momentum = d.get("ema_momentum", ActivationSpec.ema_momentum)
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 < momentum < 1:
        raise UserError(f"quant.activation.ema_momentum={momentum!r} is not accepted: a number in (0, 1)")
    return ActivationSpec(method=method, bits=bits, range=range_, ema_momentum=float(momentum))


def _groups(value, key: str = "quant.weight.groups") -> str | int:
    if value in ("tensor", "row"):
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise UserError(f"{key}={value!r} is not accepted: tensor, row or a positive integer N")


def _targets(value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise UserError(f"quant.targets={value!r} is not a list: give a subset of {list(TARGETS)}")
    targets = tuple(value)
    for t in targets:
        if t not in TARGETS:
            raise UserError(f"quant.targets: unknown target {t!r}; accepted: {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise UserError(f"quant.targets={list(targets)} lists a target twice")
    return targets


def _mapping(value, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise UserError(f"{key} must be a mapping, got {value!r}")
    return value


def _no_unknown_keys(d: Mapping, key: str, known: list[str]) -> None:
    for k in d:
        if k not in known:
            raise UserError(f"unknown key {key}.{k}; accepted: {', '.join(known)}")


def _choice(value, key: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise UserError(f"{key}={value!r} is not accepted: {' | '.join(accepted)}")
    return value


def _int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value!r} is not an integer")
    return value


def _non_negative_int(value, key: str) -> int:
    if _int(value, key) < 0:
        raise UserError(f"{key}={value} is negative: give 0 (quantize from the first step) or more")
    return value


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not accepted: true or false")
    return value


def _name(value) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"quant.name={value!r} is not accepted: a non-empty string")
    return value

"""Finding the quantizable modules of an HF encoder and swapping in quantized ones.

The modules are found from the model **structure**, not from per-model names. Inside
each encoder layer (``models.encoder_layers``) the ``nn.Linear`` modules, in module
(definition) order, must be exactly the six of a post-LN transformer block:

    query, key, value    three sibling linears (same parent), hidden -> A, fed by the hidden state
    attention_output     A -> hidden (the attention's output projection)
    intermediate         hidden -> I (the FFN's first linear)
    output               I -> hidden (the FFN's second linear)

This holds for BERT, RoBERTa and MiniLM (``attention.self.query`` ...
``output.dense``) and DistilBERT (``attention.q_lin`` ... ``ffn.lin2``). Anything else
(another linear count, other shapes) is a ``UserError`` listing what was found. The word
embeddings are ``model.get_input_embeddings()``. The pooler (``quant.pooler``, off by
default as in XTC) is the single hidden -> hidden linear of ``base_model.pooler`` (BERT,
RoBERTa and MiniLM have one; DistilBERT has none). Position / token-type embeddings,
LayerNorms and the classifier are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xtc_lightning.errors import UserError
from xtc_lightning.models import encoder_layers
from xtc_lightning.quant.config import LOW_BIT_METHODS, TARGETS, QuantConfig
from xtc_lightning.quant.layers import QUANT_MODULES, QuantEmbedding, QuantLinear
from xtc_lightning.quant.quantizers import float_weight_codes, num_groups

WORD_EMBEDDINGS = "word_embeddings"
POOLER = "pooler"


@dataclass(frozen=True)
class QuantTarget:
    """One quantizable module: its qualified name, its role and its encoder layer (None for embeddings)."""

    name: str
    role: str
    layer: int | None
    module: nn.Module


def find_quant_targets(model: nn.Module) -> list[QuantTarget]:
    """The six linears of every encoder layer (roles = ``config.TARGETS``), the word embeddings
    and, when the model has one, the pooler's linear."""
    if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        raise UserError(
            f"cannot quantize {type(model).__name__}: not a Hugging Face encoder model (no .config)"
        )
    stack_name, layers = encoder_layers(model)
    targets = []
    for i, layer in enumerate(layers):
        linears = _layer_linears(layer, f"{stack_name}.{i}")
        targets += [
            QuantTarget(f"{stack_name}.{i}.{name}", role, i, module)
            for role, (name, module) in zip(TARGETS, linears, strict=True)
        ]
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise UserError(
            f"cannot quantize the word embeddings of {type(model).__name__}: "
            f"get_input_embeddings() returned {type(embeddings).__name__}, not nn.Embedding"
        )
    targets.append(QuantTarget(_qualified_name(model, embeddings), WORD_EMBEDDINGS, None, embeddings))
    pooler = _pooler_linear(model)
    if pooler is not None:
        targets.append(QuantTarget(_qualified_name(model, pooler), POOLER, None, pooler))
    return targets


def _pooler_linear(model: nn.Module) -> nn.Linear | None:
    """The one hidden -> hidden linear of ``base_model.pooler``, or None (no pooler, or another shape)."""
    pooler = getattr(getattr(model, "base_model", model), "pooler", None)
    if not isinstance(pooler, nn.Module):
        return None
    linears = [m for m in pooler.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or linears[0].in_features != linears[0].out_features:
        return None
    return linears[0]


def _layer_linears(layer: nn.Module, where: str) -> list[tuple[str, nn.Linear]]:
    linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    already = [n for n, m in linears if isinstance(m, QUANT_MODULES)]
    if already:
        raise UserError(f"{where} is already quantized ({', '.join(already)}): apply a quant config once")
    if _is_transformer_block(linears):
        return linears
    found = ", ".join(f"{n}[{m.in_features}->{m.out_features}]" for n, m in linears) or "none"
    raise UserError(
        f"unsupported architecture: cannot identify the attention and FFN linears of "
        f"{type(layer).__name__} ({where}): expected 6 nn.Linear in the order query, key, value "
        f"(siblings, hidden->A), attention output (A->hidden), FFN in (hidden->I), FFN out (I->hidden); "
        f"found {len(linears)}: {found}"
    )


def _is_transformer_block(linears: list[tuple[str, nn.Linear]]) -> bool:
    if len(linears) != 6:
        return False
    (qn, q), (kn, k), (vn, v), (_, attn_out), (_, ffn_in), (_, ffn_out) = linears
    hidden = q.in_features
    parent = qn.rpartition(".")[0]
    return (
        kn.rpartition(".")[0] == parent
        and vn.rpartition(".")[0] == parent
        and all(m.in_features == hidden for m in (k, v))
        and q.out_features == k.out_features
        and attn_out.in_features == v.out_features
        and attn_out.out_features == hidden
        and ffn_in.in_features == hidden
        and ffn_out.in_features == ffn_in.out_features
        and ffn_out.out_features == hidden
    )


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_quantization(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Replace the configured modules by quantized ones, in place; returns their names.

    A no-op (returns []) when ``cfg`` quantizes nothing (fp32). Modules start enabled only
    when ``cfg.start_step == 0``; the training module then follows ``cfg.active_at(step)``.
    """
    if not cfg.enabled:
        return []
    targets = find_quant_targets(model)
    if cfg.pooler and not any(t.role == POOLER for t in targets):
        raise UserError(
            f"quant.pooler=true but {type(model).__name__} has no pooler with one hidden -> hidden linear "
            f"(base_model.pooler); set quant.pooler=false"
        )
    chosen = [
        t
        for t in targets
        if t.role in cfg.targets
        or (t.role == WORD_EMBEDDINGS and cfg.word_embeddings)
        or (t.role == POOLER and cfg.pooler)
    ]
    if cfg.weight.enabled:  # check every group count before changing anything
        for t in chosen:
            num_groups(t.module.weight.shape, cfg.weight_for(t.role).groups, what=f"{t.name}.weight")
    for t in chosen:
        if t.role == WORD_EMBEDDINGS:
            new = QuantEmbedding(t.module, cfg.weight_for(t.role))
        else:
            new = QuantLinear(t.module, cfg.weight_for(t.role), cfg.activation)
        new.role = t.role
        new.quant_enabled = cfg.start_step == 0
        parent_name, _, child = t.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return [t.name for t in chosen]


def set_quantization_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every quantized module of ``model`` on or off; returns how many there are."""
    modules = [m for m in model.modules() if isinstance(m, QUANT_MODULES)]
    for m in modules:
        m.quant_enabled = enabled
    return len(modules)


def set_weight_form(
    model: nn.Module, cfg: QuantConfig, spec_of=None, mix: float = 1.0, scale_grad: bool = False
) -> int:
    """Set the weight quantizer, the quantized share ``mix`` and ``scale_grad`` (see ``layers``) of
    every quantized module of ``model`` whose weights are quantized (as ``apply_quantization(model,
    cfg)`` made them); ``spec_of(configured spec) -> spec`` changes the quantizer (None: the
    configured one). Returns how many modules there are."""
    modules = [m for m in model.modules() if isinstance(m, QUANT_MODULES)]
    modules = [m for m in modules if cfg.weight_for(m.role).enabled]
    for m in modules:
        configured = cfg.weight_for(m.role)
        m.set_weight_spec(configured if spec_of is None else spec_of(configured))
        m.mix = mix
        m.scale_grad = scale_grad
    return len(modules)


def latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """The latent full-precision weights behind binary and ternary weights (what the recipe's
    optimizer settings for latent weights apply to; 4- and 8-bit weights train like fp32 ones)."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, QUANT_MODULES) and m.weight_spec.method in LOW_BIT_METHODS
    ]


@torch.no_grad()
def clip_latent_weights(model: nn.Module, clip: float) -> None:
    """Clamp, in place, every latent weight behind a binary or ternary weight to
    ``±clip * mean|w|`` of its quantization group (the binary scale: ``weight_spec.groups``), the
    mean taken before the clamp (which lowers it: a second call cuts again, nearer). Signs are
    kept, so the codes are too; the tails beyond ``clip`` times the scale are cut, which bounds how
    far a weight can wander from the sign threshold and how far its group's scale can drift.
    Stateless: it depends only on the weights. Nothing is read back to the host (no device sync)."""
    for _, w in _grouped_latent_weights(model, LOW_BIT_METHODS):
        bound = clip * w.abs().mean(dim=1, keepdim=True)
        torch.minimum(w, bound, out=w)
        torch.maximum(w, -bound, out=w)


@torch.no_grad()
def pull_latent_weights(model: nn.Module, rate: float) -> None:
    """Move, in place, every latent weight behind a binary weight the fraction ``rate`` of the way
    to the value it stands for: ``w <- w + rate * (mean|w| * sign(w) - w)``, the mean over its
    quantization group (``weight_spec.groups``). A decoupled form of the oscillation dampening of
    Nagel et al. (2022), whose loss ``lambda * (w - Q(w))**2`` pulls each latent weight to its
    quantization level: applied after the optimizer step, like AdamW's weight decay, so Adam does
    not rescale it. For ``0 < rate <= 1`` it keeps every sign and every group's mean|w|, so the
    binary weights (codes and scales) the forward uses are unchanged; what changes is how far a
    weight sits from the sign threshold: near-zero weights are pushed out, so a sign flips only on
    a gradient that persists. Ternary and 8-bit weights are left alone. Stateless, no device sync."""
    for m, w in _grouped_latent_weights(model, ("binary",)):
        codes, scale, _ = float_weight_codes(w, m.weight_spec)
        w.lerp_(codes.mul_(scale), rate)


def _grouped_latent_weights(model: nn.Module, methods) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each quantized module whose weight method is in ``methods``, with a ``(groups, -1)`` view of
    its latent weight (in place edits of the view change the weight)."""
    return [
        (m, m.weight.view(num_groups(m.weight.shape, m.weight_spec.groups), -1))
        for m in model.modules()
        if isinstance(m, QUANT_MODULES) and m.weight_spec.method in methods
    ]

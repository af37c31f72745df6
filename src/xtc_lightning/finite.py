"""Non-finite values (NaN, inf) stop a run: in losses, weights and anything written to disk.

A diverged stage must never look like a result: its loss stops training (``callbacks.FiniteLoss``),
its weights are refused before they are cached or exported, and ``results.json`` is written with
``allow_nan=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from xtc_lightning.errors import UserError


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``tensors`` holding a NaN or an infinity, in order."""
    return [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Raise a one-line ``UserError`` when a parameter or buffer of ``model`` is not finite.

    ``what`` names the model and the action refused, e.g. ``"teacher (before caching)"``.
    """
    bad = nonfinite_tensors(dict(model.state_dict()))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"{what}: non-finite weights (NaN/inf) in '{bad[0]}'{more}; "
            "the training diverged (lower the learning rate)"
        )


def first_nonfinite(value, path: str = "") -> str | None:
    """The dotted path of the first non-finite float inside nested dicts/lists, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_nonfinite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None

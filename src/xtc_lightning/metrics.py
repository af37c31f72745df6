"""GLUE metrics with torchmetrics, one ``score`` per task.

``GlueSplitMetric`` gathers (row index, prediction, label) over the epoch and
across processes, drops the duplicates a distributed sampler adds to even out
shards (by row index), and computes the task's metrics on what is left. The
task score follows the GLUE convention: the mean of the task's metrics (and, for
MNLI, the mean over the matched and mismatched dev sets).
"""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import binary_f1_score, binary_matthews_corrcoef

from xtc_lightning.tasks import GlueTask


def compute_metrics(task: GlueTask, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's metrics (fractions, not percent) and their mean as ``score``."""
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            value = (preds == labels).float().mean()
        elif name == "f1":
            value = binary_f1_score(preds, labels)
        elif name == "matthews":
            value = binary_matthews_corrcoef(preds, labels)
        elif name == "pearson":
            value = pearson_corrcoef(preds.double(), labels.double())
        elif name == "spearman":
            value = spearman_corrcoef(preds.double(), labels.double())
        else:  # the task table only names the metrics above
            raise ValueError(name)
        out[name] = float(value)
    out["score"] = sum(out[n] for n in task.metrics) / len(task.metrics)
    return out


def predictions_from_logits(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """Class ids (argmax) for classification, the single output for regression."""
    return logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)


class GlueSplitMetric(torchmetrics.Metric):
    """Metrics of one dev split, exact under DDP (duplicated rows counted once)."""

    full_state_update = False

    def __init__(self, task: GlueTask):
        super().__init__()
        self.task = task
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("probs", default=[], dist_reduce_fx="cat")  # class probabilities (classification)

    def update(
        self,
        index: torch.Tensor,
        preds: torch.Tensor,
        labels: torch.Tensor,
        probs: torch.Tensor | None = None,
    ) -> None:
        self.index.append(index.detach().long())
        self.preds.append(preds.detach().float())
        self.labels.append(labels.detach().float())
        if probs is not None:
            self.probs.append(probs.detach().float())

    def _rows(self, *states: list) -> tuple[torch.Tensor, ...]:
        """(index, *states) over all processes, one row per example, sorted by index."""
        index = torchmetrics.utilities.dim_zero_cat(self.index)
        index, order = torch.sort(index, stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        values = (torchmetrics.utilities.dim_zero_cat(x)[order][first] for x in states)
        return index[first], *values

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, preds, labels) over all processes, one row per example, sorted by index."""
        return self._rows(self.preds, self.labels)

    def gathered_probs(self) -> torch.Tensor | None:
        """The class probabilities in ``gathered()``'s row order (None if ``update`` got none)."""
        if isinstance(self.probs, list) and not self.probs:
            return None
        return self._rows(self.probs)[1]

    def compute(self) -> dict[str, float]:
        _, preds, labels = self.gathered()
        if not self.task.is_regression:
            preds, labels = preds.long(), labels.long()
        return compute_metrics(self.task, preds, labels)


def task_score(task: GlueTask, per_split: dict[str, dict[str, float]]) -> float:
    """One number per task: the mean of the per-split scores (MNLI: matched and mismatched)."""
    return sum(per_split[s]["score"] for s in task.dev_splits) / len(task.dev_splits)

"""The GLUE task table: where each task's text and labels live, and how it is scored.

One row per task. Local files follow the original ``glue_data`` layout
(``<folder>/{train,dev}.tsv``); the hub source is ``nyu-mll/glue``. Label ids
follow the hub dataset's order so both sources agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xtc_lightning.errors import UserError


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # folder in the glue_data layout
    # Local TSV columns: header names, or 0-based positions for header-less files (CoLA).
    text_columns: tuple[str | int, ...]
    label_column: str | int
    has_header: bool
    hub_text_columns: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for regression
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def title(self) -> str:
        """The task's name as GLUE writes it (``SST-2``, ``STS-B``): its ``glue_data`` folder name."""
        return self.folder

    def hub_split(self, split: str) -> str:
        """Hub split name for a local split name (``dev`` -> ``validation``)."""
        if split == "train":
            return "train"
        return split.replace("dev", "validation")


# fmt: off
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola", "CoLA", (3,), 1, False, ("sentence",),
            ("unacceptable", "acceptable"), ("matthews",),
        ),
        GlueTask(
            "sst2", "SST-2", ("sentence",), "label", True, ("sentence",),
            ("negative", "positive"), ("accuracy",),
        ),
        GlueTask(
            "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", True, ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"), ("f1", "accuracy"),
        ),
        GlueTask(
            "stsb", "STS-B", ("sentence1", "sentence2"), "score", True, ("sentence1", "sentence2"),
            (), ("pearson", "spearman"),
        ),
        GlueTask(
            "qqp", "QQP", ("question1", "question2"), "is_duplicate", True, ("question1", "question2"),
            ("not_duplicate", "duplicate"), ("f1", "accuracy"),
        ),
        GlueTask(
            "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", True, ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            dev_splits=("dev_matched", "dev_mismatched"),
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence"), "label", True, ("question", "sentence"),
            ("entailment", "not_entailment"), ("accuracy",),
        ),
        GlueTask(
            "rte", "RTE", ("sentence1", "sentence2"), "label", True, ("sentence1", "sentence2"),
            ("entailment", "not_entailment"), ("accuracy",),
        ),
        GlueTask(
            "wnli", "WNLI", ("sentence1", "sentence2"), "label", True, ("sentence1", "sentence2"),
            ("not_entailment", "entailment"), ("accuracy",),
        ),
    ]
}
# fmt: on


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}") from None


def parse_label(task: GlueTask, raw: str) -> float | int:
    """Map a label as written in a file to the hub's label id (or a float score).

    Files write either the label name (``entailment``) or its id (``0``/``1``).
    """
    raw = raw.strip()
    if task.is_regression:
        value = float(raw)
        if not math.isfinite(value):  # a NaN label would train a NaN model
            raise ValueError(raw)
        return value
    if raw in task.label_names:
        return task.label_names.index(raw)
    value = int(raw)
    if not 0 <= value < task.num_labels:
        raise ValueError(raw)
    return value

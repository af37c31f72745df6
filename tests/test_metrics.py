"""GLUE metrics checked against sklearn / scipy on fixed predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from xtc_lightning.metrics import GlueSplitMetric, compute_metrics, task_score
from xtc_lightning.tasks import get_task

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 200)
PREDS = np.where(rng.random(200) < 0.7, LABELS, 1 - LABELS)


def test_cola_matthews():
    m = compute_metrics(get_task("cola"), torch.tensor(PREDS), torch.tensor(LABELS))
    assert m["matthews"] == pytest.approx(matthews_corrcoef(LABELS, PREDS), abs=1e-6)
    assert m["score"] == m["matthews"]


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy(task):
    m = compute_metrics(get_task(task), torch.tensor(PREDS), torch.tensor(LABELS))
    f1, acc = f1_score(LABELS, PREDS), accuracy_score(LABELS, PREDS)
    assert m["f1"] == pytest.approx(f1, abs=1e-6)
    assert m["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert m["score"] == pytest.approx((f1 + acc) / 2, abs=1e-6)


def test_stsb_pearson_spearman():
    y = rng.uniform(0, 5, 300)
    p = y + rng.normal(0, 1.0, 300)
    m = compute_metrics(
        get_task("stsb"), torch.tensor(p, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    )
    assert m["pearson"] == pytest.approx(pearsonr(p, y)[0], abs=1e-5)
    assert m["spearman"] == pytest.approx(spearmanr(p, y)[0], abs=1e-5)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    m = compute_metrics(get_task(task), torch.tensor(PREDS), torch.tensor(LABELS))
    assert m == {"accuracy": pytest.approx(accuracy_score(LABELS, PREDS)), "score": m["accuracy"]}


def test_mnli_score_is_mean_over_matched_and_mismatched():
    labels = rng.integers(0, 3, 90)
    preds_m = np.where(rng.random(90) < 0.8, labels, (labels + 1) % 3)
    preds_mm = np.where(rng.random(90) < 0.6, labels, (labels + 2) % 3)
    task = get_task("mnli")
    per_split = {
        "dev_matched": compute_metrics(task, torch.tensor(preds_m), torch.tensor(labels)),
        "dev_mismatched": compute_metrics(task, torch.tensor(preds_mm), torch.tensor(labels)),
    }
    expected = (accuracy_score(labels, preds_m) + accuracy_score(labels, preds_mm)) / 2
    assert task_score(task, per_split) == pytest.approx(expected)


def test_duplicated_rows_are_counted_once():
    """A distributed sampler pads shards by repeating rows; those repeats must not count."""
    metric = GlueSplitMetric(get_task("mrpc"))
    index = torch.arange(200)
    metric.update(index[:120], torch.tensor(PREDS[:120]), torch.tensor(LABELS[:120]))
    metric.update(index[100:], torch.tensor(PREDS[100:]), torch.tensor(LABELS[100:]))  # rows 100..119 twice
    metric.update(index[:3], torch.tensor(PREDS[:3]), torch.tensor(LABELS[:3]))  # padding repeats
    m = metric.compute()
    assert m["accuracy"] == pytest.approx(accuracy_score(LABELS, PREDS))
    assert m["f1"] == pytest.approx(f1_score(LABELS, PREDS))
    idx, preds, labels = metric.gathered()
    assert idx.tolist() == list(range(200))

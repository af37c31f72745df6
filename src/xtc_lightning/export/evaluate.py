"""Evaluate a packed file on a GLUE dev set from the file alone (``xtc-evaluate``).

The model, the task, the tokenizer (``<name>.tokenizer/`` beside the file) and the
tokenization length and batch size of the run all come from the packed file, so the
metrics reproduce the run's: same data module, same length-sorted batches, same
``compute_metrics``. ``runtime=True`` (``--runtime``) evaluates the fast int8 CPU runtime
(``load_runtime``: integer GEMMs, padding skipped) instead of the exact fake-quant model,
to check that the deployed model keeps the run's score.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from xtc_lightning.data import GlueDataModule
from xtc_lightning.errors import UserError, entry_point
from xtc_lightning.export.packed import eval_settings, load_packed, load_packed_tokenizer, packed_metadata
from xtc_lightning.metrics import compute_metrics, predictions_from_logits, task_score
from xtc_lightning.modules import model_inputs
from xtc_lightning.tasks import GlueTask, get_task

HUB_DATASET = "nyu-mll/glue"  # conf/config.yaml's data.hub_dataset
Predictions = dict[str, tuple[Tensor, Tensor, Tensor]]  # split -> (row index, prediction, label)


def dev_data(
    task: GlueTask,
    tokenizer,
    glue_dir: str | Path | None,
    max_length: int,
    batch_size: int,
    hub_dataset: str = HUB_DATASET,
) -> GlueDataModule:
    """The task's dev sets, tokenized and batched as the pipeline does it (no training split read):
    from ``glue_dir``, or from the hub dataset ``hub_dataset`` when ``glue_dir`` is None."""
    dm = GlueDataModule(
        task,
        tokenizer,
        glue_dir=None if glue_dir is None else str(glue_dir),
        hub_dataset=hub_dataset,
        max_length=max_length,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        max_train_examples=None,
        num_workers=0,
        cache_dir=None,
        seed=0,
    )
    dm.setup("validate")
    return dm


@torch.no_grad()
def predict(model: nn.Module, task: GlueTask, datamodule: GlueDataModule) -> Predictions:
    """(index, prediction, label) per dev split, sorted by row index."""
    model.eval()
    out = {}
    for split, loader in zip(task.dev_splits, datamodule.val_dataloader(), strict=True):
        index, preds, labels = [], [], []
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            index.append(batch["index"])
            preds.append(predictions_from_logits(task, logits).float())
            labels.append(batch["labels"].float())
        index_t = torch.cat(index)
        order = torch.argsort(index_t, stable=True)
        out[split] = (index_t[order], torch.cat(preds)[order], torch.cat(labels)[order])
    return out


def metrics_of(task: GlueTask, predictions: Predictions) -> dict:
    """Per-split metrics and the task score, as ``GlueSplitMetric`` computes them."""
    splits = {}
    for split, (_, preds, labels) in predictions.items():
        if not task.is_regression:
            preds, labels = preds.long(), labels.long()
        splits[split] = compute_metrics(task, preds, labels)
    return {"splits": splits, "score": task_score(task, splits)}


def evaluate_packed(
    path: str | Path,
    glue_dir: str | Path | None,
    split: str | None = None,
    *,
    max_length: int | None = None,
    batch_size: int | None = None,
    runtime: bool = False,
    hub_dataset: str = HUB_DATASET,
) -> dict:
    """Dev metrics of a packed file: ``{"task", "splits": {split: metrics}, "score", "examples"}``.

    The dev sets come from ``glue_dir``, or from the hub dataset ``hub_dataset`` when
    ``glue_dir`` is None. ``split`` (e.g. ``dev_matched``) limits it to one dev split; ``score``
    is then that split's score. ``max_length`` / ``batch_size`` default to the run's stored settings.
    """
    meta = packed_metadata(path)
    task = get_task(meta["task"])
    if split is not None and split not in task.dev_splits:
        raise UserError(f"split '{split}' is not a dev split of {task.name}: {', '.join(task.dev_splits)}")
    max_length, batch_size = eval_settings(path, meta, max_length, batch_size)
    if runtime:
        from xtc_lightning.inference import load_runtime

        model = load_runtime(path)
    else:
        model = load_packed(path)
    dm = dev_data(task, load_packed_tokenizer(path), glue_dir, max_length, batch_size, hub_dataset)
    predictions = predict(model, task, dm)
    if split is not None:
        predictions = {split: predictions[split]}
    result = metrics_of(task, predictions)
    if split is not None:
        result["score"] = result["splits"][split]["score"]
    return {
        "path": str(path),
        "task": task.name,
        **result,
        "examples": {s: len(p[0]) for s, p in predictions.items()},
        "max_length": max_length,
        "batch_size": batch_size,
        "model": "int8 runtime" if runtime else "packed (fake-quant reference)",
    }


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xtc-evaluate", description="Dev metrics of a packed xtc model file, from the file alone."
    )
    parser.add_argument("packed_file", help="a .safetensors file written by xtc-export / export_packed")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("GLUE_DIR"),
        help="GLUE folder in the glue_data layout (default: $GLUE_DIR; none: the hub dataset)",
    )
    parser.add_argument("--split", default=None, help="one dev split (default: all of the task's)")
    parser.add_argument("--max-length", type=int, default=None, help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch size")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--runtime",
        action="store_true",
        help="evaluate the fast int8 CPU runtime instead of the exact reference",
    )
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    result = evaluate_packed(
        args.packed_file,
        args.data_dir,
        args.split,
        max_length=args.max_length,
        batch_size=args.batch_size,
        runtime=args.runtime,
    )
    for split, metrics in result["splits"].items():
        values = "  ".join(f"{k}={100 * v:.2f}" for k, v in metrics.items())
        print(f"{result['task']} {split} ({result['examples'][split]} examples): {values}")
    print(f"score: {100 * result['score']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Prediction files: a run's ``predictions_<split>.tsv`` and GLUE test-set submissions (``xtc-predict``).

``predictions_<split>.tsv`` (tab-separated, a header, rows in row-index order)::

    classification   index  prediction  label  prediction_name  p_<name> ...
                     (class id, gold id, the predicted label's name, the softmax probability
                     of every class in label-id order, 4 decimals)
    regression       index  prediction  label          (the predicted and the gold score)

GLUE submission (``xtc-predict RUN_DIR_OR_EXPORT --split test``): one ``<file>.tsv`` per test
set with the header ``index\\tprediction``: the label name for MNLI, QNLI and RTE, the class
id (0 / 1) for CoLA, SST-2, MRPC, QQP and WNLI, the score for STS-B, as the GLUE server
expects; file names ``SUBMISSION_FILES`` (MNLI: ``MNLI-m.tsv`` and ``MNLI-mm.tsv``). The
model is the packed model (``load_packed``) with the tokenizer, length and batch size stored
in the packed file; test rows are read from ``<glue_dir>/<task>/test*.tsv`` (the ``index``
column, or ``id`` for QQP, and the task's text columns by name).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import Tensor

from xtc_lightning.errors import UserError, entry_point
from xtc_lightning.io import atomic_path
from xtc_lightning.tasks import GlueTask, get_task

# label names in the submission for these tasks, class ids for the others
SUBMIT_NAMES = ("mnli", "qnli", "rte")
# task -> {test file stem: submission file name}
SUBMISSION_FILES = {
    "cola": {"test": "CoLA.tsv"},
    "sst2": {"test": "SST-2.tsv"},
    "mrpc": {"test": "MRPC.tsv"},
    "stsb": {"test": "STS-B.tsv"},
    "qqp": {"test": "QQP.tsv"},
    "mnli": {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
    "qnli": {"test": "QNLI.tsv"},
    "rte": {"test": "RTE.tsv"},
    "wnli": {"test": "WNLI.tsv"},
}


def write_predictions_tsv(
    path: Path, task: GlueTask, index: Tensor, preds: Tensor, labels: Tensor, probs: Tensor | None = None
) -> None:
    """Write ``predictions_<split>.tsv`` (see the module docstring; ``probs`` None: no probability columns)."""
    names = task.label_names
    with open(path, "w") as f:
        if task.is_regression:
            f.write("index\tprediction\tlabel\n")
            for i, p, y in zip(index.tolist(), preds.tolist(), labels.tolist(), strict=True):
                f.write(f"{i}\t{p!r}\t{y!r}\n")
            return
        extra = "" if probs is None else "\tprediction_name" + "".join(f"\tp_{n}" for n in names)
        f.write(f"index\tprediction\tlabel{extra}\n")
        rows = probs.tolist() if probs is not None else [None] * len(index)
        for i, p, y, pr in zip(index.tolist(), preds.tolist(), labels.tolist(), rows, strict=True):
            cols = "" if pr is None else f"\t{names[int(p)]}" + "".join(f"\t{v:.4f}" for v in pr)
            f.write(f"{i}\t{int(p)}\t{int(y)}{cols}\n")


def submission_value(task: GlueTask, prediction: float) -> str:
    """One prediction as the GLUE server reads it (name, class id or score)."""
    if task.is_regression:
        return repr(float(prediction))
    return task.label_names[int(prediction)] if task.name in SUBMIT_NAMES else str(int(prediction))


def read_test_split(
    task: GlueTask, glue_dir: str | Path, stem: str
) -> tuple[list[int], list[tuple[str, ...]]]:
    """(row indices, texts) of ``<glue_dir>/<task folder>/<stem>.tsv`` (no labels); one ``UserError`` line per problem."""
    path = Path(glue_dir).expanduser() / task.folder / f"{stem}.tsv"
    if not path.is_file():
        raise UserError(
            f"{task.name}: test file {path} not found (--data-dir must hold the glue_data layout)"
        )
    lines = path.read_bytes().decode("utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"{path}: empty file")
    header = lines[0].rstrip("\r").split("\t")
    columns = next(
        (list(c) for c in (task.text_columns, task.hub_text_columns) if all(x in header for x in c)), None
    )
    id_column = next((c for c in ("index", "id") if c in header), None)
    if columns is None or id_column is None:
        raise UserError(
            f"{path}: expected an index column and {list(task.hub_text_columns)}; the header has {header}"
        )
    positions = [header.index(c) for c in columns]
    index, texts = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) < len(header):
            raise UserError(
                f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(fields)}"
            )
        try:
            index.append(int(fields[header.index(id_column)]))
        except ValueError:
            raise UserError(f"{path}:{lineno}: bad index '{fields[header.index(id_column)]}'") from None
        texts.append(tuple(fields[p] for p in positions))
    if not texts:
        raise UserError(f"{path}: no examples")
    return index, texts


@torch.no_grad()
def predict_texts(
    model, tokenizer, task: GlueTask, texts: list[tuple[str, ...]], max_length: int, batch_size: int
) -> Tensor:
    """Predictions (class ids or scores) of ``texts`` in their order, batched and padded to each batch's longest."""
    from xtc_lightning.metrics import predictions_from_logits

    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(zip(*texts[start : start + batch_size], strict=True))
        enc = tokenizer(*chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(predictions_from_logits(task, model(**dict(enc)).logits).float())
    return torch.cat(out)


def packed_file_of(path: str | Path) -> Path:
    """The packed file of a run folder, an export folder or the file itself."""
    path = Path(path)
    for candidate in (path, path / "model.safetensors", path / "export" / "model.safetensors"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{path}: no packed model (expected a run folder, its export/ folder or a model.safetensors)"
    )


def predict_test(path: str | Path, glue_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, str]:
    """Write the GLUE submission files of a packed model's task; returns {test file stem: written path}."""
    from xtc_lightning.export.packed import eval_settings, load_packed, load_packed_tokenizer, packed_metadata

    packed = packed_file_of(path)
    meta = packed_metadata(packed)
    task = get_task(meta["task"])
    max_length, batch_size = eval_settings(packed, meta)
    splits = {stem: read_test_split(task, glue_dir, stem) for stem in SUBMISSION_FILES[task.name]}
    model, tokenizer = load_packed(packed), load_packed_tokenizer(packed)
    out = Path(out_dir) if out_dir is not None else packed.parent / "glue_test"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, (index, texts) in splits.items():
        preds = predict_texts(model, tokenizer, task, texts, max_length, batch_size)
        target = out / SUBMISSION_FILES[task.name][stem]
        with atomic_path(target) as tmp, open(tmp, "w") as f:
            f.write("index\tprediction\n")
            for i, p in zip(index, preds.tolist(), strict=True):
                f.write(f"{i}\t{submission_value(task, p)}\n")
        written[stem] = str(target)
    return written


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xtc-predict", description="GLUE test-set predictions (submission format) of a packed model."
    )
    parser.add_argument("path", help="a run folder, its export/ folder, or a packed model.safetensors")
    parser.add_argument("--split", default="test", choices=["test"], help="the split to predict (test)")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("GLUE_DIR"),
        help="GLUE folder in the glue_data layout (default: $GLUE_DIR)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <export folder>/glue_test)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if not args.data_dir:
        raise UserError("no GLUE folder: pass --data-dir or set GLUE_DIR")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    written = predict_test(args.path, args.data_dir, args.out)
    for path in written.values():
        print(path)


if __name__ == "__main__":
    main()

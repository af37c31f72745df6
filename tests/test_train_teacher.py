"""End to end through ``python train.py``: the teacher stage on real GLUE files, and bad input."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score

from conftest import run_dirs, run_train
from xtc_lightning.results import read_record


def read_predictions(path: str) -> tuple[list[int], list[float], list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return (
        [int(r["index"]) for r in rows],
        [float(r["prediction"]) for r in rows],
        [float(r["label"]) for r in rows],
    )


def test_teacher_stage_on_real_mrpc_with_tiny_bert(tmp_path, glue_dir, tiny_bert_dir):
    args = [
        "task=mrpc",
        "stage=teacher",
        f"model.name_or_path={tiny_bert_dir}",
        "data.max_train_examples=96",
        "data.max_length=64",
        "trainer.max_epochs=2",
        "optim.lr=1e-3",
    ]
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    results = read_record(run / "results.json", run)
    assert results["task"] == "mrpc" and results["data"] == {
        "train_examples": 96,
        "dev_examples": 408,
        "dev_scored": {"dev": 408},
    }
    assert results["limited"] is False and results["limits"] == {}
    teacher = results["stages"]["teacher"]
    assert teacher["cached"] is False
    # finished: the selected model is in the cache, the full-state checkpoints are gone
    assert teacher["selected_checkpoint"].startswith("best-epoch") and teacher["steps"] == 2 * 3
    assert (Path(teacher["model_dir"]) / "model.safetensors").is_file()
    assert not list(run.glob("teacher/checkpoints")) and not list(run.rglob("*.ckpt"))
    assert teacher["params"]["total"] > 0 and teacher["num_layers"] == 2
    # The reported metrics are reproduced from the predictions file by an independent computation.
    index, preds, labels = read_predictions(results["predictions"]["dev"])
    assert sorted(index) == list(range(408))
    dev = results["metrics"]["dev"]
    assert dev["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert dev["f1"] == pytest.approx(f1_score(labels, preds), abs=1e-6)
    assert results["score"] == pytest.approx((dev["f1"] + dev["accuracy"]) / 2)
    # the gold labels in the file are the dev file's labels
    gold = [
        int(line.split("\t")[0])
        for line in (glue_dir / "MRPC" / "dev.tsv").read_text("utf-8-sig").splitlines()[1:]
    ]
    assert [labels[index.index(i)] for i in range(408)] == gold
    assert (run / "config_resolved.yaml").is_file()
    assert (run / "logs" / "teacher" / "metrics.csv").is_file()

    # A second run with the same settings reuses the cached teacher and reports the same numbers.
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = read_record(run_dirs(tmp_path)[-1] / "results.json", run_dirs(tmp_path)[-1])
    assert second["run_dir"] != results["run_dir"]
    assert second["stages"]["teacher"]["cached"] is True
    assert second["metrics"] == results["metrics"]


def test_teacher_stage_regression_stsb(tmp_path, glue_dir, tiny_bert_dir):
    proc = run_train(
        [
            "task=stsb",
            "stage=teacher",
            f"model.name_or_path={tiny_bert_dir}",
            "data.max_train_examples=64",
            "data.max_length=48",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=3",
            "data.eval_batch_size=50",
        ],
        tmp_path,
        glue_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_record(run_dirs(tmp_path)[0] / "results.json", run_dirs(tmp_path)[0])
    _, preds, labels = read_predictions(results["predictions"]["dev"])
    assert len(preds) == 150  # limit_val_batches=3 x 50
    assert results["metrics"]["dev"]["pearson"] == pytest.approx(pearsonr(preds, labels)[0], abs=1e-4)
    assert results["metrics"]["dev"]["spearman"] == pytest.approx(spearmanr(preds, labels)[0], abs=1e-4)


@pytest.mark.slow
def test_a_few_steps_with_the_real_minilm(tmp_path, glue_dir):
    proc = run_train(
        [
            "task=rte",
            "stage=teacher",
            "data.max_train_examples=64",
            "data.max_length=64",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path,
        glue_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_record(run_dirs(tmp_path)[0] / "results.json", run_dirs(tmp_path)[0])
    teacher = results["stages"]["teacher"]
    assert teacher["num_layers"] == 6 and 22_000_000 < teacher["params"]["total"] < 23_000_000
    assert 0.0 <= results["score"] <= 1.0
    # not a TTY: plain progress lines instead of a bar
    assert "teacher epoch 0 step 1/2 loss" in proc.stderr + proc.stdout


BAD_INPUTS = [
    (["task=sst3"], r"unknown task 'sst3'; choose one of: cola, mnli, mrpc"),
    (["quant=w3a3"], r"unknown quant 'w3a3'; choose one of: binary"),
    (["data.dir=/nonexistent"], r"data.dir '/nonexistent' is not a folder"),
    (["task=qnli"], r"qnli: split file .*QNLI/train.tsv not found"),
    (["model.name_or_path=/no/such/model"], r"model path '/no/such/model' does not exist"),
    (["data.max_train_examples=0"], r"data.max_train_examples=0 leaves an empty training set"),
    (["stage=everything"], r"unknown stage 'everything'"),
    (
        ["trainer.accelerator=gpu"],
        r"trainer settings \(accelerator=gpu, devices=1, precision=32-true\) cannot run here",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS, ids=[b[0][0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path, glue_dir, tiny_bert_dir, override, message):
    args = ["task=rte", "stage=teacher", f"model.name_or_path={tiny_bert_dir}", *override]
    proc = run_train(args, tmp_path, glue_dir, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    assert re.search(message, error_lines[0]), error_lines[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").glob("*/*/results.json"))


def test_bad_file_columns_are_reported_with_the_file(tmp_path, glue_dir, tiny_bert_dir):
    data = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", data / "RTE")
    lines = (data / "RTE" / "train.tsv").read_text().splitlines()
    (data / "RTE" / "train.tsv").write_text(
        "\n".join([lines[0].replace("sentence2", "hypothesis"), *lines[1:]])
    )
    proc = run_train(
        ["task=rte", "stage=teacher", f"model.name_or_path={tiny_bert_dir}", f"data.dir={data}"], tmp_path
    )
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "missing column(s) ['sentence2']" in proc.stderr


def test_existing_results_are_never_overwritten(tmp_path, glue_dir, tiny_bert_dir):
    """A failing run writes into its own new folder: earlier runs' files stay as they were."""
    old = tmp_path / "runs" / "rte-teacher" / "earlier"
    old.mkdir(parents=True)
    (old / "results.json").write_text('{"score": 0.5}')
    proc = run_train(
        ["task=rte", "stage=teacher", f"model.name_or_path={tiny_bert_dir}", "data.max_train_examples=0"],
        tmp_path,
        glue_dir,
    )
    assert proc.returncode == 2
    assert (old / "results.json").read_text() == '{"score": 0.5}'

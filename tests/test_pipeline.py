"""The whole XTC pipeline (teacher -> reduce -> quantize) on real GLUE files with tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score

from conftest import compose_job_config, run_dirs, run_train
from xtc_lightning import pipeline
from xtc_lightning.cli import CONF_DIR
from xtc_lightning.results import read_record
from xtc_lightning.slim import load_weights
from xtc_lightning.tasks import get_task

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_full_pipeline_tiny_bert(tmp_path, glue_dir, tiny_bert_dir):
    args = [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "quant=binary",
        "data.max_train_examples=64", "data.max_length=64", "trainer.max_epochs=1", "optim.lr=1e-3",
    ]  # fmt: skip
    proc = run_train([*args, "progress=bar", "trainer.log_every_n_steps=1"], tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    # the console: one model summary per stage, no Lightning table (FLOPs 0) nor bar's v_num
    console = proc.stdout + proc.stderr
    assert [line.split(" - ")[-1] for line in console.splitlines() if line.endswith(" model:")] == [
        "teacher model:", "reduce model:", "quantize model:",
    ]  # fmt: skip
    assert "FLOPs" not in console and "v_num" not in console
    for stage in ("teacher", "reduce", "quantize"):  # the learning rate of every step, in the CSV log
        rows = list(csv.DictReader((run / "logs" / stage / "metrics.csv").read_text().splitlines()))
        lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
        assert len(lrs) == 2 and lrs[0] > 0, stage  # 64 examples / batch 32
    results = read_record(run / "results.json", run)
    stages = results["stages"]
    assert list(stages) == ["teacher", "reduce", "quantize"] and results["final_stage"] == "quantize"
    assert stages["teacher"]["num_layers"] == 2
    assert stages["reduce"]["layers"] == [1] and stages["reduce"]["bits"] == {
        "weights": 32,
        "activations": 32,
    }
    assert stages["quantize"]["bits"]["weights"] == 1 and stages["quantize"]["bits"]["activations"] == 8
    by_bits = stages["quantize"]["params_by_bits"]
    assert int(by_bits["1"]) > int(by_bits["32"])  # the word embeddings and linears are 1-bit
    for stage in stages.values():
        assert {"metrics_best", "score_best", "wall_time_s", "params"} <= set(stage)
    for stage in ("teacher", "reduce", "quantize"):
        assert "metrics_last_epoch" in stages[stage]
    # the top-level metrics are the final stage's, reproduced from its predictions file
    with open(results["predictions"]["dev"]) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    acc = accuracy_score([int(r["label"]) for r in rows], [int(r["prediction"]) for r in rows])
    assert len(rows) == 277 and results["metrics"]["dev"]["accuracy"] == pytest.approx(acc)
    assert (
        "stages:" in proc.stdout
        and "quantize  1       1/8" in proc.stdout
        and "packed    1       1/8" in proc.stdout
    )
    packed = results["export"]
    assert (
        Path(packed["packed"]).is_file()
        and packed["size"]["file_bytes"] == Path(packed["packed"]).stat().st_size
    )
    assert abs(packed["dev"]["score"] - results["score"]) < 0.05  # fp16 rest: rare flips only

    # rerun: the teacher and the reduced student come from the cache; quantize trains again
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run_dirs(tmp_path)[-1] / "results.json").read_text())["stages"]
    assert again["teacher"]["cached"] and again["reduce"]["cached"]
    assert again["reduce"]["metrics_best"] == stages["reduce"]["metrics_best"]
    assert "cached" not in again["quantize"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_runs_with_fast_dev_run(
    experiment, tmp_path, glue_dir, tiny_bert12_dir, tiny_mlm_dir
):
    overrides = [
        f"experiment={experiment}",
        "debug=fast",
        f"data.dir={glue_dir}",
        f"paths.root_dir={tmp_path}",
    ]
    if experiment != "quickstart":  # paper presets: BERT-base from the hub on GPUs -> tiny 12L BERT on CPU
        overrides += [
            "task=rte", f"model.name_or_path={tiny_bert12_dir}", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "data.num_workers=0",
            # their RTE augmentation with a tiny local MLM instead of BERT-base from the hub
            f"augment.mlm_model={tiny_mlm_dir}", "data.max_train_examples=16",
        ]  # fmt: skip
    cfg, _ = compose_job_config(overrides, tmp_path / "run")
    results = pipeline.run(cfg)
    assert set(results["stages"]) >= {"teacher"}
    wants_reduce = cfg.student.layers is not None or cfg.student.num_layers is not None
    assert ("reduce" in results["stages"]) == wants_reduce
    assert ("quantize" in results["stages"]) == (cfg.quant.weight.method != "none")
    assert (tmp_path / "run" / "results.json").is_file()
    if experiment == "quickstart":
        assert results["augment"] is None
    else:  # every paper row distils, on an augmented set for RTE
        assert results["augment"]["method"] == "mlm" and results["augment"]["new_examples"] > 0


def test_teacher_stays_frozen_and_only_the_selected_student_weights_stay(tmp_path, glue_dir, tiny_bert_dir):
    from xtc_lightning.models import load_classifier

    cfg, _ = compose_job_config(
        [
            "task=rte",
            f"model.name_or_path={tiny_bert_dir}",
            "student.num_layers=1",
            "quant=ternary",
            f"data.dir={glue_dir}",
            f"paths.root_dir={tmp_path}",
            "data.max_train_examples=32",
            "trainer.max_epochs=1",
            "optim.lr=1e-2",
        ],  # fmt: skip
        tmp_path / "run",
    )
    results = pipeline.run(cfg)
    teacher_dir = results["stages"]["teacher"]["model_dir"]
    # finished stages keep their selected weights only: no full-state checkpoint is left
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list((tmp_path / "run").glob("*/checkpoints"))
    weights = results["stages"]["quantize"]["weights"]
    assert weights == str(tmp_path / "run" / "quantize" / "weights.safetensors")
    state = load_weights(weights)
    assert "bert.encoder.layer.0.attention.self.query.weight" in state and "classifier.weight" in state
    assert not [k for k in state if k.startswith("teacher.") or ".layer.1." in k]  # the 1-layer student
    # the cached teacher on disk is untouched by the student stages
    reloaded = load_classifier(cfg.model, get_task("rte"), name_or_path=teacher_dir)
    student_first_query = state["bert.encoder.layer.0.attention.self.query.weight"]
    teacher_layer1_query = reloaded.state_dict()["bert.encoder.layer.1.attention.self.query.weight"]
    assert not torch.equal(student_first_query, teacher_layer1_query)  # the student trained (lr 1e-2)


def test_two_stage_distillation_runs(tmp_path, glue_dir, tiny_bert_dir):
    cfg, _ = compose_job_config(
        [
            "task=mrpc",
            f"model.name_or_path={tiny_bert_dir}",
            "student.num_layers=1",
            "quant=fp32",
            "distill=two_stage",
            f"data.dir={glue_dir}",
            f"paths.root_dir={tmp_path}",
            "data.max_train_examples=32",
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
        ],  # fmt: skip
        tmp_path / "run",
    )
    results = pipeline.run(cfg)
    assert results["final_stage"] == "reduce"
    metrics = (tmp_path / "run" / "logs" / "reduce" / "metrics.csv").read_text().splitlines()[0]
    assert "train/attention_loss" in metrics and "train/logits_loss" in metrics

"""Data-parallel training on CPU (trainer=ddp_cpu: 2 processes, gloo) against one process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_job_config, run_train, save_tiny_bert
from xtc_lightning import pipeline
from xtc_lightning.errors import UserError

COMMON = [
    "task=rte", "student.num_layers=1", "quant=binary", "stage=quantize", "data.max_train_examples=64",
    "data.max_length=64", "trainer.max_epochs=1", "optim.lr=1e-3", "trainer.log_every_n_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory, minilm_dir) -> Path:
    """Dropout draws differ between 1 and 2 processes; without it the two runs compute the same thing."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodrop"), minilm_dir, num_layers=2, dropout=0.0)


def step_losses(run: Path, stage: str) -> np.ndarray:
    with open(run / "logs" / stage / "metrics.csv") as f:
        return np.array([float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]])


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_two_processes_follow_one_process_with_the_same_global_batch(
    tmp_path, glue_dir, tiny_bert_no_dropout
):
    args = [*COMMON, f"model.name_or_path={tiny_bert_no_dropout}"]
    one_dir, two_dir = tmp_path / "one" / "run", tmp_path / "two" / "run"
    one = run_train([*args, "data.batch_size=8", f"hydra.run.dir={one_dir}"], tmp_path / "one", glue_dir)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(
        [*args, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={two_dir}"],
        tmp_path / "two",
        glue_dir,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # 8 steps per stage; rank r's batch k is half of the one-process batch k (EpochShuffleSampler)
    # and the logged loss is the mean over both ranks. The teacher's loss (a per-example mean)
    # is the same to float rounding; the distillation losses average per-token terms within
    # each process's batch, so a mean of two halves differs slightly from the mean over the whole.
    for stage, rtol in (("teacher", 1e-5), ("reduce", 1e-4), ("quantize", 2e-3)):
        a, b = step_losses(one_dir, stage), step_losses(two_dir, stage)
        assert len(a) == len(b) == 8
        np.testing.assert_allclose(b, a, rtol=rtol, err_msg=stage)
        assert not np.allclose(a, a[0])  # it trained
    # dev (277 rows, odd): the sampler pads rank 1 with a duplicate; it is counted once
    one_res = json.loads((one_dir / "results.json").read_text())
    two_res = json.loads((two_dir / "results.json").read_text())
    assert two_res["data"]["dev_examples"] == 277
    rows = read_rows(two_dir / "predictions_dev.tsv")
    assert [int(r["index"]) for r in rows] == list(range(277))
    ones = read_rows(one_dir / "predictions_dev.tsv")
    exact = [{k: v for k, v in r.items() if not k.startswith("p_")} for r in rows]
    assert exact == [{k: v for k, v in r.items() if not k.startswith("p_")} for r in ones]
    # the probabilities (4 decimals) agree up to the last digit: the two GEMM splits round differently
    probs = [[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows]
    np.testing.assert_allclose(
        probs, [[float(v) for k, v in r.items() if k.startswith("p_")] for r in ones], atol=2e-4
    )
    accuracy = np.mean([r["prediction"] == r["label"] for r in rows])
    assert two_res["metrics"]["dev"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert two_res["metrics"] == one_res["metrics"]
    for res, world in ((one_res, 1), (two_res, 2)):
        for stage in res["stages"].values():
            assert (stage["world_size"], stage["cluster_environment"]) == (world, "LightningEnvironment")
    # both processes ran the pipeline (two stage fits each), rank 0 alone reported and wrote
    out = two.stdout
    assert out.count("results: ") == 1 and out.count("teacher epoch 0 step 8/8") == 1
    assert len(list((tmp_path / "two" / "cache" / "teachers").iterdir())) == 1


def test_the_frozen_teacher_is_outside_ddp(tiny_bert_dir):
    from xtc_lightning.config import run_config
    from xtc_lightning.distill import enable_attention_scores
    from xtc_lightning.models import load_classifier
    from xtc_lightning.modules import DistillModule
    from xtc_lightning.student import build_student
    from xtc_lightning.tasks import get_task

    cfg, _ = compose_job_config(["task=rte", f"model.name_or_path={tiny_bert_dir}"], Path("/tmp/unused"))
    config = run_config(cfg)
    teacher = enable_attention_scores(load_classifier(config.model, get_task("rte")))
    student = build_student(teacher, [1])
    module = DistillModule(teacher, student, "rte", [1], config.distill, config.optim, 1e-3)
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    teacher_names = {f"teacher.{n}" for n, _ in teacher.named_parameters()}
    assert teacher_names and teacher_names <= ignored
    assert not [n for n in ignored if not n.startswith("teacher.")]
    assert all(not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.precision=64",
            r"trainer.precision '64' is not accepted; choose one of: 32-true, bf16-mixed",
        ),
        ("checkpoint.every_n_train_steps=0", r"checkpoint.every_n_train_steps must be a positive integer"),
        ("resume=maybe", r"resume 'maybe' is not accepted; choose one of: auto, true, false"),
    ],
)
def test_bad_scale_settings_fail_in_one_line_before_writing(override, message, tmp_path, tiny_bert_dir):
    cfg, _ = compose_job_config(
        ["task=rte", f"model.name_or_path={tiny_bert_dir}", override, f"paths.root_dir={tmp_path}"],
        tmp_path / "run",
    )
    with pytest.raises(UserError, match=message):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()


def test_ddp_inside_a_local_multirun_is_refused(tmp_path, glue_dir, tiny_bert_dir):
    proc = run_train(
        [
            "hydra.mode=MULTIRUN",
            "task=rte",
            f"model.name_or_path={tiny_bert_dir}",
            "trainer=ddp_cpu",
            "optim.lr=1e-3,2e-3",
        ],
        tmp_path,
        glue_dir,
    )
    assert proc.returncode == 2
    assert "error: a ddp trainer cannot start its processes inside a local multirun" in proc.stderr
    assert not list(tmp_path.glob("runs/*/*/*/results.json"))

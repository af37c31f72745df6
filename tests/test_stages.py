"""The stage machinery without training: cache keys, the results schema, the uniform stage shape."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from xtc_lightning.cache import shaping_key
from xtc_lightning.results import UNSET, RunResult, StageResult
from xtc_lightning.stages import Models, RunContext, Stage, run_stage


def shaping_cfg():
    return OmegaConf.create(
        {
            "task": "rte",
            "model": {"name_or_path": "bert-base-uncased", "attn_implementation": "eager", "pooler": True},
            "data": {"max_length": 128, "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 5e-5, "weight_decay": 0.01, "warmup_epochs": 0.1},
            "trainer": {
                "max_epochs": 3,
                "precision": "32-true",
                "log_every_n_steps": 50,
                "num_sanity_val_steps": 0,
            },
            "seed": 42,
        }
    )


def test_cache_keys_are_the_ones_computed_before_the_stage_split():
    """Pinned with pipeline.shaping_key before it moved to cache.py: cached teachers and reduced
    students of earlier runs stay valid. A change here retrains every cached model."""
    cfg = shaping_cfg()
    assert (
        shaping_key(OmegaConf.to_container(cfg), "fp123", teacher={"max_epochs": 3, "lr": 2e-5})
        == "7095037a883d5a4b"
    )
    reduce = {"max_epochs": 3, "lr": 1e-4}
    key = shaping_key(
        OmegaConf.to_container(cfg),
        "fp123",
        from_teacher="/c/teachers/rte-x/model",
        layers=[1, 3],
        distill={"attention": 1.0},
        reduce=reduce,
    )
    assert key == "9c15cc1488ea976d"
    cfg.trainer.log_every_n_steps = 1  # logging only: same model, same key
    assert (
        shaping_key(OmegaConf.to_container(cfg), "fp123", teacher={"max_epochs": 3, "lr": 2e-5})
        == "7095037a883d5a4b"
    )
    cfg.seed = 1
    assert (
        shaping_key(OmegaConf.to_container(cfg), "fp123", teacher={"max_epochs": 3, "lr": 2e-5})
        != "7095037a883d5a4b"
    )


def test_stage_result_writes_unset_fields_nowhere_and_keeps_unknown_ones():
    result = StageResult(
        "quantize", metrics_best={"dev": {"accuracy": 0.5}}, score_best=0.5, resumed_from=None
    )
    record = result.to_dict()
    assert record == {
        "stage": "quantize",
        "metrics_best": {"dev": {"accuracy": 0.5}},
        "score_best": 0.5,
        "resumed_from": None,  # None is recorded (null), UNSET is absent
        "predictions": {},
    }
    old = {**record, "from_an_older_version": [1, 2]}  # a cached result.json of another version
    back = StageResult.from_dict(old)
    assert back.cached is UNSET and back.to_dict() == old


def test_run_result_nests_stage_results():
    run = RunResult("rte", "quantize", "/r", limited=False, limits={}, data={"train_examples": 3})
    run.stages["teacher"] = StageResult("teacher", metrics_best={}, score_best=0.25, cached=True)
    data = run.to_dict()
    assert data["stages"] == {"teacher": {"stage": "teacher", "metrics_best": {}, "score_best": 0.25,
                                          "predictions": {}, "cached": True}}  # fmt: skip
    assert "export" not in data and "final_stage" not in data and data["augment"] is None


class Recording(Stage):
    """A stage that records into <run>/<name>/result.json like the real ones and counts its runs."""

    name = "reduce"

    def __init__(self, needed: bool):
        self.wanted, self.runs, self.restored = needed, 0, None

    def needed(self, ctx, models):
        return self.wanted

    def restore(self, ctx, models, done):
        self.restored = done

    def run(self, ctx, models):
        self.runs += 1
        return StageResult(self.name, metrics_best={"dev": {"accuracy": 0.75}}, score_best=0.75)


def test_run_stage_asks_needed_done_run_record_in_that_order(tmp_path: Path):
    ctx = RunContext(SimpleNamespace(stage="quantize"), None, None, tmp_path)
    assert run_stage(Recording(needed=False), ctx, Models()) is None
    assert not (tmp_path / "reduce").exists()
    stage = Recording(needed=True)
    record = run_stage(stage, ctx, Models())
    assert stage.runs == 1 and record["score_best"] == 0.75
    assert json.loads((tmp_path / "reduce" / "result.json").read_text()) == record
    again = Recording(needed=True)  # a rerun in the same folder: done, restored, not run
    assert run_stage(again, ctx, Models()) == record
    assert again.runs == 0 and again.restored == record
    assert ctx.wants("reduce") and ctx.wants("quantize") and not ctx.wants("export")


def test_cluster_environment_is_named_without_private_attributes():
    import lightning as L

    from xtc_lightning.trainer import cluster_environment_name

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert (
        cluster_environment_name(trainer) == type(trainer._accelerator_connector.cluster_environment).__name__
    )
    assert cluster_environment_name(trainer) in ("LightningEnvironment", "SLURMEnvironment")

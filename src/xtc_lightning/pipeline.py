"""Stage orchestration: teacher -> (reduce) -> (quantize), and ``results.json``.

Every stage is one ``Trainer.fit`` followed by an evaluation of its best-on-dev
checkpoint. A stage writes into ``<run dir>/<stage>/``: checkpoints, logs and
``predictions_<split>.tsv``. The fine-tuned teacher is cached under
``paths.cache_dir`` keyed by everything that shaped it, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from xtc_lightning.callbacks import PlainProgress, want_progress_bar
from xtc_lightning.data import GlueDataModule
from xtc_lightning.errors import UserError
from xtc_lightning.models import check_model_source, count_parameters, load_classifier, load_tokenizer
from xtc_lightning.modules import ClassifierModule, GlueModule
from xtc_lightning.tasks import GlueTask, get_task

log = logging.getLogger("xtc_lightning")

STAGES = ("teacher",)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_predictions(task: GlueTask, predictions: dict, folder: Path) -> dict[str, str]:
    """``predictions_<split>.tsv``: row index, prediction, gold label (class ids or scores)."""
    paths = {}
    for split, (index, preds, labels) in predictions.items():
        path = folder / f"predictions_{split}.tsv"
        with open(path, "w") as f:
            f.write("index\tprediction\tlabel\n")
            for i, p, y in zip(index.tolist(), preds.tolist(), labels.tolist(), strict=True):
                if task.is_regression:
                    f.write(f"{i}\t{p!r}\t{y!r}\n")
                else:
                    f.write(f"{i}\t{int(p)}\t{int(y)}\n")
        paths[split] = str(path)
    return paths


def make_trainer(
    cfg: DictConfig, stage: str, stage_dir: Path, max_epochs: int
) -> tuple[L.Trainer, ModelCheckpoint]:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_epochs"] = max_epochs
    bar = want_progress_bar(cfg.progress)
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir / "checkpoints",
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor="val/score",
        mode="max",
        save_last=True,
    )
    callbacks = [checkpoint]
    if not bar:
        callbacks.append(PlainProgress(stage, trainer_kwargs.get("log_every_n_steps") or 50))
    loggers = [
        hydra.utils.instantiate(lg, version=stage) for lg in (cfg.logger or {}).values() if lg is not None
    ]
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            default_root_dir=str(stage_dir),
            callbacks=callbacks,
            logger=loggers or False,
            enable_progress_bar=bar,
            enable_model_summary=bar,
        )
    except (MisconfigurationException, ValueError) as err:
        hardware = ", ".join(f"{k}={trainer_kwargs.get(k)}" for k in ("accelerator", "devices", "precision"))
        raise UserError(f"trainer settings ({hardware}) cannot run here: {err}") from None
    return trainer, checkpoint


def fit_and_evaluate(
    cfg: DictConfig,
    stage: str,
    module: GlueModule,
    datamodule: GlueDataModule,
    run_dir: Path,
    max_epochs: int,
) -> dict:
    """Train one stage, then evaluate its best-on-dev checkpoint; return the stage's results."""
    stage_dir = run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, checkpoint = make_trainer(cfg, stage, stage_dir, max_epochs)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_time = time.perf_counter() - t0
    last = module.last_val
    best_path = checkpoint.best_model_path
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    # Re-evaluate the selected weights: gives the reported metrics and the predictions files.
    trainer.validate(module, datamodule=datamodule, verbose=False)
    best = module.last_val
    return {
        "stage": stage,
        "metrics_best": best["splits"],
        "score_best": best["score"],
        "metrics_last_epoch": last.get("splits"),
        "score_last_epoch": last.get("score"),
        "selected": "best val/score checkpoint" if best_path else "final weights (no checkpoint was saved)",
        "checkpoints": {"best": best_path or None, "last": checkpoint.last_model_path or None},
        "predictions": write_predictions(module.task, module.last_predictions, stage_dir),
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


def teacher_cache_key(cfg: DictConfig, train_fingerprint: str) -> str:
    """Everything that shapes a fine-tuned teacher; a change in any of it trains a new one."""
    shaping = {
        "task": cfg.task.name,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: cfg.data[k] for k in ("max_length", "batch_size")},
        "train": train_fingerprint,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "teacher": {k: cfg.teacher[k] for k in ("max_epochs", "lr")},
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def teacher_stage(
    cfg: DictConfig, task: GlueTask, datamodule: GlueDataModule, run_dir: Path, tokenizer
) -> dict:
    """Fine-tune the teacher, or reuse the cached one trained with the same settings."""
    stage_dir = run_dir / "teacher"
    key = teacher_cache_key(cfg, datamodule.train_fingerprint)
    cache = Path(cfg.paths.cache_dir).resolve() / "teachers" / f"{task.name}-{key}"
    if (cache / "result.json").is_file():
        log.info("teacher: reusing the cached fine-tuned teacher %s", cache)
        result = json.loads((cache / "result.json").read_text())
        stage_dir.mkdir(parents=True, exist_ok=True)
        result["predictions"] = {
            split: str(shutil.copy(cache / f"predictions_{split}.tsv", stage_dir))
            for split in task.dev_splits
        }
        result["cached"] = True
        return result
    model = load_classifier(cfg.model, task)
    module = ClassifierModule(model, task.name, OmegaConf.to_container(cfg.optim), cfg.teacher.lr)
    result = fit_and_evaluate(cfg, "teacher", module, datamodule, run_dir, cfg.teacher.max_epochs)
    result["params"] = count_parameters(model)
    result["num_layers"] = model.config.num_hidden_layers
    result["bits"] = {"weights": 32, "activations": 32}
    # Publish the best teacher into the cache atomically: build in a temp folder, then rename.
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    for split, path in result["predictions"].items():
        shutil.copy(path, tmp / f"predictions_{split}.tsv")
    result["model_dir"] = str(cache / "model")
    write_json_atomic(tmp / "result.json", result)
    try:
        os.replace(tmp, cache)
    except OSError:  # another run published the same teacher first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    result["cached"] = False
    return result


def quiet_library_logs() -> None:
    """Lightning adds its own console handler; Hydra's handlers already print (and file) its records."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    transformers_logging.set_verbosity_error()  # load reports of the new classifier head, etc.


def run(cfg: DictConfig) -> dict:
    """Run the pipeline up to ``cfg.stage``; write and return ``results.json``."""
    quiet_library_logs()
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}'; choose one of: {', '.join(STAGES)}")
    task = get_task(cfg.task.name)
    run_dir = Path(cfg.paths.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    check_model_source(cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = GlueDataModule(
        task,
        tokenizer,
        glue_dir=cfg.data.dir,
        hub_dataset=cfg.data.hub_dataset,
        max_length=cfg.data.max_length,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        max_train_examples=cfg.data.max_train_examples,
        num_workers=cfg.data.num_workers,
        cache_dir=str(Path(cfg.paths.cache_dir) / "tokenized"),
        seed=cfg.seed,
    )
    datamodule.setup("fit")  # read and tokenize now: data errors surface before any training

    OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)
    results = {
        "task": task.name,
        "stage": cfg.stage,
        "run_dir": str(run_dir),
        "data": {
            "train_examples": len(datamodule.train_set),
            **{f"{s}_examples": len(d) for s, d in datamodule.dev_sets.items()},
        },
        "stages": {},
    }
    t0 = time.perf_counter()
    results["stages"]["teacher"] = teacher_stage(cfg, task, datamodule, run_dir, tokenizer)
    final = results["stages"][cfg.stage]
    results["metrics"] = final["metrics_best"]
    results["score"] = final["score_best"]
    results["predictions"] = {
        split: str(shutil.copy(path, run_dir / f"predictions_{split}.tsv"))
        for split, path in final["predictions"].items()
    }
    results["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(run_dir / "results.json", results)
    log.info("results: %s", run_dir / "results.json")
    return results

"""Stage orchestration: teacher -> (reduce) -> (quantize) -> export, and ``results.json``.

Every stage is one ``Trainer.fit`` followed by an evaluation of its best-on-dev
checkpoint. A stage writes into ``<run dir>/<stage>/``: checkpoints, logs,
``predictions_<split>.tsv`` and, once finished, ``result.json`` (see ``resume``: a rerun in
the same folder skips finished stages and continues an interrupted one). The fine-tuned
teacher and the reduced student are cached under ``paths.cache_dir`` keyed by everything that
shaped them, and reused by later runs. Under DDP every rank runs this; rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from xtc_lightning.augment import AugmentConfig, augment_train_set, check_masked_lm
from xtc_lightning.callbacks import (
    FiniteLoss,
    LastCheckpoint,
    PlainProgress,
    RngState,
    StageProgressBar,
    StageSummary,
    want_progress_bar,
)
from xtc_lightning.config import STAGES, check_config, stage_seed
from xtc_lightning.data import GlueDataModule
from xtc_lightning.distill import check_distill_config, enable_attention_scores
from xtc_lightning.distributed import barrier, finish, is_rank_zero
from xtc_lightning.errors import UserError
from xtc_lightning.export import SizeReport, export_run
from xtc_lightning.export.format import STORED_DTYPES
from xtc_lightning.export.run import EXPORT_DIR
from xtc_lightning.finite import check_finite_weights, first_nonfinite
from xtc_lightning.io import atomic_folder, atomic_path, write_text_atomic
from xtc_lightning.loggers import stage_loggers, wandb_run
from xtc_lightning.models import (
    check_model_source,
    count_parameters,
    load_classifier,
    load_tokenizer,
    num_layers_of,
)
from xtc_lightning.modules import ClassifierModule, DistillModule, GlueModule
from xtc_lightning.predictions import write_predictions_tsv
from xtc_lightning.quant import QuantConfig, apply_quantization, quantization_summary
from xtc_lightning.recipe import Recipe
from xtc_lightning.resume import (
    CONFIG_FILE,
    check_resume,
    finished_stage,
    resume_checkpoint,
    stage_record_path,
)
from xtc_lightning.runfolder import lock_run_folder, save_hydra_files, start_log_files
from xtc_lightning.slim import WEIGHTS_NAME, drop_resume_state, save_weights
from xtc_lightning.student import build_student, layers_from_config
from xtc_lightning.tasks import GlueTask, get_task

log = logging.getLogger("xtc_lightning")

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# Trainer settings that change what is logged, not what is learned.
NOT_SHAPING = {"log_every_n_steps", "num_sanity_val_steps"}


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as JSON (temp file, rename); a NaN or inf anywhere in it is a one-line error."""
    bad = first_nonfinite(data)
    if bad is not None:
        raise UserError(f"{path}: '{bad}' is not finite; nothing non-finite is recorded as a result")
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_predictions(task: GlueTask, predictions: dict, folder: Path) -> dict[str, str]:
    """``predictions_<split>.tsv`` (``predictions.write_predictions_tsv``) of (index, prediction, label, probs).

    Written by rank 0; every rank returns the paths."""
    paths = {}
    for split, rows in predictions.items():
        path = folder / f"predictions_{split}.tsv"
        paths[split] = str(path)
        if is_rank_zero():
            write_predictions_tsv(path, task, *rows)
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
    )
    last = LastCheckpoint(stage_dir / "checkpoints", cfg.checkpoint.every_n_train_steps)
    callbacks = [FiniteLoss(stage), checkpoint, last, RngState(), StageSummary(stage)]
    if bar:
        callbacks.append(StageProgressBar())
    else:
        callbacks.append(PlainProgress(stage, trainer_kwargs.get("log_every_n_steps") or 50))
    loggers = stage_loggers(cfg, stage, stage_dir.parent)
    if loggers:  # the learning rate of every step, beside the losses (CSV: lr-AdamW)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            default_root_dir=str(stage_dir),
            callbacks=callbacks,
            logger=loggers or False,
            enable_progress_bar=bar,
            enable_model_summary=False,  # StageSummary
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
    score_at_start: bool = False,
) -> dict:
    """Train one stage, then evaluate its best-on-dev checkpoint; return the stage's results.

    ``score_at_start``: also evaluate the model before its first step (the quantize stage: the
    dev score right after quantization, where the low-bit recipes differ most); kept in
    ``<stage>/start.json`` so a resumed stage reports it too."""
    stage_dir = run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, checkpoint = make_trainer(cfg, stage, stage_dir, max_epochs)
    t0 = time.perf_counter()
    ckpt_path = resume_checkpoint(stage_dir)  # only there when resuming (see resume.check_resume)
    if ckpt_path is not None:
        log.info("%s: resuming from %s", stage, ckpt_path)
    start, start_score = stage_dir / "start.json", None
    if score_at_start and start.is_file():
        start_score = json.loads(start.read_text())["score"]
    elif score_at_start:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        start_score = module.last_val["score"]
        if is_rank_zero():
            write_json_atomic(start, {"score": start_score, "metrics": module.last_val["splits"]})
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - t0
    last = module.last_val
    best_path = checkpoint.best_model_path
    if is_rank_zero():  # consumed: Lightning would load them by itself in validate() under Slurm
        for hpc in stage_dir.glob("hpc_ckpt_*.ckpt"):
            hpc.unlink()
    barrier()
    # Re-evaluate the selected weights (the final ones when no checkpoint was saved): gives the
    # reported metrics and the predictions files.
    trainer.validate(
        module, datamodule=datamodule, verbose=False, ckpt_path=best_path or None, weights_only=True
    )
    best = module.last_val
    return {
        "stage": stage,
        "metrics_best": best["splits"],
        "score_best": best["score"],
        "metrics_last_epoch": last.get("splits"),
        "score_last_epoch": last.get("score"),
        "selected": "best val/score checkpoint" if best_path else "final weights (no checkpoint was saved)",
        # the file is deleted once the stage is finished (slim.drop_resume_state); the weights stay
        "selected_checkpoint": Path(best_path).name if best_path else None,
        "steps": trainer.global_step,
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "world_size": trainer.world_size,
        # where ranks (and Slurm's requeue handler) come from; one-device strategies do not expose it
        "cluster_environment": type(trainer._accelerator_connector.cluster_environment).__name__,
        "predictions": write_predictions(module.task, module.last_predictions, stage_dir),
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        **({"score_at_start": start_score} if score_at_start else {}),
    }


def stage_optim(cfg: DictConfig, stage: str) -> dict:
    """The optimizer settings of a distillation stage: ``optim``, with the quantize stage's own
    warm-up (``quantize.warmup_epochs``)."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    return {**optim, "warmup_epochs": cfg.quantize.warmup_epochs} if stage == "quantize" else optim


def shaping_key(cfg: DictConfig, train_fingerprint: str, **stage: object) -> str:
    """Hash of everything that shapes a stage's model; a change in any of it trains a new one."""
    shaping = {
        "task": cfg.task.name,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: cfg.data[k] for k in ("max_length", "batch_size")},
        "train": train_fingerprint,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "trainer": {
            k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in NOT_SHAPING
        },
        "seed": cfg.seed,
        **stage,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def from_cache(cache: Path, stage: str, stage_dir: Path, splits: tuple[str, ...]) -> dict | None:
    """The cached result of a stage (predictions copied into this run), or None."""
    if not (cache / "result.json").is_file():
        return None
    log.info("%s: reusing the cached model %s", stage, cache)
    result = json.loads((cache / "result.json").read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    result["predictions"] = {split: str(stage_dir / f"predictions_{split}.tsv") for split in splits}
    if is_rank_zero():
        for split in splits:
            shutil.copy(cache / f"predictions_{split}.tsv", stage_dir)
    result["cached"] = True
    return result


def publish_to_cache(cache: Path, result: dict, model, tokenizer) -> dict:
    """Store a stage's best model (HF folder), predictions and result atomically: temp folder, rename.

    Rank 0 publishes; the other ranks wait for it, then all load the same published model."""
    check_finite_weights(model, f"{result['stage']} (before caching it)")
    result["model_dir"] = str(cache / "model")
    if is_rank_zero():
        with atomic_folder(cache, keep_existing=True) as tmp:  # another run's published model wins
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            for split, path in result["predictions"].items():
                shutil.copy(path, tmp / f"predictions_{split}.tsv")
            write_json_atomic(tmp / "result.json", result)
    barrier()
    result["cached"] = False
    return result


def seed_stage(cfg: DictConfig, stage: str, seed: int | None = None) -> None:
    """Seed every generator from ``seed`` (default: the run's) and the stage name, before the stage
    draws anything."""
    L.seed_everything(stage_seed(cfg.seed if seed is None else seed, stage), workers=True, verbose=False)


def record_stage(run_dir: Path, result: dict) -> dict:
    """``<stage>/result.json``: the stage is finished in this run folder (rank 0 writes)."""
    if is_rank_zero():
        path = stage_record_path(run_dir, result["stage"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        freed = drop_resume_state(path.parent)  # finished: nothing resumes from them any more
        if freed:
            log.info("%s: finished, deleted %.0f MB of resume checkpoints", result["stage"], freed / 1e6)
    return result


def teacher_stage(
    cfg: DictConfig, task: GlueTask, datamodule: GlueDataModule, run_dir: Path, tokenizer
) -> dict:
    """Fine-tune the teacher, or reuse the cached one trained with the same settings."""
    if (done := finished_stage(run_dir, "teacher")) is not None:
        return done
    return record_stage(run_dir, _teacher(cfg, task, datamodule, run_dir, tokenizer))


def _teacher(cfg: DictConfig, task: GlueTask, datamodule: GlueDataModule, run_dir: Path, tokenizer) -> dict:
    if cfg.teacher.checkpoint:
        return given_teacher(cfg, task, datamodule, run_dir)
    key = shaping_key(
        cfg, datamodule.train_fingerprint, teacher={k: cfg.teacher[k] for k in ("max_epochs", "lr")}
    )
    cache = Path(cfg.paths.cache_dir).resolve() / "teachers" / f"{task.name}-{key}"
    cached = from_cache(cache, "teacher", run_dir / "teacher", task.dev_splits)
    if cached is not None:
        return cached
    seed_stage(cfg, "teacher")
    model = load_classifier(cfg.model, task)
    module = ClassifierModule(model, task.name, OmegaConf.to_container(cfg.optim), cfg.teacher.lr)
    result = fit_and_evaluate(cfg, "teacher", module, datamodule, run_dir, cfg.teacher.max_epochs)
    result["params"] = count_parameters(model)
    result["num_layers"] = num_layers_of(model.config)
    result["bits"] = {"weights": 32, "activations": 32}
    return publish_to_cache(cache, result, model, tokenizer)


def given_teacher(cfg: DictConfig, task: GlueTask, datamodule: GlueDataModule, run_dir: Path) -> dict:
    """``teacher.checkpoint``: an already fine-tuned HF folder; only evaluated."""
    check_model_source(cfg.teacher.checkpoint)
    model = load_classifier(cfg.model, task, name_or_path=cfg.teacher.checkpoint)
    module = ClassifierModule(model, task.name, OmegaConf.to_container(cfg.optim), cfg.teacher.lr)
    stage_dir = run_dir / "teacher"
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, _ = make_trainer(cfg, "teacher", stage_dir, max_epochs=1)
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {
        "stage": "teacher",
        "metrics_best": module.last_val["splits"],
        "score_best": module.last_val["score"],
        "selected": "given checkpoint (not trained here)",
        "predictions": write_predictions(task, module.last_predictions, stage_dir),
        "params": count_parameters(model),
        "num_layers": num_layers_of(model.config),
        "bits": {"weights": 32, "activations": 32},
        "model_dir": str(Path(cfg.teacher.checkpoint).resolve()),
        "cached": False,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


def student_stage(
    cfg: DictConfig,
    stage: str,
    task: GlueTask,
    datamodule: GlueDataModule,
    run_dir: Path,
    teacher,
    student,
    layers: list[int],
    quant: QuantConfig | None,
    recipe: Recipe | None = None,
) -> dict:
    """Distil ``student`` from ``teacher`` (step 1: reduce, fp32; step 2: quantize with ``recipe``)."""
    module = DistillModule(
        teacher,
        student,
        task.name,
        layers,
        OmegaConf.to_container(cfg.distill, resolve=True),
        stage_optim(cfg, stage),
        cfg[stage].lr,
        quant,
        recipe,
    )
    result = fit_and_evaluate(
        cfg, stage, module, datamodule, run_dir, cfg[stage].max_epochs, score_at_start=quant is not None
    )
    result["train_examples"] = len(datamodule.train_set)
    result["params"] = count_parameters(student)
    result["num_layers"] = len(layers)
    result["layers"] = layers
    if quant is None:
        result["bits"] = {"weights": 32, "activations": 32}
    else:
        summary = quantization_summary(student)
        result["bits"] = {
            "weights": quant.weight.bits,
            "activations": quant.activation.bits,
            "name": quant.name,
        }
        if quant.mixed:
            result["bits"]["weights_by_target"] = {r: s.bits for r, s in quant.weight_by_target}
        result["params_by_bits"] = {str(k): v for k, v in summary.params_by_bits.items()}
        weights = run_dir / stage / WEIGHTS_NAME  # the selected student, what xtc-export reads
        result["weights"] = save_weights(student, weights) if is_rank_zero() else str(weights)
    return result


def reduce_stage(
    cfg: DictConfig,
    task: GlueTask,
    datamodule: GlueDataModule,
    run_dir: Path,
    tokenizer,
    teacher,
    teacher_result: dict,
    layers: list[int],
) -> tuple[dict, object]:
    """Step 1: the layer-reduced student distilled in full precision (cached like the teacher)."""
    done = finished_stage(run_dir, "reduce")
    if done is not None:
        student = enable_attention_scores(load_classifier(cfg.model, task, name_or_path=done["model_dir"]))
        return done, student
    key = shaping_key(
        cfg,
        datamodule.train_fingerprint,
        from_teacher=teacher_result["model_dir"],
        layers=layers,
        distill=OmegaConf.to_container(cfg.distill, resolve=True),
        reduce={k: cfg.reduce[k] for k in ("max_epochs", "lr")},
    )
    cache = Path(cfg.paths.cache_dir).resolve() / "reduced" / f"{task.name}-{key}"
    cached = from_cache(cache, "reduce", run_dir / "reduce", task.dev_splits)
    if cached is not None:
        student = enable_attention_scores(load_classifier(cfg.model, task, name_or_path=cached["model_dir"]))
        return record_stage(run_dir, cached), student
    seed_stage(cfg, "reduce")
    student = build_student(teacher, layers)
    result = student_stage(cfg, "reduce", task, datamodule, run_dir, teacher, student, layers, None)
    return record_stage(run_dir, publish_to_cache(cache, result, student, tokenizer)), student


def quiet_library_logs() -> None:
    """Lightning adds its own console handler (and stops propagation when it is imported before
    logging is configured); Hydra's handlers already print (and file) its records."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()  # an advertisement, not information
    )
    transformers_logging.set_verbosity_error()  # load reports of the new classifier head, etc.
    transformers_logging.disable_progress_bar()
    # The distillation teacher is in eval mode on purpose; Lightning warns about it.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
    # Our training sampler resumes mid-epoch by itself (data.EpochShuffleSampler); Lightning cannot tell.
    warnings.filterwarnings(
        "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended"
    )


def stage_table(results: dict) -> str:
    """The stages as a plain-text table for the console."""
    rows = [("stage", "layers", "W/A bits", "params", "dev score (best)", "last epoch", "time")]
    for name, r in results["stages"].items():
        bits = r.get("bits", {})
        last = r.get("score_last_epoch")
        rows.append(
            (
                name,
                str(r.get("num_layers", "")),
                f"{bits.get('weights', '')}/{bits.get('activations', '')}",
                f"{r['params']['total'] / 1e6:.2f}M",
                f"{100 * r['score_best']:.2f}",
                "" if last is None else f"{100 * last:.2f}",
                "cached" if r.get("cached") else f"{r['wall_time_s']:.0f}s",
            )
        )
    export = results.get("export")
    if export and "score" in (export.get("dev") or {}):
        last_stage = results["stages"][results["final_stage"]]
        bits = last_stage.get("bits", {})
        rows.append(
            (
                "packed",
                str(last_stage.get("num_layers", "")),
                f"{bits.get('weights', '')}/{bits.get('activations', '')}",
                f"{export['size']['file_bytes'] / 2**20:.2f}MiB",
                f"{100 * export['dev']['score']:.2f}",
                "",
                "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def check_scale_config(cfg: DictConfig) -> None:
    """Precision, checkpoint interval and the data-parallel launch, checked before any work."""
    if cfg.trainer.precision not in PRECISIONS:
        raise UserError(
            f"trainer.precision '{cfg.trainer.precision}' is not accepted; choose one of: {', '.join(PRECISIONS)}"
        )
    every = cfg.checkpoint.every_n_train_steps
    if every is not None and (not isinstance(every, int) or every < 1):
        raise UserError(f"checkpoint.every_n_train_steps must be a positive integer or null, not {every!r}")
    launched_outside = any(v in os.environ for v in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))
    spawns = str(cfg.trainer.get("strategy", "auto")).startswith("ddp") and not launched_outside
    if spawns and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(
            "a ddp trainer cannot start its processes inside a local multirun (-m); "
            "run the sweep through hydra/launcher=slurm, or one run per command"
        )


def run_limits(cfg: DictConfig) -> dict:
    """The trainer settings that cut a run short (``fast_dev_run``, ``limit_*_batches``): a run with
    any of them is ``limited`` and its scores are not results (``xtc-report`` skips it)."""
    limits = {}
    for key, value in cfg.trainer.items():
        whole = value is None or (isinstance(value, float) and value == 1.0)  # int 1 is one batch
        if (key == "fast_dev_run" and value) or (key.startswith("limit_") and not whole):
            limits[key] = value
    return limits


def count_rows(tsv: str | Path) -> int:
    """Data rows of a predictions file (its header excluded)."""
    with open(tsv) as f:
        return sum(1 for _ in f) - 1


def run(cfg: DictConfig) -> dict:
    """Run the pipeline up to ``cfg.stage``; write and return ``results.json``.

    In a run folder that already holds finished stages or checkpoints, continue that run
    (``resume``)."""
    quiet_library_logs()
    check_config(cfg)
    task = get_task(cfg.task.name)
    # Validate every group before any work: a bad value fails in one line, nothing written.
    quant = QuantConfig.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
    recipe = Recipe.from_dict(
        OmegaConf.to_container(cfg.recipe, resolve=True), quant, cfg.quantize.max_epochs
    )
    check_distill_config(OmegaConf.to_container(cfg.distill, resolve=True))
    check_model_source(cfg.model.name_or_path)
    augment = AugmentConfig.from_dict(OmegaConf.to_container(cfg.augment, resolve=True))
    if augment.method == "mlm" and augment.applies_to(task.name) and cfg.stage != "teacher":
        check_masked_lm(augment.mlm_model)  # now, not after an hour of teacher training
    if cfg.export.other_dtype not in STORED_DTYPES:
        raise UserError(
            f"export.other_dtype '{cfg.export.other_dtype}' is not accepted; choose one of: {', '.join(STORED_DTYPES)}"
        )
    check_scale_config(cfg)
    run_dir = Path(cfg.paths.output_dir).resolve()
    if is_rank_zero():
        lock_run_folder(run_dir)  # one writer per run folder, for the rest of this process
    resuming = check_resume(cfg, run_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

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

    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / CONFIG_FILE) as tmp:  # other ranks may read it (resume check)
            OmegaConf.save(cfg, tmp, resolve=True)
        save_hydra_files(run_dir, cfg)
    start_log_files()
    if resuming:
        log.info("resuming the run in %s", run_dir)
    with wandb_run(cfg, run_dir) as record_in_wandb:
        results = run_stages(cfg, task, quant, recipe, augment, datamodule, tokenizer, run_dir)
        record_in_wandb(results)
    if is_rank_zero():
        log.info("stages:\n%s", stage_table(results))
        log.info("results: %s", run_dir / "results.json")
    return results


def run_stages(
    cfg: DictConfig,
    task: GlueTask,
    quant: QuantConfig,
    recipe: Recipe,
    augment: AugmentConfig,
    datamodule: GlueDataModule,
    tokenizer,
    run_dir: Path,
) -> dict:
    dev_counts = {f"{s}_examples": len(d) for s, d in datamodule.dev_sets.items()}
    limits = run_limits(cfg)
    results = {
        "task": task.name,
        "stage": cfg.stage,
        "run_dir": str(run_dir),
        "limited": bool(limits),  # debug / limit_* runs: xtc-report skips them
        "limits": limits,
        "data": {"train_examples": len(datamodule.train_set), **dev_counts},
        "augment": None,  # the distillation stages' augmented training set, when there is one
        "stages": {},
    }
    t0 = time.perf_counter()
    results["stages"]["teacher"] = teacher_result = teacher_stage(cfg, task, datamodule, run_dir, tokenizer)
    wanted = STAGES.index(cfg.stage)
    if wanted >= 1:
        teacher = load_classifier(cfg.model, task, name_or_path=teacher_result["model_dir"])
        n_teacher = num_layers_of(teacher.config)
        layers = layers_from_config(OmegaConf.to_container(cfg.student, resolve=True), n_teacher)
        enable_attention_scores(teacher)  # the attention loss compares pre-softmax scores
        student = build_student(teacher, layers)  # also the start of quantize when nothing is cut
        if len(layers) < n_teacher or (wanted >= 2 and quant.enabled):  # a distillation stage runs
            bar = want_progress_bar(cfg.progress)
            cache_dir = Path(cfg.paths.cache_dir).resolve()
            results["augment"] = augment_train_set(
                augment, task, datamodule, teacher, tokenizer, cache_dir, bar
            )
        if len(layers) < n_teacher:
            results["stages"]["reduce"], student = reduce_stage(
                cfg, task, datamodule, run_dir, tokenizer, teacher, teacher_result, layers
            )
        if wanted >= 2 and quant.enabled:
            done = finished_stage(run_dir, "quantize")
            if done is None:
                seed_stage(cfg, "quantize", cfg.quantize.seed)
                datamodule.seed = cfg.quantize.seed  # its data order too
                apply_quantization(student, quant)
                log.info("quantized modules:\n%s", quantization_summary(student).text)
                done = record_stage(
                    run_dir,
                    student_stage(
                        cfg, "quantize", task, datamodule, run_dir, teacher, student, layers, quant, recipe
                    ),
                )
            results["stages"]["quantize"] = done
    final_name = list(results["stages"])[-1]
    final = results["stages"][final_name]
    results["final_stage"] = final_name
    results["metrics"] = final["metrics_best"]
    results["score"] = final["score_best"]
    results["predictions"] = {
        split: str(run_dir / f"predictions_{split}.tsv") for split in final["predictions"]
    }
    results["wall_time_s"] = round(time.perf_counter() - t0, 2)
    finish()  # training is over on every rank; what follows is rank 0's alone
    if not is_rank_zero():  # the files below are rank 0's; the other ranks are done
        return results
    for split, path in final["predictions"].items():
        shutil.copy(path, results["predictions"][split])
    # the dev rows the score covers (fewer than *_examples in a limited run)
    results["data"]["dev_scored"] = {s: count_rows(p) for s, p in results["predictions"].items()}
    write_json_atomic(run_dir / "results.json", results)
    if wanted >= STAGES.index("export"):
        export_json = run_dir / EXPORT_DIR / "export.json"
        if export_json.is_file() and (run_dir / EXPORT_DIR / "model.safetensors").is_file():
            results["export"] = json.loads(export_json.read_text())  # exported before an interruption
        else:
            results["export"] = export_run(
                run_dir,
                other_dtype=cfg.export.other_dtype,
                hf=cfg.export.hf,
                hf_dequantized=cfg.export.hf_dequantized,
                evaluate=cfg.export.evaluate,
            )
        results["wall_time_s"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(run_dir / "results.json", results)
        log.info(
            "packed export %s:\n%s",
            results["export"]["packed"],
            SizeReport.from_dict(results["export"]["size"]).text(),
        )
    return results

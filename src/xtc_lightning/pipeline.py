"""Orchestration of one run: check, set up, then the stages teacher -> (reduce) -> (quantize) -> export.

``run`` checks every config group before any work, locks (or resumes) the run folder, reads the
data, then runs the stages of ``stages.py`` in order, each the same way (``stages.run_stage``:
needed? done? run, record), and writes ``results.json`` (``results.RunResult``). A stage writes
into ``<run dir>/<stage>/``: checkpoints, logs, ``predictions_<split>.tsv`` and, once finished,
``result.json`` (see ``resume``: a rerun in the same folder skips finished stages and continues an
interrupted one). The fine-tuned teacher and the reduced student are cached (``cache.py``). Under
DDP every rank runs this; rank 0 writes.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from xtc_lightning.augment import augment_train_set
from xtc_lightning.callbacks import want_progress_bar
from xtc_lightning.config import run_config
from xtc_lightning.data import GlueDataModule
from xtc_lightning.distill import enable_attention_scores
from xtc_lightning.distributed import finish, is_rank_zero
from xtc_lightning.export import SizeReport
from xtc_lightning.io import atomic_path
from xtc_lightning.loggers import wandb_run
from xtc_lightning.models import load_classifier, load_tokenizer, num_layers_of
from xtc_lightning.results import RunResult, count_rows, stage_table
from xtc_lightning.resume import CONFIG_FILE, check_resume
from xtc_lightning.runfolder import lock_run_folder, save_hydra_files, start_log_files
from xtc_lightning.stages import (
    ExportStage,
    Models,
    QuantizeStage,
    ReduceStage,
    RunContext,
    TeacherStage,
    run_stage,
)
from xtc_lightning.student import build_student
from xtc_lightning.tasks import TASKS

log = logging.getLogger("xtc_lightning")


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


def run(cfg: DictConfig) -> dict:
    """Run the pipeline up to ``cfg.stage``; write and return ``results.json``.

    ``cfg`` is read into the typed ``RunConfig`` first (``config.run_config``: every value checked,
    nothing written); nothing below this function sees the ``DictConfig``. In a run folder that
    already holds finished stages or checkpoints, continue that run (``resume``)."""
    quiet_library_logs()
    config = run_config(cfg)
    run_dir = config.output_dir
    if is_rank_zero():
        lock_run_folder(run_dir)  # one writer per run folder, for the rest of this process
    resuming = check_resume(config.resume, config.resolved, run_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)

    tokenizer = load_tokenizer(config.model)
    data = config.data
    datamodule = GlueDataModule(
        config.task,
        tokenizer,
        glue_dir=data.dir,
        hub_dataset=data.hub_dataset,
        max_length=data.max_length,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        max_train_examples=data.max_train_examples,
        num_workers=data.num_workers,
        cache_dir=str(config.cache_dir / "tokenized"),
        seed=config.seed,
    )
    datamodule.setup("fit")  # read and tokenize now: data errors surface before any training
    aug = config.augment
    transfer_source = None  # the transfer set's source, read with the task's data
    if aug.method == "transfer" and aug.applies_to(config.task.name) and config.stage != "teacher":
        transfer_source = datamodule.read("train", TASKS[aug.source])

    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / CONFIG_FILE) as tmp:  # other ranks may read it (resume check)
            OmegaConf.save(cfg, tmp, resolve=True)
        save_hydra_files(run_dir, cfg)
    start_log_files()
    if resuming:
        log.info("resuming the run in %s", run_dir)
    with wandb_run(config.loggers, config.resolved, run_dir) as record_in_wandb:
        results = run_stages(RunContext(config, datamodule, tokenizer, run_dir, transfer_source))
        record_in_wandb(results)
    if is_rank_zero():
        log.info("stages:\n%s", stage_table(results))
        log.info("results: %s", run_dir / "results.json")
    return results


def run_stages(ctx: RunContext) -> dict:
    """The stages up to the run's ``stage``, each needed? done? run, record; ``results.json`` after the
    training stages and again after the export. Returns what ``results.json`` holds."""
    config, run_dir, datamodule = ctx.config, ctx.run_dir, ctx.datamodule
    dev_counts = {f"{s}_examples": len(d) for s, d in datamodule.dev_sets.items()}
    limits = config.trainer.limits()
    results = RunResult(
        task=config.task.name,
        stage=config.stage,
        run_dir=str(run_dir),
        limited=bool(limits),  # debug / limit_* runs: xtc-report skips them
        limits=limits,
        data={"train_examples": len(datamodule.train_set), **dev_counts},
        augment=None,  # the distillation stages' augmented training set, when there is one
    )
    t0 = time.perf_counter()
    models = Models()
    results.stages["teacher"] = teacher = run_stage(TeacherStage(), ctx, models)
    if ctx.wants("reduce"):
        prepare_distillation(ctx, models, teacher["model_dir"], results)
        for stage in (ReduceStage(), QuantizeStage()):
            record = run_stage(stage, ctx, models)
            if record is not None:
                results.stages[stage.name] = record
    final_name = list(results.stages)[-1]
    final = results.stages[final_name]
    results.final_stage = final_name
    results.metrics = final["metrics_best"]
    results.score = final["score_best"]
    results.predictions = {split: str(run_dir / f"predictions_{split}.tsv") for split in final["predictions"]}
    results.wall_time_s = round(time.perf_counter() - t0, 2)
    finish()  # training is over on every rank; what follows is rank 0's alone
    if not is_rank_zero():  # the files below are rank 0's; the other ranks are done
        return results.to_dict()
    for split, path in final["predictions"].items():
        shutil.copy(path, results.predictions[split])
    # the dev rows the score covers (fewer than *_examples in a limited run)
    results.data["dev_scored"] = {s: count_rows(p) for s, p in results.predictions.items()}
    results.write(run_dir)
    export = run_stage(ExportStage(results.to_dict()), ctx, models)
    if export is not None:
        results.export = export
        results.wall_time_s = round(time.perf_counter() - t0, 2)
        results.write(run_dir)
        log.info("packed export %s:\n%s", export["packed"], SizeReport.from_dict(export["size"]).text())
    return results.to_dict()


def prepare_distillation(ctx: RunContext, models: Models, teacher_dir: str, results: RunResult) -> None:
    """The teacher (attention scores on), the student's layers, the student (the start of quantize
    when nothing is cut) and, when a distillation stage runs, the augmented training set."""
    config = ctx.config
    teacher = load_classifier(config.model, config.task, name_or_path=teacher_dir)
    models.teacher_dir = teacher_dir
    models.layers = config.student.select(num_layers_of(teacher.config))
    models.teacher = enable_attention_scores(teacher)  # the attention loss compares pre-softmax scores
    models.student = build_student(teacher, models.layers)
    if models.drops_layers or QuantizeStage().needed(ctx, models):  # a distillation stage runs
        bar = want_progress_bar(config.progress)
        results.augment = augment_train_set(
            config.augment,
            config.task,
            ctx.datamodule,
            teacher,
            ctx.tokenizer,
            config.cache_dir,
            bar,
            ctx.transfer_source,
        )

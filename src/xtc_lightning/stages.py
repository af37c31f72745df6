"""The stages of a run: teacher -> reduce -> quantize -> export, each with the same shape.

A stage answers four questions (``Stage``): is it ``needed`` in this run, is it ``done`` (its
recorded result in the run folder: ``<stage>/result.json``, ``export/export.json``), ``run`` it,
``record`` it. ``run_stage`` asks them in that order; a done stage only ``restore``s the models
the next stages take from it (``Models``). Every trained stage is one ``Trainer.fit`` followed by
an evaluation of its best-on-dev checkpoint (``fit_and_evaluate``). A ``RunContext`` carries what
every stage reads: the typed run config (``config.RunConfig``), the data, the run folder.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from torch import nn

from xtc_lightning.cache import cache_folder, from_cache, publish_to_cache, shaping_key
from xtc_lightning.config import STAGES, RunConfig, stage_seed
from xtc_lightning.data import Examples, GlueDataModule
from xtc_lightning.distill import enable_attention_scores
from xtc_lightning.distributed import barrier, is_rank_zero
from xtc_lightning.errors import UserError
from xtc_lightning.export.run import (
    EXPORT_DIR,
    PACKED_NAME,
    export_model,
    export_run,
    final_form,
    load_student_weights,
    quantize_base,
    quantize_weights,
    read_run,
    rebuild_final_model,
)
from xtc_lightning.models import check_model_source, count_parameters, load_classifier, num_layers_of
from xtc_lightning.modules import ClassifierModule, DistillModule, GlueModule
from xtc_lightning.predictions import write_predictions_tsv
from xtc_lightning.quant import apply_quantization, quantization_summary
from xtc_lightning.recipe import Recipe
from xtc_lightning.results import StageResult, read_json, read_record, write_json_atomic, write_record
from xtc_lightning.resume import finished_stage, resume_checkpoint, stage_record_path
from xtc_lightning.slim import WEIGHTS_NAME, drop_resume_state, save_weights
from xtc_lightning.student import build_student
from xtc_lightning.tasks import GlueTask
from xtc_lightning.trainer import cluster_environment_name, make_trainer

log = logging.getLogger("xtc_lightning")

FP32 = {"weights": 32, "activations": 32}


@dataclass
class RunContext:
    """What every stage reads: the typed config, the data, the run folder."""

    config: RunConfig
    datamodule: GlueDataModule
    tokenizer: object
    run_dir: Path
    # augment=transfer: the source task's train split, read at startup with the task's own
    transfer_source: Examples | None = None

    @property
    def task(self) -> GlueTask:
        return self.config.task

    def wants(self, stage: str) -> bool:
        """Whether ``stage`` is at or before the run's last stage (``stage``)."""
        return STAGES.index(self.config.stage) >= STAGES.index(stage)


@dataclass
class Models:
    """The models one stage hands to the next: the teacher, the student and its teacher layers."""

    teacher: object = None
    teacher_dir: str | None = None  # the teacher's model folder, as recorded
    student: object = None
    layers: list[int] = field(default_factory=list)
    quantized_here: bool = False  # the student is the quantize stage's best, trained in this process

    @property
    def drops_layers(self) -> bool:
        return len(self.layers) < num_layers_of(self.teacher.config)


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


def seed_stage(seed: int, stage: str) -> None:
    """Seed every generator from ``seed`` and the stage name, before the stage draws anything."""
    L.seed_everything(stage_seed(seed, stage), workers=True, verbose=False)


def fit_and_evaluate(
    ctx: RunContext, stage: str, module: GlueModule, max_epochs: int, score_at_start: bool = False
) -> StageResult:
    """Train one stage, then evaluate its best-on-dev checkpoint; return the stage's results.

    ``score_at_start``: also evaluate the model before its first step (the quantize stage: the
    dev score right after quantization, where the low-bit recipes differ most); kept in
    ``<stage>/start.json`` so a resumed stage reports it too."""
    stage_dir = ctx.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, checkpoint = make_trainer(ctx.config, stage, stage_dir, max_epochs)
    t0 = time.perf_counter()
    ckpt_path = resume_checkpoint(stage_dir)  # only there when resuming (see resume.check_resume)
    if ckpt_path is not None:
        log.info("%s: resuming from %s", stage, ckpt_path)
    start, start_score = stage_dir / "start.json", None
    if score_at_start and start.is_file():
        start_score = read_json(start)["score"]
    elif score_at_start:
        trainer.validate(module, datamodule=ctx.datamodule, verbose=False)
        start_score = module.last_val["score"]
        if is_rank_zero():
            write_json_atomic(start, {"score": start_score, "metrics": module.last_val["splits"]})
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=ckpt_path, weights_only=True)
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
        module, datamodule=ctx.datamodule, verbose=False, ckpt_path=best_path or None, weights_only=True
    )
    best = module.last_val
    result = StageResult(
        stage=stage,
        metrics_best=best["splits"],
        score_best=best["score"],
        metrics_last_epoch=last.get("splits"),
        score_last_epoch=last.get("score"),
        selected="best val/score checkpoint" if best_path else "final weights (no checkpoint was saved)",
        # the file is deleted once the stage is finished (slim.drop_resume_state); the weights stay
        selected_checkpoint=Path(best_path).name if best_path else None,
        steps=trainer.global_step,
        resumed_from=str(ckpt_path) if ckpt_path else None,
        world_size=trainer.world_size,
        cluster_environment=cluster_environment_name(trainer),
        predictions=write_predictions(module.task, module.last_predictions, stage_dir),
        train_time_s=round(train_time, 2),
        wall_time_s=round(time.perf_counter() - t0, 2),
    )
    if score_at_start:
        result.score_at_start = start_score
    return result


def record_stage(run_dir: Path, result: StageResult) -> dict:
    """``<stage>/result.json``: the stage is finished in this run folder (rank 0 writes); returns
    the record as written."""
    record = result.to_dict()
    if is_rank_zero():
        path = stage_record_path(run_dir, result.stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_record(path, record, run_dir)
        freed = drop_resume_state(path.parent)  # finished: nothing resumes from them any more
        if freed:
            log.info("%s: finished, deleted %.0f MB of resume checkpoints", result.stage, freed / 1e6)
    return record


class Stage:
    """One stage's shape. ``done`` is its recorded result in the run folder (None: not finished);
    ``restore`` puts a done stage's model into ``models`` for the next stages."""

    name: str

    def needed(self, ctx: RunContext, models: Models) -> bool:
        raise NotImplementedError

    def done(self, ctx: RunContext) -> dict | None:
        return finished_stage(ctx.run_dir, self.name)

    def restore(self, ctx: RunContext, models: Models, done: dict) -> None:
        """Nothing to restore by default."""

    def run(self, ctx: RunContext, models: Models) -> StageResult:
        raise NotImplementedError

    def record(self, ctx: RunContext, result: StageResult) -> dict:
        return record_stage(ctx.run_dir, result)


def run_stage(stage: Stage, ctx: RunContext, models: Models) -> dict | None:
    """Is it needed? done? run, record. The stage's record, or None when not needed."""
    if not stage.needed(ctx, models):
        return None
    done = stage.done(ctx)
    if done is not None:
        stage.restore(ctx, models, done)
        return done
    return stage.record(ctx, stage.run(ctx, models))


class TeacherStage(Stage):
    """Fine-tune the teacher, or reuse the cached one trained with the same settings, or evaluate
    the given one (``teacher.checkpoint``)."""

    name = "teacher"

    def needed(self, ctx: RunContext, models: Models) -> bool:
        return True

    def run(self, ctx: RunContext, models: Models) -> StageResult:
        config, task = ctx.config, ctx.task
        if config.teacher.checkpoint:
            return given_teacher(ctx)
        key = shaping_key(config.shaping, ctx.datamodule.train_fingerprint, teacher=config.teacher.budget())
        cache = cache_folder(config.cache_dir, "teachers", task.name, key)
        cached = from_cache(cache, self.name, ctx.run_dir / self.name, task.dev_splits)
        if cached is not None:
            return cached
        seed_stage(config.seed, self.name)
        model = load_classifier(config.model, task)
        module = ClassifierModule(model, task.name, config.optim, config.teacher.lr)
        result = fit_and_evaluate(ctx, self.name, module, config.teacher.max_epochs)
        result.params = count_parameters(model)
        result.num_layers = num_layers_of(model.config)
        result.bits = dict(FP32)
        return publish_to_cache(cache, result, model, ctx.tokenizer)


def given_teacher(ctx: RunContext) -> StageResult:
    """``teacher.checkpoint``: an already fine-tuned HF folder; only evaluated."""
    config, task = ctx.config, ctx.task
    check_model_source(config.teacher.checkpoint)
    model = load_classifier(config.model, task, name_or_path=config.teacher.checkpoint)
    module = ClassifierModule(model, task.name, config.optim, config.teacher.lr)
    stage_dir = ctx.run_dir / "teacher"
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, _ = make_trainer(config, "teacher", stage_dir, max_epochs=1)
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=ctx.datamodule, verbose=False)
    return StageResult(
        stage="teacher",
        metrics_best=module.last_val["splits"],
        score_best=module.last_val["score"],
        selected="given checkpoint (not trained here)",
        predictions=write_predictions(task, module.last_predictions, stage_dir),
        params=count_parameters(model),
        num_layers=num_layers_of(model.config),
        bits=dict(FP32),
        model_dir=str(Path(config.teacher.checkpoint).resolve()),
        cached=False,
        wall_time_s=round(time.perf_counter() - t0, 2),
    )


def distil(
    ctx: RunContext,
    stage: str,
    models: Models,
    recipe: Recipe | None = None,
    teacher: tuple[nn.Module, list[int]] | None = None,
) -> StageResult:
    """Distil ``models.student`` from ``models.teacher`` (reduce: fp32; quantize: ``config.quant``
    with ``recipe``), or from ``teacher`` = (model, its layer of each student layer) if given."""
    config, student, layers = ctx.config, models.student, models.layers
    quant = config.quant if stage == "quantize" else None
    budget = config.stage_config(stage)
    teacher_model, teacher_layers = teacher or (models.teacher, layers)
    module = DistillModule(
        teacher_model,
        student,
        ctx.task.name,
        teacher_layers,
        config.distill,
        config.stage_optim(stage),
        budget.lr,
        quant,
        recipe,
    )
    result = fit_and_evaluate(ctx, stage, module, budget.max_epochs, score_at_start=quant is not None)
    result.train_examples = len(ctx.datamodule.train_set)
    result.params = count_parameters(student)
    result.num_layers = len(layers)
    result.layers = layers
    if quant is None:
        result.bits = dict(FP32)
    else:
        summary = quantization_summary(student)
        result.bits = {"weights": quant.weight.bits, "activations": quant.activation.bits, "name": quant.name}
        if quant.mixed:
            result.bits["weights_by_target"] = {r: s.bits for r, s in quant.weight_by_target}
        result.params_by_bits = {str(k): v for k, v in summary.params_by_bits.items()}
        weights = ctx.run_dir / stage / WEIGHTS_NAME  # the selected student, what xtc-export reads
        result.weights = save_weights(student, weights) if is_rank_zero() else str(weights)
    return result


class ReduceStage(Stage):
    """Step 1: the layer-reduced student distilled in full precision (cached like the teacher)."""

    name = "reduce"

    def needed(self, ctx: RunContext, models: Models) -> bool:
        return ctx.wants(self.name) and models.drops_layers

    def restore(self, ctx: RunContext, models: Models, done: dict) -> None:
        models.student = self.load(ctx, done["model_dir"])

    @staticmethod
    def load(ctx: RunContext, model_dir: str):
        return enable_attention_scores(load_classifier(ctx.config.model, ctx.task, name_or_path=model_dir))

    def run(self, ctx: RunContext, models: Models) -> StageResult:
        config = ctx.config
        key = shaping_key(
            config.shaping,
            ctx.datamodule.train_fingerprint,
            from_teacher=models.teacher_dir,
            layers=models.layers,
            distill=config.distill.as_dict(),
            reduce=config.reduce.budget(),
        )
        cache = cache_folder(config.cache_dir, "reduced", ctx.task.name, key)
        cached = from_cache(cache, self.name, ctx.run_dir / self.name, ctx.task.dev_splits)
        if cached is not None:
            models.student = self.load(ctx, cached.model_dir)
            return cached
        seed_stage(config.seed, self.name)
        models.student = build_student(models.teacher, models.layers)
        result = distil(ctx, self.name, models)
        return publish_to_cache(cache, result, models.student, ctx.tokenizer)


def quantize_teacher(recipe: Recipe, models: Models) -> tuple[nn.Module, list[int]]:
    """Whom the quantize stage distils from (``recipe.teacher``), as (model, its layer of each
    student layer): the task's teacher, or, with student layer ``i`` matched to its own layer ``i``,
    a frozen copy of the still full-precision student or the final model of ``recipe.start_run``
    (in its own bit-width). Call it before quantizing the student."""
    own_layers = list(range(len(models.layers)))
    if recipe.teacher == "fp32_student":
        return copy.deepcopy(models.student), own_layers
    if recipe.teacher == "start_run":
        run_dir = Path(recipe.start_run)
        model, *_ = rebuild_final_model(run_dir, *read_run(run_dir))
        return enable_attention_scores(model), own_layers
    return models.teacher, models.layers


def load_start_run(student: nn.Module, run_dir: str) -> str:
    """Put the selected weights of the finished quantized run ``run_dir`` (``recipe.start_run``: its
    latent weights and every other parameter) into the quantized ``student``; returns their file.
    They must fit it exactly (names and shapes)."""
    results, _ = read_run(Path(run_dir))
    state, source = quantize_weights(Path(run_dir), results)
    try:
        load_student_weights(student, state, source)
    except UserError as err:
        raise UserError(f"recipe.start_run={run_dir}: {err}") from None
    return source


class QuantizeStage(Stage):
    """Step 2: quantize the student (``quant``) and distil it again with the low-bit ``recipe``."""

    name = "quantize"

    def needed(self, ctx: RunContext, models: Models) -> bool:
        return ctx.wants(self.name) and ctx.config.quant.enabled

    def run(self, ctx: RunContext, models: Models) -> StageResult:
        config = ctx.config
        seed_stage(config.quantize.seed, self.name)
        ctx.datamodule.seed = config.quantize.seed  # its data order too
        teacher = quantize_teacher(config.recipe, models)  # before the student is quantized
        apply_quantization(models.student, config.quant)
        if config.recipe.start_run is not None:
            log.info("quantize: starting from %s", load_start_run(models.student, config.recipe.start_run))
        log.info("quantized modules:\n%s", quantization_summary(models.student).text)
        result = distil(ctx, self.name, models, config.recipe, teacher)
        models.quantized_here = True  # its best-on-dev weights, as weights.safetensors holds them
        return result


class ExportStage(Stage):
    """The final model as a packed file and folders (``export/run.py``), checked on dev; its
    record is ``export/export.json`` (written by ``export_run``). Rank 0 only, after training."""

    name = "export"

    def __init__(self, results: dict):
        self.results = results  # results.json as just written: what the export reads of the run

    def needed(self, ctx: RunContext, models: Models) -> bool:
        return ctx.wants(self.name)

    def done(self, ctx: RunContext) -> dict | None:
        export_dir = ctx.run_dir / EXPORT_DIR
        if (export_dir / "export.json").is_file() and (export_dir / PACKED_NAME).is_file():
            return read_record(export_dir / "export.json", ctx.run_dir)  # exported before an interruption
        return None

    def run(self, ctx: RunContext, models: Models) -> dict:
        """Export the quantize stage's best student from memory when it trained in this process
        (the same model ``xtc export`` rebuilds from the run folder); otherwise (an fp32 final
        stage, a quantize stage finished before a resume) as ``xtc export`` does."""
        config = ctx.config
        export = config.export
        options = {
            "other_dtype": export.other_dtype,
            "hf": export.hf,
            "hf_dequantized": export.hf_dequantized,
            "evaluate": export.evaluate,
        }
        results = self.results
        if not (results["final_stage"] == "quantize" and models.quantized_here):
            return export_run(ctx.run_dir, **options)
        model = final_form(models.student, config.quant)
        base, source = quantize_base(results, ctx.run_dir), results["stages"]["quantize"]["weights"]
        return export_model(
            model, config.quant, base, source, ctx.run_dir, results, config.resolved, **options
        )

    def record(self, ctx: RunContext, result: dict) -> dict:
        return result  # export_run wrote export/export.json

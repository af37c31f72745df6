"""The Lightning ``Trainer`` of a stage: its callbacks, loggers and checkpoints.

``make_trainer`` builds it from the run's ``trainer`` settings (``config.TrainerConfig``, passed
through as Trainer arguments and checked at startup), ``progress``, ``checkpoint`` and ``logger``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from xtc_lightning.callbacks import (
    FiniteLoss,
    LastCheckpoint,
    PlainProgress,
    RngState,
    StageProgressBar,
    StageSummary,
    want_progress_bar,
)
from xtc_lightning.config import RunConfig
from xtc_lightning.errors import UserError
from xtc_lightning.loggers import stage_loggers


def make_trainer(
    config: RunConfig, stage: str, stage_dir: Path, max_epochs: int
) -> tuple[L.Trainer, ModelCheckpoint]:
    """A stage's Trainer writing into ``stage_dir`` and its best-``val/score`` checkpoint callback."""
    trainer_kwargs = {**config.trainer.arguments, "max_epochs": max_epochs}
    bar = want_progress_bar(config.progress)
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir / "checkpoints",
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor="val/score",
        mode="max",
    )
    last = LastCheckpoint(stage_dir / "checkpoints", config.checkpoint_every_n_train_steps)
    callbacks = [FiniteLoss(stage), checkpoint, last, RngState(), StageSummary(stage)]
    if bar:
        callbacks.append(StageProgressBar())
    else:
        callbacks.append(PlainProgress(stage, config.trainer.log_every_n_steps))
    loggers = stage_loggers(config.loggers, stage, stage_dir.parent)
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


def cluster_environment_name(trainer: L.Trainer) -> str:
    """Where ranks (and Slurm's requeue handler) come from: the strategy's cluster environment;
    one-device strategies do not expose one, so it is detected as Lightning does (TorchElastic,
    Slurm, LSF, MPI, else the plain Lightning environment)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is not None:
        return type(env).__name__
    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type.__name__
    return LightningEnvironment.__name__

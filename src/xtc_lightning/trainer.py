"""The Lightning ``Trainer`` of a stage: its callbacks, loggers and checkpoints, and its checks.

``make_trainer`` builds it from ``cfg.trainer`` (passed through as Trainer arguments), ``progress``,
``checkpoint`` and ``logger``; ``check_trainer_config`` refuses settings that cannot run before
any work.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from xtc_lightning.callbacks import (
    FiniteLoss,
    LastCheckpoint,
    PlainProgress,
    RngState,
    StageProgressBar,
    StageSummary,
    want_progress_bar,
)
from xtc_lightning.errors import UserError
from xtc_lightning.loggers import stage_loggers

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def make_trainer(
    cfg: DictConfig, stage: str, stage_dir: Path, max_epochs: int
) -> tuple[L.Trainer, ModelCheckpoint]:
    """A stage's Trainer writing into ``stage_dir`` and its best-``val/score`` checkpoint callback."""
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


def check_trainer_config(cfg: DictConfig) -> None:
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

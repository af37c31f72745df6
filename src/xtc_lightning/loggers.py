"""Experiment loggers for the stages: CSV files per stage, and one wandb run per pipeline run.

One wandb run holds the whole pipeline: each stage's metrics under its own prefix
(``teacher-val/score``, ``quantize-train/loss``...), the resolved config as a plain dict, and
the run's final ``score`` (plus ``<stage>/score`` per stage) in the summary, the metric that
wandb sweeps optimize. Its id comes from the run folder (``<name>-<run id>``), with
``resume: allow``, so a resumed or requeued run (same folder) continues the same wandb run.
Under a sweep agent the agent's run id is used instead. Only rank 0 logs; ``wandb.finish()``
is called whatever happens.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import hydra

from xtc_lightning.distributed import is_rank_zero

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def wandb_id(cfg_id: str | None, run_dir: Path) -> str:
    """``logger.wandb.id``, else the sweep agent's run id (``WANDB_RUN_ID``), else one derived from
    the run folder (runs/<name>/<run id>)."""
    derived = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_dir.parent.name}-{run_dir.name}")
    return cfg_id or os.environ.get("WANDB_RUN_ID") or derived


def stage_loggers(configured: Mapping, stage: str, run_dir: Path) -> list:
    """The configured loggers (the ``logger`` group: name -> ``instantiate`` target) for one stage
    (CSV: ``logs/<stage>/``; wandb: metric prefix ``<stage>``)."""
    loggers = []
    for lg in configured.values():
        if lg is None:
            continue
        if lg["_target_"] == WANDB_TARGET:
            loggers.append(hydra.utils.instantiate(lg, id=wandb_id(lg.get("id"), run_dir), prefix=stage))
        else:
            loggers.append(hydra.utils.instantiate(lg, version=stage))
    return loggers


@contextmanager
def wandb_run(configured: Mapping, resolved: Mapping, run_dir: Path):
    """Start the run's wandb run (rank 0, when the ``logger`` group has ``wandb``), log the resolved
    config; always finish.

    Yields a function recording the final results into the run summary (a no-op without wandb).
    """
    lg = configured.get("wandb")
    if lg is None or not is_rank_zero():
        yield lambda results: None
        return
    import wandb

    # the stages' loggers attach to this run; Lightning warns about that, and it is the intent
    warnings.filterwarnings("ignore", message=r"There is a wandb run already in progress")
    logger = hydra.utils.instantiate(lg, id=wandb_id(lg.get("id"), run_dir))
    logger.log_hyperparams(dict(resolved))

    def record(results: dict) -> None:
        summary = {"score": results["score"], "final_stage": results["final_stage"]}
        summary.update({f"{name}/score": r["score_best"] for name, r in results["stages"].items()})
        packed = ((results.get("export") or {}).get("dev") or {}).get("score")
        if packed is not None:  # the packed file's own dev score (export.evaluate)
            summary["packed/score"] = packed
        logger.experiment.summary.update(summary)

    exit_code = 1
    try:
        yield record
        exit_code = 0
    finally:
        wandb.finish(exit_code=exit_code)

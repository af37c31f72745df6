"""Resuming an interrupted run in its own run folder.

A run folder records each finished stage as ``<stage>/result.json``. Rerunning the same
command with the same folder (``hydra.run.dir=<folder>``, or the same Slurm job id, which keys
the folder) takes those stages as done, continues the interrupted stage from its newest
checkpoint with the optimizer, scheduler, quantizer, loop and random-generator state, and runs
the rest. The checkpoint is ``<stage>/checkpoints/last.ckpt`` (written after every epoch's
validation and every ``checkpoint.every_n_train_steps`` optimizer steps) or a newer
``<stage>/hpc_ckpt_<n>.ckpt`` that Lightning writes when Slurm sends the requeue signal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from xtc_lightning.errors import UserError
from xtc_lightning.results import read_record

RESUME_CHOICES = ("auto", True, False)
# Keys that may differ between the interrupted run and its continuation.
NOT_RESUME_SHAPING = ("resume", "progress", "num_threads")
CONFIG_FILE = "config_resolved.yaml"


def stage_record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / "result.json"


def finished_stage(run_dir: Path, stage: str) -> dict | None:
    """The recorded result of a stage this run folder already finished, or None."""
    path = stage_record_path(run_dir, stage)
    return read_record(path, run_dir) if path.is_file() else None


def resume_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint to continue a stage from: ``checkpoints/last.ckpt`` or ``hpc_ckpt_*.ckpt``."""
    candidates = [stage_dir / "checkpoints" / "last.ckpt", *stage_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def has_state(run_dir: Path) -> bool:
    """Whether the folder holds a finished stage or a checkpoint to continue from."""
    return any(run_dir.glob("*/result.json")) or any(
        resume_checkpoint(d) for d in run_dir.iterdir() if d.is_dir()
    )


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume(resume, resolved: Mapping, run_dir: Path) -> bool:
    """Apply ``resume`` (auto | true | false, checked at startup) to ``run_dir``; True when this run
    continues one.

    A continuation must have the interrupted run's config (``config_resolved.yaml``) except for
    ``NOT_RESUME_SHAPING``; ``resolved`` is this run's (plain values). Anything else would mix two
    experiments in one folder.
    """
    state = run_dir.is_dir() and has_state(run_dir)
    if resume is False and state:
        raise UserError(f"run folder {run_dir} already holds a run (resume=false); resume=auto continues it")
    if resume is True and not state:
        raise UserError(f"resume=true but run folder {run_dir} holds no finished stage or checkpoint")
    if not state:
        return False
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(
            f"run folder {run_dir} holds checkpoints but no {CONFIG_FILE}: cannot check its config"
        )
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    current = _flatten(dict(resolved))
    differ = sorted(
        k
        for k in set(saved) | set(current)
        if k.split(".")[0] not in NOT_RESUME_SHAPING and saved.get(k, "<unset>") != current.get(k, "<unset>")
    )
    if differ:
        shown = ", ".join(
            f"{k}={saved.get(k, '<unset>')!r}->{current.get(k, '<unset>')!r}" for k in differ[:4]
        )
        more = f" (+{len(differ) - 4} more)" if len(differ) > 4 else ""
        raise UserError(f"run folder {run_dir} was started with another config: {shown}{more}")
    return True

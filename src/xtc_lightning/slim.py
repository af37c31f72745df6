"""Lean run folders: once a stage is finished, only its selected weights stay.

While a stage trains, ``<stage>/checkpoints/`` holds full-state checkpoints (weights, optimizer,
schedule, loop and random state: 2-3x the model each) so that an interrupted stage resumes.
Once the stage is recorded as finished (``<stage>/result.json``) nothing resumes from them any
more: the teacher and reduce stages' selected models live in the cache as HF folders, and the
quantize stage's selected student is written as ``quantize/weights.safetensors`` (its
``state_dict``, weights only), which is what ``xtc-export`` rebuilds the packed model from.
``drop_resume_state`` then deletes the full-state files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xtc_lightning.io import atomic_path

WEIGHTS_NAME = "weights.safetensors"


def save_weights(model: torch.nn.Module, path: Path) -> str:
    """Write ``model.state_dict()`` (every tensor contiguous, own storage) to ``path`` as safetensors."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return str(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict written by ``save_weights`` (safetensors: no code is ever unpickled)."""
    return load_file(str(path), device="cpu")


def drop_resume_state(stage_dir: Path) -> int:
    """Delete a finished stage's full-state checkpoints (``checkpoints/``, ``hpc_ckpt_*.ckpt``);
    return the bytes freed."""
    files = [*stage_dir.glob("checkpoints/*"), *stage_dir.glob("hpc_ckpt_*.ckpt")]
    freed = sum(p.stat().st_size for p in files if p.is_file())
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    for p in stage_dir.glob("hpc_ckpt_*.ckpt"):
        p.unlink(missing_ok=True)
    return freed

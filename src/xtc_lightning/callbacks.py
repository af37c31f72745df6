"""Trainer callbacks: the console (model summary, progress bar or lines for batch jobs), and what a
resumed run needs in its checkpoints."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, RichProgressBar

from xtc_lightning.errors import UserError

log = logging.getLogger("xtc_lightning")


def want_progress_bar(progress: str) -> bool:
    """``auto``: a bar on an interactive terminal outside Slurm batch jobs, log lines otherwise."""
    if progress == "bar":
        return True
    if progress == "plain":
        return False
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ


class StageSummary(L.Callback):
    """Log the module's parameters once per stage, when its fit starts (rank 0): one line per
    child module (``name Type params``) and the trainable / frozen totals. Replaces Lightning's
    summary table, whose FLOPs column is always 0 here (no example input)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = []
        for name, child in pl_module.named_children():
            n = sum(p.numel() for p in child.parameters())
            if n:
                lines.append(f"  {name:<10} {type(child).__name__:<34} {n / 1e6:8.2f}M params")
        params = list(pl_module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        log.info(
            "%s model:\n%s\n  trainable %.2fM, frozen %.2fM",
            self.stage, "\n".join(lines), trainable / 1e6, frozen / 1e6,
        )  # fmt: skip


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar without ``v_num`` (the logger version: here the stage name, cut)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class PlainProgress(L.Callback):
    """Log ``stage epoch step/total loss lr rate`` every ``every_n_steps`` optimizer steps."""

    def __init__(self, stage: str, every_n_steps: int):
        self.stage = stage
        self.every = max(1, every_n_steps)
        self.t0 = time.perf_counter()
        self.step0 = 0
        self.trained = False  # no fit yet: a validation now scores the stage's starting point

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.step0 = time.perf_counter(), trainer.global_step
        self.trained = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step == 0 or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        loss = metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        rate = (step - self.step0) / max(1e-9, time.perf_counter() - self.t0)
        log.info(
            "%s epoch %d step %d/%d loss %s lr %.2e %.2f steps/s",
            self.stage,
            trainer.current_epoch,
            step,
            int(trainer.estimated_stepping_batches),
            f"{float(loss):.4f}" if loss is not None else "-",
            lr,
            rate,
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        score = trainer.callback_metrics.get("val/score")
        if score is None:
            return
        if trainer.state.fn == "validate" and not self.trained:  # before the stage's first step
            log.info("%s before training val/score %.4f", self.stage, float(score))
        elif trainer.state.fn == "validate":  # the re-evaluation of the selected checkpoint
            log.info("%s selected checkpoint val/score %.4f", self.stage, float(score))
        else:
            log.info("%s epoch %d val/score %.4f", self.stage, trainer.current_epoch, float(score))


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt``, the state a resumed run continues from: written at the end of
    every epoch (after its validation) and, with ``every_n_train_steps``, every that many
    optimizer steps.

    A ``Checkpoint`` subclass, so Lightning runs it after the best-on-dev ``ModelCheckpoint``
    and the file holds that callback's up-to-date choice.
    """

    def __init__(self, dirpath, every_n_train_steps: int | None):
        self.path = str(dirpath) + "/last.ckpt"
        self.every = every_n_train_steps
        self.saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        # also under fast_dev_run (unlike ModelCheckpoint): the export reads the stage's final weights
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # The full state, to resume from (said explicitly: Lightning logs a line per save otherwise);
        # rank 0 writes, all ranks sync. Written under a temporary name in the same folder and renamed
        # (fsspec's own temp file may live on another filesystem, where its move is a plain copy): a
        # save cut short (full disk, kill) never leaves a partial file named last.ckpt.
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("LastCheckpoint")
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Not after an epoch's last batch: resumed from there, Lightning would skip that epoch's
        # validation (and its best checkpoint); the end-of-epoch save follows anyway.
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.every and step % self.every == 0 and step != self.saved_step and not last_batch:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)  # after the epoch's validation and ModelCheckpoint's choice of the best


class RngState(L.Callback):
    """Keep torch's random generators (dropout's source) in checkpoints and restore them on
    resume: a resumed one-process run draws the same masks as an uninterrupted one."""

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class FiniteLoss(L.Callback):
    """Stop the stage with a one-line ``UserError`` at the first optimizer step whose loss is not
    finite, naming the stage, the step and every ``train/*`` loss that is NaN or inf.

    The losses are the ones ``training_step`` returns under their logged names
    (``modules.log_train_losses``), averaged over the processes as their logged values are: every
    rank of a DDP run stops at the same step. Runs before the checkpoint callbacks (Lightning orders
    ``Checkpoint`` subclasses last), so the diverged weights are never saved.
    """

    def __init__(self, stage: str):
        self.stage = stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        losses = {k: v for k, v in outputs.items() if k.startswith("train/")}
        means = trainer.strategy.reduce(torch.stack(list(losses.values())).float(), reduce_op="mean")
        bad = {k: float(v) for k, v in zip(losses, means, strict=True) if not math.isfinite(float(v))}
        if bad:
            shown = ", ".join(f"{name}={value}" for name, value in bad.items())
            raise UserError(
                f"{self.stage}: the loss went non-finite at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}): {shown}; lower {self.stage}.lr or check the data"
            )

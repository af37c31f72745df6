"""Resume: a run killed with SIGKILL and rerun in the same folder ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import OmegaConf

from conftest import REPO, compose_job_config, readme_commands, run_train, train_command
from xtc_lightning.config import OptimConfig
from xtc_lightning.errors import UserError
from xtc_lightning.results import read_record
from xtc_lightning.resume import check_resume, resume_checkpoint
from xtc_lightning.slim import load_weights

# 64 examples / batch 8 = 8 steps per epoch, 2 epochs per student stage, last.ckpt every 3 steps:
# most checkpoints fall in the middle of an epoch. Dropout stays on (the tiny BERT's 0.1), in the
# quantize stage too (recipe.dropout=null; the default recipe turns it off there), so a resume has
# to restore the dropout masks' random state of both student stages.
STEPS_PER_EPOCH = 8
ARGS = [
    "task=rte", "student.num_layers=1", "quant=binary", "recipe.dropout=null", "data.max_train_examples=64", "data.batch_size=8",
    "data.max_length=64", "trainer.max_epochs=2", "optim.lr=1e-3", "checkpoint.every_n_train_steps=3",
    "export.evaluate=false", "export.hf=false", "teacher.max_epochs=1",
]  # fmt: skip


def kill_when(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (no chance to clean up or save anything)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def selected_state(result: dict) -> dict:
    """A finished stage's selected weights: the cached HF folder's, or quantize's weights file."""
    return load_weights(result.get("weights") or Path(result["model_dir"]) / "model.safetensors")


def test_sigkilled_run_resumes_and_ends_exactly_like_an_uninterrupted_one(tmp_path, glue_dir, tiny_bert_dir):
    # the README's two lines: the same command twice, the run folder given
    first, again = readme_commands("## Resuming")
    assert first == again and first[:2] == ["python", "train.py"]
    assert any(a.startswith("hydra.run.dir=") for a in first)
    args = [*first[2:], *ARGS, f"model.name_or_path={tiny_bert_dir}"]  # later overrides win
    straight_dir, killed_dir = tmp_path / "a" / "run", tmp_path / "b" / "run"
    straight = run_train([*args, f"hydra.run.dir={straight_dir}"], tmp_path / "a", glue_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # kill once while the reduced student trains, once while the quantized one does
    cmd, env = train_command([*args, f"hydra.run.dir={killed_dir}"], tmp_path / "b", glue_dir)
    killed_at = []
    for stage in ("reduce", "quantize"):
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        last = killed_dir / stage / "checkpoints" / "last.ckpt"
        kill_when(last, proc)
        assert not (killed_dir / stage / "result.json").exists()  # killed before the stage finished
        state = torch.load(last, map_location="cpu", weights_only=True)
        killed_at.append(state["global_step"])
        assert not [k for k in state["state_dict"] if k.startswith("teacher.")]  # frozen: not resume state
    assert any(step % STEPS_PER_EPOCH for step in killed_at), killed_at  # resumed mid-epoch at least once
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "quantize: resuming from " in resumed.stdout
    assert "teacher epoch" not in resumed.stdout and "reduce epoch" not in resumed.stdout  # recorded: skipped

    a = read_record(straight_dir / "results.json", straight_dir)
    b = read_record(killed_dir / "results.json", killed_dir)
    assert b["stages"]["reduce"]["resumed_from"].endswith("reduce/checkpoints/last.ckpt")
    assert b["stages"]["quantize"]["resumed_from"].endswith("quantize/checkpoints/last.ckpt")
    for stage in ("teacher", "reduce", "quantize"):
        for key in ("metrics_best", "score_best", "metrics_last_epoch", "score_last_epoch"):
            assert b["stages"][stage][key] == a["stages"][stage][key], (stage, key)
        assert b["stages"][stage]["selected_checkpoint"] == a["stages"][stage]["selected_checkpoint"]
        # the same weights, bit for bit (a different batch order or dropout mask would show here)
        sa, sb = selected_state(a["stages"][stage]), selected_state(b["stages"][stage])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), stage
    assert b["metrics"] == a["metrics"] and b["score"] == a["score"]
    assert (killed_dir / "predictions_dev.tsv").read_text() == (
        straight_dir / "predictions_dev.tsv"
    ).read_text()
    assert b["export"]["size"] == a["export"]["size"]
    assert not list(killed_dir.rglob("*.ckpt"))  # every stage finished: no resume state is left


def _cfg(tmp_path, *overrides):
    cfg, _ = compose_job_config(["task=rte", *overrides], tmp_path / "run")
    return cfg


def _check(tmp_path, run_dir, *overrides) -> bool:
    """``check_resume`` as the pipeline calls it: the run's ``resume`` and its resolved config."""
    cfg = _cfg(tmp_path, *overrides)
    return check_resume(cfg.resume, OmegaConf.to_container(cfg, resolve=True), run_dir)


def test_resume_modes(tmp_path):
    run_dir = tmp_path / "run"
    assert _check(tmp_path, run_dir) is False  # nothing there: a fresh start
    with pytest.raises(
        UserError, match=r"resume=true but run folder .* holds no finished stage or checkpoint"
    ):
        _check(tmp_path, run_dir, "resume=true")
    (run_dir / "teacher" / "checkpoints").mkdir(parents=True)
    (run_dir / "teacher" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    OmegaConf.save(_cfg(tmp_path), run_dir / "config_resolved.yaml", resolve=True)
    assert _check(tmp_path, run_dir) is True
    assert _check(tmp_path, run_dir, "resume=true", "progress=bar", "num_threads=1") is True
    with pytest.raises(UserError, match=r"already holds a run \(resume=false\); resume=auto continues it"):
        _check(tmp_path, run_dir, "resume=false")
    with pytest.raises(UserError, match=r"was started with another config: optim.lr=5e-05->0.001"):
        _check(tmp_path, run_dir, "optim.lr=1e-3")


def test_the_newest_checkpoint_wins_including_slurm_requeue_ones(tmp_path):
    stage = tmp_path / "quantize"
    assert resume_checkpoint(stage) is None
    (stage / "checkpoints").mkdir(parents=True)
    last = stage / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resume_checkpoint(stage) == last
    hpc = stage / "hpc_ckpt_1.ckpt"  # Lightning's, written on Slurm's requeue signal
    hpc.write_bytes(b"x")
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    assert resume_checkpoint(stage) == hpc
    os.utime(last, (now + 10, now + 10))
    assert resume_checkpoint(stage) == last


class Snapshot(Checkpoint):
    """Copies ``last.ckpt`` as it is at global step ``step`` (after LastCheckpoint ran: a Checkpoint
    too, added before), at the end of a batch or of an epoch: what a kill at that moment leaves."""

    def __init__(self, folder: Path, step: int, hook: str, to: Path):
        self.folder, self.step, self.hook, self.to = folder, step, hook, to

    def _copy(self, trainer, hook: str) -> None:
        if trainer.global_step == self.step and hook == self.hook and not self.to.exists():
            shutil.copy(self.folder / "last.ckpt", self.to)

    def on_train_batch_end(self, trainer, *args) -> None:
        self._copy(trainer, "batch")

    def on_train_epoch_end(self, trainer, *args) -> None:
        self._copy(trainer, "epoch")


def fit_three_epochs(folder: Path, tiny_bert_dir, glue_dir, every: int, ckpt=None, snapshot=None):
    """The teacher stage's module and callbacks, by hand: 64 examples / batch 8 = 8 steps per epoch,
    last.ckpt every ``every`` steps. Returns the final weights and the best checkpoint's file name."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from xtc_lightning.callbacks import LastCheckpoint, RngState
    from xtc_lightning.data import GlueDataModule
    from xtc_lightning.models import load_classifier, load_tokenizer
    from xtc_lightning.modules import ClassifierModule
    from xtc_lightning.tasks import get_task

    cfg, _ = compose_job_config(["task=rte", f"model.name_or_path={tiny_bert_dir}"], folder)
    L.seed_everything(0, workers=True, verbose=False)
    task = get_task("rte")
    data = GlueDataModule(
        task, load_tokenizer(cfg.model), glue_dir=str(glue_dir), hub_dataset="", max_length=64, batch_size=8,
        eval_batch_size=64, max_train_examples=64, num_workers=0, cache_dir=None, seed=0,
    )  # fmt: skip
    module = ClassifierModule(
        load_classifier(cfg.model, task),
        "rte",
        OptimConfig.from_dict(OmegaConf.to_container(cfg.optim)),
        1e-3,
    )
    best = ModelCheckpoint(dirpath=folder, filename="best-{step}", monitor="val/score", mode="max")
    callbacks = [best, LastCheckpoint(folder, every), RngState(), *([snapshot] if snapshot else [])]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, num_sanity_val_steps=0, default_root_dir=str(folder),
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    return module.state_dict(), Path(best.best_model_path).name


@pytest.mark.parametrize(
    ("every", "step", "hook"),
    [(3, 6, "batch"), (4, 8, "batch"), (3, 8, "epoch"), (3, 16, "epoch")],
    ids=["mid-epoch", "after-last-batch", "epoch-end", "second-epoch-end"],
)
def test_resume_from_any_checkpoint_position_is_exact(every, step, hook, tmp_path, glue_dir, tiny_bert_dir):
    """Weights and the best-checkpoint choice (dev ties: the restored choice decides) match an
    uninterrupted run, wherever the last checkpoint before a kill was written."""
    folder, snap = tmp_path / "run", tmp_path / "snap.ckpt"
    straight, straight_best = fit_three_epochs(
        folder, tiny_bert_dir, glue_dir, every, snapshot=Snapshot(folder, step, hook, snap)
    )
    shutil.move(folder, tmp_path / "straight")  # the resumed run uses the same folder, as a rerun does
    resumed, resumed_best = fit_three_epochs(folder, tiny_bert_dir, glue_dir, every, ckpt=snap)
    assert resumed_best == straight_best
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

"""One writer per run folder, and nothing written into it before a run has passed its checks.

``lock_run_folder`` takes an exclusive advisory lock (``fcntl.flock``) on ``<run dir>/.lock`` for
the rest of the process: a second process on the same folder gets a one-line ``UserError``; the
kernel drops the lock when its holder exits or dies, so a killed run never leaves a stale lock.
Under DDP rank 0 alone takes it (the other ranks are its own children or its Slurm tasks).

Hydra's own ``.hydra/`` files are not written by Hydra (``hydra.output_subdir: null``) but by
``save_hydra_files`` once the run's checks passed, and the log file (``DeferredFileHandler``, set
in ``conf/hydra/default.yaml``) is opened then too: a refused run leaves an existing folder as it
was, and ``discard_unstarted`` removes a fresh folder whose run never started.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import weakref
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtc_lightning.errors import UserError
from xtc_lightning.io import write_text_atomic

LOCK_NAME = ".lock"
HYDRA_SUBDIR = ".hydra"
_HELD: dict[Path, int] = {}  # run folder -> open lock file descriptor, for the process's lifetime


def is_fresh(run_dir: Path) -> bool:
    """No folder yet, or an empty one (Hydra creates the run folder before the task starts)."""
    return not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))


def lock_run_folder(run_dir: Path) -> None:
    """Hold ``<run_dir>/.lock`` exclusively until this process exits (re-entrant within it)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"run folder {run_dir} is not writable: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(
            f"run folder {run_dir} is in use by another running process (locked {run_dir / LOCK_NAME}); "
            "wait for it to finish or choose another hydra.run.dir"
        ) from None
    _HELD[run_dir] = fd


def unlock_run_folder(run_dir: Path) -> None:
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written at startup: ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    out = Path(run_dir) / HYDRA_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": cfg,
        "hydra.yaml": hydra_cfg,
        "overrides.yaml": hydra_cfg.hydra.overrides.task,
    }
    for name, node in files.items():
        write_text_atomic(out / name, OmegaConf.to_yaml(node))


def discard_unstarted(run_dir: Path, was_fresh: bool, started_marker: str) -> None:
    """After a refused start: remove a folder that was fresh and whose run never started
    (``started_marker`` not written), if this process held its lock; an empty one in any case.
    An existing folder, or one another process holds, is left alone."""
    run_dir = Path(run_dir).resolve()
    if not was_fresh or not run_dir.is_dir() or (run_dir / started_marker).exists():
        return
    if run_dir in _HELD:
        shutil.rmtree(run_dir, ignore_errors=True)
        unlock_run_folder(run_dir)
    elif not any(run_dir.iterdir()):
        run_dir.rmdir()


class DeferredFileHandler(logging.FileHandler):
    """Hydra's run log file, opened by ``start_log_files``: records before it (imports, checks)
    are held in memory and written first then; a run refused before it writes no log file."""

    _instances: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, filename, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode, encoding, delay=True)
        self.pending: list[logging.LogRecord] | None = []
        DeferredFileHandler._instances.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.pending is None:
            super().emit(record)
        elif len(self.pending) < 10_000:
            self.pending.append(record)

    def start(self) -> None:
        pending, self.pending = self.pending, None
        for record in pending or []:
            super().emit(record)


def start_log_files() -> None:
    """The run passed its checks: open the deferred log files and write what they held."""
    for handler in list(DeferredFileHandler._instances):
        handler.start()

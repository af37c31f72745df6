"""``progress=auto``: a bar on an interactive terminal, plain log lines in batch and Slurm jobs."""

from __future__ import annotations

import io
import sys

import pytest

from xtc_lightning.callbacks import want_progress_bar


class Terminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("progress", "tty", "slurm_job", "bar"),
    [
        ("auto", True, None, True),
        ("auto", True, "1234", False),  # an srun/sbatch job: its output goes to a log file
        ("auto", False, None, False),
        ("bar", False, "1234", True),
        ("plain", True, None, False),
    ],
)
def test_progress_bar_only_on_an_interactive_terminal_outside_slurm(
    progress, tty, slurm_job, bar, monkeypatch
):
    monkeypatch.setattr(sys, "stderr", Terminal(tty))
    if slurm_job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", slurm_job)
    assert want_progress_bar(progress) is bar

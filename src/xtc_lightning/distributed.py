"""Which process writes: the pipeline runs in every data-parallel process, only rank 0 writes files.

Under ``trainer=ddp``/``ddp_cpu`` Lightning starts the other ranks by re-running ``train.py``
(with the run folder fixed) at the first ``Trainer.fit``; under Slurm's ``srun`` every task is
started by Slurm. Every rank trains and evaluates (gradients and dev predictions are
exchanged); rank 0 alone writes results, predictions, caches and the export, and the others
wait at a barrier where they need what it wrote (a published teacher, say).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def is_rank_zero() -> bool:
    """Lightning's global rank: from the environment (RANK, LOCAL_RANK, SLURM_PROCID) until a
    Trainer sets up the process group, then the group's rank."""
    return rank_zero_only.rank == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group, i.e. in a one-process run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish() -> None:
    """End of training: every rank meets, then tears the process group down, before rank 0 writes
    results and the export alone (no collective timeout can cut a long export short). A rank
    that exits while the group is alive can abort in its C++ destructors ("terminate called
    without an active exception") and fail the job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

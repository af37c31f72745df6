#!/bin/bash
# One XTC run as a Slurm batch job, without the Hydra launcher. From the repository root:
#   sbatch scripts/sbatch_example.sh trainer=ddp_cpu task=mrpc student=l3
#   sbatch --gpus-per-node=4 --ntasks-per-node=4 scripts/sbatch_example.sh trainer=ddp task=mnli
# Arguments are Hydra overrides for train.py. sbatch options on the command line override the
# #SBATCH lines below; keep --ntasks-per-node equal to the devices per node (the srun line
# passes Slurm's task counts to Lightning, whose SLURMEnvironment takes every rank from Slurm).
#SBATCH --job-name=xtc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
# Requeue: 90 s before the time limit (or on preemption with `scancel --signal=USR1`), Lightning
# saves <run dir>/<stage>/hpc_ckpt_N.ckpt and requeues the job; it restarts with the same job id,
# so in the same run folder runs/<name>/slurm-<job id>, and resumes from that checkpoint.
#SBATCH --signal=USR1@90
#SBATCH --requeue
# A requeued job appends to its log instead of truncating it.
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

# The repository's environment (`make install`), else whatever `python` is on PATH.
if [[ -f .venv/bin/activate ]]; then
	# shellcheck source=/dev/null
	source .venv/bin/activate
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
	"$SLURM_NNODES node(s) x $SLURM_NTASKS_PER_NODE task(s)"

# --label prefixes every output line with its task (= global rank).
# (`++`: trainer=cpu has no num_nodes key; the ddp trainers have.)
srun --label python train.py trainer.devices="$SLURM_NTASKS_PER_NODE" ++trainer.num_nodes="$SLURM_NNODES" "$@"

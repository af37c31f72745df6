"""Slurm, for real: a one-node cluster started by ``scripts/slurm-cluster.sh`` (munged, MariaDB,
slurmdbd, slurmctld, slurmd), the submitit launcher, an srun DDP job and a requeue that resumes.

The cluster tests are marked ``slurm``. The cluster is reused when it is up (``.ci/run`` starts it), else started here
and stopped after the session; without root (or without the Debian packages and a way to
install them) these tests are skipped, unless ``XTC_REQUIRE_SLURM=1`` (set by ``.ci/run``)
makes that a failure. Every test has its own run root, so its own submitit folder: job ids
restart at 1 when the cluster's state folder is wiped.

The two commands of the README's local-cluster block are run as written, with two overrides
appended: the tiny random BERT (seconds instead of minutes) and the test's run root.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

CLUSTER = REPO / "scripts" / "slurm-cluster.sh"


def _unavailable(reason: str) -> None:
    if os.environ.get("XTC_REQUIRE_SLURM") == "1":
        pytest.fail(f"the local Slurm cluster is required (XTC_REQUIRE_SLURM=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_conf() -> str:
    """SLURM_CONF of the local cluster: reused when up, else started (as root) for this session."""
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    if not was_up and os.geteuid() != 0:
        _unavailable("the local Slurm cluster is not up and starting it needs root")
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        _unavailable(f"scripts/slurm-cluster.sh up failed: {up.stderr.strip()[-2000:]}")
    match = re.fullmatch(r"export SLURM_CONF=(\S+)", up.stdout.strip())
    assert match, up.stdout
    yield match.group(1)
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], check=True, timeout=120)


@pytest.fixture
def slurm_env(slurm_conf, glue_dir) -> dict[str, str]:
    """The environment jobs inherit (sbatch exports it): this Python first on PATH, the cluster's
    config, the GLUE copy; no SLURM_* variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["SLURM_CONF"] = slurm_conf
    env["GLUE_DIR"] = str(glue_dir)
    return env


def readme_command(start: str) -> list[str]:
    """The command line of the README's local-cluster block (under "### A local Slurm cluster") that
    starts with ``start``."""
    section = REPO.joinpath("README.md").read_text().split("### A local Slurm cluster", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith(start)]
    assert len(lines) == 1, f"expected one line starting with {start!r} in the README block, found {lines}"
    return shlex.split(lines[0], comments=True)


def slurm(env: dict, *args: str) -> str:
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=60).stdout


def sacct_states(env: dict, job_id: str, timeout: float = 60) -> dict[str, str]:
    """Slurm's accounting record of each job of ``job_id`` (an array: each task), once none runs:
    a job's result file is written a moment before Slurm marks the job done."""
    deadline = time.monotonic() + timeout
    while True:
        out = slurm(env, "sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State")
        states = dict(line.split("|") for line in out.split())
        if time.monotonic() > deadline or not {"RUNNING", "COMPLETING", "PENDING"} & set(states.values()):
            return states
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], (2, 4, 4)),
        (["hydra/launcher=slurm", "trainer=gpu"], (1, 1, 1)),
        (["hydra/launcher=slurm_cpu", "trainer=ddp_cpu"], (1, 2, None)),
        (["hydra/launcher=slurm_cpu"], (1, 1, None)),
    ],
)
def test_launcher_asks_one_task_per_device(overrides, expected):
    """Nodes, tasks per node and GPUs per node follow the trainer; the requeue signal is Lightning's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xtc_lightning.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == expected
    assert launcher.additional_parameters == {"signal": "USR1@90", "requeue": True}
    assert launcher.max_num_timeout == 0


@pytest.mark.slurm
def test_multirun_through_the_submitit_launcher(tmp_path, slurm_env, tiny_bert_dir):
    """Two pipeline runs as a Slurm job array; both finish with results.json and accounting saw them."""
    cmd = readme_command("python train.py -m")
    cmd = [sys.executable, *cmd[1:], f"model.name_or_path={tiny_bert_dir}", f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = {}
    for path in (tmp_path / "runs" / "debug").glob("*/multirun-*/*/results.json"):
        r = json.loads(path.read_text())
        results[r["task"]] = (path.parent, r)
    assert sorted(results) == ["mrpc", "rte"]
    for run_dir, r in results.values():
        assert r["final_stage"] == "quantize"
        assert r["stages"]["quantize"]["cluster_environment"] == "SLURMEnvironment"
        assert r["stages"]["quantize"]["world_size"] == 1
        assert 0.0 <= r["score"] <= 1.0
        assert (run_dir / "export" / "model.safetensors").is_file()
    # Job nums 0 and 1 of one array, both COMPLETED in Slurm's accounting.
    assert sorted(run_dir.name for run_dir, _ in results.values()) == ["0", "1"]
    (array_dir,) = (tmp_path / "runs" / "debug").glob("*/multirun-*/.submitit/*_0")
    array_id = array_dir.name.split("_")[0]
    # The batch script submitit wrote: Lightning's requeue signal only, one task per device.
    sbatch_lines = set((array_dir.parent / array_id / f"{array_id}_submission.sh").read_text().splitlines())
    assert {"#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"} <= sbatch_lines
    assert not any("USR2" in line for line in sbatch_lines)
    assert sacct_states(slurm_env, array_id) == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}


@pytest.mark.slurm
def test_ddp_job_takes_its_ranks_from_slurm(tmp_path, slurm_env, tiny_bert_dir):
    """scripts/sbatch_example.sh: two srun tasks = two DDP ranks whose ranks Lightning reads from Slurm."""
    cmd = readme_command("sbatch")
    script = cmd.index("scripts/sbatch_example.sh")
    log_pattern = str(tmp_path / "slurm-%j.out")
    cmd = [
        *cmd[:script],
        f"--output={log_pattern}",
        *cmd[script:],
        f"model.name_or_path={tiny_bert_dir}",
        f"paths.root_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=600)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert proc.returncode == 0, log[-4000:]
    # Every rank waits for rank 0's export and tears its process group down before exiting.
    assert "terminate called" not in log, log[-4000:]

    # srun --label prefixes each line with the Slurm task; each task is one DDP rank.
    assert re.search(r"^0: .*Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2$", log, re.M), log[-4000:]
    assert re.search(r"^1: .*Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2$", log, re.M), log[-4000:]
    # Lightning chose SLURMEnvironment (it alone installs the auto-requeue handlers) in both tasks.
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*SLURM auto-requeueing enabled", log, re.M), log[-4000:]
    # The run folder is keyed on the job id.
    run_dir = next((tmp_path / "runs" / "debug").glob(f"*/slurm-{job_id}"))  # debug=fast
    r = json.loads((run_dir / "results.json").read_text())
    assert r["task"] == "rte" and r["final_stage"] == "quantize"
    for stage in ("teacher", "quantize"):
        assert r["stages"][stage]["world_size"] == 2
        assert r["stages"][stage]["cluster_environment"] == "SLURMEnvironment"
    assert sacct_states(slurm_env, job_id) == {job_id: "COMPLETED"}


def wait_until(what: str, condition, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text() if log.is_file() else "(no job log yet)"
            pytest.fail(f"gave up waiting for {what}; launcher exit {proc.poll()}; job log:\n{text[-4000:]}")
        time.sleep(0.5)


@pytest.mark.slurm
def test_requeued_job_resumes_from_its_checkpoints(tmp_path, slurm_env, tiny_bert_dir):
    """A launcher job interrupted twice: by the time-limit signal (SIGUSR1: Lightning saves an hpc
    checkpoint and requeues) and by `scontrol requeue` (no signal to save on: the newest
    last.ckpt). Each restart finds its run folder, resumes, and the run finishes."""
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm_cpu",
        f"model.name_or_path={tiny_bert_dir}",
        f"paths.root_dir={tmp_path}",
        "task=rte",
        "stage=teacher",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=5",
        "checkpoint.every_n_train_steps=40",
        "num_threads=1",
    ]
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    job_id = None
    try:
        # One job, so no array: the job's files are under <sweep dir>/.submitit/<job id>/.
        runs = tmp_path / "runs" / "rte-teacher-w1a8"
        wait_until(
            "the job log",
            lambda: any(runs.glob("multirun-*/.submitit/*/*_0_log.out")),
            120,
            launcher,
            Path("-"),
        )
        (log,) = runs.glob("multirun-*/.submitit/*/*_0_log.out")
        job_id = log.parent.name
        run_dir = log.parents[2] / "0"
        stage_dir = run_dir / "teacher"

        def logged(pattern: str, count: int = 1):
            return lambda: log.is_file() and len(re.findall(pattern, log.read_text(), re.M)) >= count

        # 1. The time-limit signal, mid-training, well before the first last.ckpt (step 40): the
        # restart must take the hpc checkpoint (the newest checkpoint of the stage is taken).
        wait_until("training", logged(r"teacher epoch 0 step 5/"), 180, launcher, log)
        slurm(slurm_env, "scancel", "--signal=USR1", job_id)
        wait_until("the hpc checkpoint", lambda: (stage_dir / "hpc_ckpt_1.ckpt").is_file(), 60, launcher, log)
        wait_until(
            "the first restart", logged(r"teacher: resuming from .*hpc_ckpt_1\.ckpt"), 180, launcher, log
        )

        # 2. A requeue without a signal (as on preemption), once a last.ckpt is newer than the hpc one.
        hpc_time = (stage_dir / "hpc_ckpt_1.ckpt").stat().st_mtime
        last = stage_dir / "checkpoints" / "last.ckpt"
        wait_until(
            "a newer last.ckpt",
            lambda: last.is_file() and last.stat().st_mtime > hpc_time,
            120,
            launcher,
            log,
        )
        slurm(slurm_env, "scontrol", "requeue", job_id)
        wait_until("the second restart", logged(r"teacher: resuming from .*last\.ckpt"), 180, launcher, log)

        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            if job_id:
                subprocess.run(["scancel", job_id], env=slurm_env)
    text = log.read_text()
    assert launcher.returncode == 0, err[-3000:] + text[-3000:]

    assert "Handling auto-requeue signal" in text and f"Requeued SLURM job: {job_id}" in text
    # Both restarts continued mid-stage: no third start from step 0 (the first attempt logged step 5 once).
    assert len(re.findall(r"teacher epoch 0 step 5/", text)) == 1
    assert "Restarts=2" in slurm(slurm_env, "scontrol", "show", "job", job_id)
    r = json.loads((run_dir / "results.json").read_text())
    assert r["final_stage"] == "teacher"
    assert Path(r["stages"]["teacher"]["resumed_from"]).name == "last.ckpt"
    assert sacct_states(slurm_env, job_id) == {job_id: "COMPLETED"}

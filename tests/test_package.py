"""The built wheel is a working tool: its configs are inside it, and ``xtc-train`` runs outside the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_the_wheel_ships_the_configs_and_runs_outside_the_repo(tmp_path, glue_dir, tiny_bert_dir):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("src", "conf"):
        shutil.copytree(
            REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("*.egg-info")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("xtc_lightning-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"  # no conf/ here, and the repository's src is not importable
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "GLUE_DIR": str(glue_dir)}
    xtc_train = [sys.executable, str(site / "bin" / "xtc-train")]
    proc = subprocess.run(
        [*xtc_train, "task=rte", "--cfg", "job"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: rte" in proc.stdout and "_target_: lightning.pytorch.loggers.CSVLogger" in proc.stdout
    where = [sys.executable, "-c", "import xtc_lightning.cli as c; print(c.CONF_DIR)"]
    conf_dir = Path(
        subprocess.run(where, cwd=elsewhere, env=env, capture_output=True, text=True).stdout.strip()
    )
    assert conf_dir == site / "xtc_lightning" / "conf" and not conf_dir.is_symlink()
    assert len(list(conf_dir.rglob("*.yaml"))) == len(list((REPO / "conf").rglob("*.yaml")))

    run = [*xtc_train, "task=rte", "stage=teacher", "debug=fast", f"model.name_or_path={tiny_bert_dir}"]
    proc = subprocess.run([*run, "num_threads=2"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = elsewhere.glob("runs/debug/rte-teacher-w1a8/*/results.json")  # debug runs apart
    results = json.loads(results.read_text())
    assert results["final_stage"] == "teacher" and results["limited"] is True
    assert results["limits"] == {"fast_dev_run": True}
    # one dev batch of data.eval_batch_size (64) was scored, of RTE's 277 dev rows
    assert results["data"]["dev_examples"] == 277 and results["data"]["dev_scored"] == {"dev": 64}
    assert (elsewhere / "cache" / "teachers").is_dir()

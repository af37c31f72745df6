"""Sweeps: every wandb sweep point composes with Hydra and one point per sweep runs; `make sweep`
and the Hydra multirun over hparams_search run for real (tiny BERT, debug=fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose_job_config, readme_commands, train_command
from xtc_lightning import pipeline
from xtc_lightning.cli import check_group_overrides
from xtc_lightning.errors import UserError
from xtc_lightning.results import read_record
from xtc_lightning.sweeps import grid_overrides

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
AGENT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def sweep_points(sweep: dict) -> list[dict]:
    """Every grid point; for random/bayes, every listed value and both ends of every range (one
    parameter at a time, the others at their first choice)."""
    choices = {
        key: [spec["value"]] if "value" in spec else spec.get("values") or [spec["min"], spec["max"]]
        for key, spec in sweep["parameters"].items()
    }
    if sweep["method"] == "grid":
        points = [{}]
        for key, values in choices.items():
            points = [{**p, key: v} for p in points for v in values]
        return points
    base = {key: values[0] for key, values in choices.items()}
    return [base] + [{**base, key: v} for key, values in choices.items() for v in values[1:]]


def agent_args(sweep: dict, point: dict) -> list[str]:
    """What the wandb agent runs: ${args_no_hyphens} (key=value), then the command's literals."""
    literals = [a for a in sweep["command"] if not a.startswith("${")]
    return [f"{k}={v}" for k, v in point.items()] + literals


def test_there_are_a_grid_and_a_bayes_sweep():
    assert sorted(load(p)["method"] for p in SWEEPS) == ["bayes", "grid"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_composes(path, tmp_path):
    sweep = load(path)
    assert sweep["program"] == "train.py" and (REPO / sweep["program"]).is_file()
    assert sweep["command"][:4] == AGENT_COMMAND
    assert sweep["metric"] == {"name": "score", "goal": "maximize"}  # the summary key (test_wandb)
    points = sweep_points(sweep)
    assert len(points) == (30 if sweep["method"] == "grid" else 6)
    for point in points:
        args = agent_args(sweep, point)
        check_group_overrides(args)
        cfg, choices = compose_job_config(args, tmp_path)
        OmegaConf.resolve(cfg)
        for key, value in point.items():
            assert choices.get(key, OmegaConf.select(cfg, key)) == value, (key, value)
        assert cfg.logger.wandb.offline is False  # agents report to the server


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_one_point_of_each_sweep_runs_a_fast_dev_run(path, tmp_path, glue_dir, tiny_bert12_dir):
    sweep = load(path)
    point = sweep_points(sweep)[-1]
    args = agent_args(sweep, point) + [
        f"model.name_or_path={tiny_bert12_dir}", "debug=fast", f"data.dir={glue_dir}",
        f"paths.root_dir={tmp_path}", "logger.wandb.offline=true",  # no wandb server in tests
    ]  # fmt: skip
    cfg, _ = compose_job_config(args, tmp_path / "run")
    results = pipeline.run(cfg)
    assert results["task"] == point["task"] and (tmp_path / "run" / "results.json").is_file()
    assert list(tmp_path.glob("run/wandb/offline-run-*/run-*.wandb"))


def test_readme_sweep_commands(tmp_path, glue_dir, tiny_bert_dir):
    """The README's five lines: the three local ones run as written (plus a tiny model, debug=fast,
    this venv and a two-point copy of the grid file); the two wandb ones name real files/projects."""
    multirun, latent_lr, _, make, create, agent = readme_commands("## Running a sweep")  # optuna: below
    tiny = [f"model.name_or_path={tiny_bert_dir}", "debug=fast", "num_threads=2"]
    env = {**os.environ, "GLUE_DIR": str(glue_dir)}

    assert multirun[:3] == ["python", "train.py", "-m"]
    root = tmp_path / "multirun"
    cmd = [sys.executable, *multirun[1:], *tiny, f"paths.root_dir={root}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(root.glob("runs/debug/*/multirun-*/*/results.json"))
    assert sorted(OmegaConf.load(p.parent / "config_resolved.yaml").optim.lr for p in runs) == [
        2e-5,
        5e-5,
        1e-4,
    ]

    # the latent weights' lr alone: the teacher and the fp32 student train once, then come from the cache
    assert latent_lr[:4] == ["python", "train.py", "-m", "hparams_search=latent_lr"]
    root = tmp_path / "latent_lr"
    cmd = [sys.executable, *latent_lr[1:], *tiny, "student.num_layers=1", f"paths.root_dir={root}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = list(root.glob("runs/debug/*/multirun-*/*/results.json"))
    points = [read_record(p, p.parent) for p in paths]
    lrs = [OmegaConf.load(p.parent / "config_resolved.yaml").recipe.latent_lr for p in paths]
    assert sorted(lrs) == [5e-4, 1e-3, 2e-3]
    assert all(r["task"] == "stsb" and r["stages"]["quantize"]["bits"]["weights"] == 1 for r in points)
    for stage in ("teacher", "reduce"):
        assert sorted(bool(r["stages"][stage].get("cached")) for r in points) == [False, True, True]

    assert (
        make[:2] == ["make", "sweep"] and make[2] == "SWEEP=sweeps/grid.yaml" and make[3].startswith("ARGS=")
    )
    grid = tmp_path / "grid.yaml"
    sweep = load(REPO / "sweeps" / "grid.yaml")
    sweep["parameters"] = {"task": {"values": ["rte", "mrpc"]}, "quant": {"value": "binary"}}
    grid.write_text(yaml.safe_dump(sweep))
    root = tmp_path / "make"
    args = " ".join([make[3].removeprefix("ARGS="), *tiny, f"paths.root_dir={root}"])
    cmd = [*make[:2], f"SWEEP={grid}", f"ARGS={args}", f"VENV={sys.prefix}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [read_record(p, p.parent) for p in root.glob("runs/debug/*/multirun-*/*/results.json")]
    assert sorted(r["task"] for r in results) == ["mrpc", "rte"]
    assert all(r["stages"]["quantize"]["bits"]["weights"] == 1 for r in results)
    assert all(
        list((Path(r["run_dir"]) / "wandb").glob("offline-run-*")) for r in results
    )  # the file's logger

    assert create[:2] == ["wandb", "sweep"] and (REPO / create[2]).is_file()
    assert agent[:2] == ["wandb", "agent"] and agent[2].split("/")[1] == "xtc-lightning"
    assert OmegaConf.load(REPO / "conf" / "logger" / "wandb.yaml").wandb.project == "xtc-lightning"


def test_a_bayes_sweep_is_refused_by_make_sweep_in_one_line():
    with pytest.raises(
        UserError, match=r"method 'bayes' needs a wandb server: wandb sweep sweeps/bayes.yaml"
    ):
        grid_overrides("sweeps/bayes.yaml")
    assert grid_overrides(REPO / "sweeps" / "grid.yaml")[:3] == [
        "task=cola,sst2,mrpc,stsb,rte", "quant=binary,ternary", "student=teacher,l4,l3",
    ]  # fmt: skip


def test_sweep_list_values_become_hydra_overrides_that_compose(tmp_path):
    """``values: [[1,3,5],[0,2,4]]`` is one sweep over two lists, and each point composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = {
        "method": "grid",
        "parameters": {
            "student.layers": {"values": [[1, 3, 5], [0, 2, 4]]},
            "quantize.lr": {"values": [1e-5, 0.5]},
            "data.dir": {"value": "/data/my glue"},
        },
        "command": ["${env}", "${program}", "${args_no_hyphens}", "logger=csv"],
    }
    path = tmp_path / "lists.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    overrides = grid_overrides(path)
    assert overrides == [
        "student.layers=[1,3,5],[0,2,4]", "quantize.lr=1e-05,0.5", "data.dir='/data/my glue'", "logger=csv",
    ]  # fmt: skip
    check_group_overrides(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert list(parsed[0].sweep_iterator()) == [[1, 3, 5], [0, 2, 4]]
    assert list(parsed[1].sweep_iterator()) == [1e-5, 0.5] and parsed[2].value() == "/data/my glue"
    for layers in parsed[0].sweep_iterator():
        cfg, _ = compose_job_config([f"student.layers=[{','.join(map(str, layers))}]"], tmp_path)
        assert list(cfg.student.layers) == layers


def test_a_multirun_with_choice_glob_and_a_logger_list_runs(tmp_path, glue_dir, tiny_bert_dir):
    """Hydra's full grammar on the command line: choice() and glob() sweeps, both loggers kept."""
    args = [
        "task=choice(rte,mrpc)", "quant=glob(bin*,exclude=*_qk2)", "logger=[csv,wandb]", "stage=teacher",
        f"model.name_or_path={tiny_bert_dir}", "debug=limit", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",  # not fast_dev_run: it turns the loggers off
    ]  # fmt: skip
    cmd, env = train_command(args, tmp_path, glue_dir)
    cmd.insert(2, "-m")  # after train.py, before the overrides
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("runs/debug/*/multirun-*/*/results.json"))
    assert sorted(json.loads(p.read_text())["task"] for p in runs) == ["mrpc", "rte"]
    for p in runs:
        assert (p.parent / "logs" / "teacher" / "metrics.csv").is_file()
        assert list(p.parent.glob("wandb/offline-run-*/run-*.wandb"))


def test_optuna_search_runs_two_trials_offline(tmp_path, glue_dir, tiny_bert_dir):
    """hparams_search=optuna: a local TPE search over sweeps/bayes.yaml's space maximizing `score`."""
    bayes = load(REPO / "sweeps" / "bayes.yaml")["parameters"]
    readme = readme_commands("## Running a sweep")[2]  # as written, plus a tiny model and 2 trials
    assert readme[:4] == ["python", "train.py", "-m", "hparams_search=optuna"]
    tiny = [f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "debug=fast"]
    args = [*readme[3:], "hydra.sweeper.n_trials=2", *tiny]
    cmd, env = train_command(args, tmp_path, glue_dir)
    cmd.insert(2, "-m")
    env["WANDB_MODE"] = "disabled"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("runs/debug/*/multirun-*")
    trials = sorted(sweep_dir.glob("*/results.json"))
    assert [p.parent.name for p in trials] == ["0", "1"]
    scores, points = [], []
    for path in trials:
        scores.append(json.loads(path.read_text())["score"])
        cfg = OmegaConf.load(path.parent / "config_resolved.yaml")
        point = {key: OmegaConf.select(cfg, key) for key, spec in bayes.items() if "min" in spec}
        for key, value in point.items():
            assert bayes[key]["min"] <= value <= bayes[key]["max"], (key, value)
        points.append(point)
    assert len(points[0]) == 5 and points[0] != points[1]  # the same five parameters, two samples
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == max(scores) and set(best.best_params) == set(points[0])

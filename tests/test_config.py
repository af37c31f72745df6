"""Every config group value composes, with every task, and bad group values fail in one line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose_job_config
from xtc_lightning.cli import CONF_DIR, check_group_overrides
from xtc_lightning.errors import UserError
from xtc_lightning.tasks import TASKS

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def compose_resolved(overrides: list[str], tmp_path):
    cfg, choices = compose_job_config(overrides, tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation of the job's config resolves
    return cfg, choices


def group_values():
    for group in GROUPS:
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, option.stem


@pytest.mark.parametrize(("group", "value"), list(group_values()))
def test_every_group_value_composes(group, value, tmp_path):
    _, choices = compose_resolved([f"{group}={value}"], tmp_path)
    assert choices[group] == value


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_composes_with_the_defaults(task, tmp_path):
    cfg, _ = compose_resolved([f"task={task}"], tmp_path)
    assert cfg.task.name == task
    assert cfg.name.startswith(task)


def test_config_groups_match_the_task_table():
    assert sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")) == sorted(TASKS)


def test_unknown_group_value_names_value_and_choices():
    with pytest.raises(UserError, match=r"unknown task 'sst3'; choose one of: .*sst2"):
        check_group_overrides(["task=sst3"])
    with pytest.raises(UserError, match=r"unknown trainer 'tpu'"):
        check_group_overrides(["trainer=tpu"])
    # plain keys, multirun lists of valid values and null placeholders pass
    check_group_overrides(["trainer.max_epochs=1", "task=rte,mrpc", "experiment=null", "+foo=1"])

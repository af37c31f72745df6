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


HYDRA_FORMS = [
    "logger=[csv,wandb]", "quant=glob(*)", "quant=glob(*,exclude=fp32)", "task=choice(rte,mrpc)",
    "task=rte,mrpc", "logger=choice([csv,wandb],csv)", "trainer.max_epochs=range(1,3)",
    "student.layers=[1,3,5],[0,2,4]", "optim.lr=interval(1e-5,1e-3)", "~debug", "hydra/launcher=slurm",
]  # fmt: skip


@pytest.mark.parametrize("arg", HYDRA_FORMS)
def test_every_form_of_hydras_grammar_passes_the_check(arg):
    check_group_overrides([arg])


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("logger=[csv,wandbx]", r"^unknown logger 'wandbx'; choose one of: csv, wandb$"),
        ("task=choice(rte,mrpx)", r"^unknown task 'mrpx'; choose one of: cola, .*, wnli$"),
        ("task=rte,sst3", r"^unknown task 'sst3'"),
        (
            "quant=glob(zz*)",
            r"^quant glob\(zz\*\) matches none of: binary, binary_qk2, fp32, ternary, w4a8, w8a8$",
        ),
        ("task=interval(0,1)", r"^task takes option names, not interval\(0,1\); choose one of: cola"),
        ("task=1", r"^unknown task '1'"),
        ("task=[rte", r"^cannot parse override 'task=\[rte': no viable alternative at input '\[rte'"),
    ],
)
def test_unknown_values_in_any_form_fail_in_one_line(arg, message):
    with pytest.raises(UserError, match=message) as err:
        check_group_overrides([arg])
    assert "\n" not in str(err.value)


def test_a_logger_list_composes_both_loggers(tmp_path):
    from xtc_lightning.loggers import stage_loggers

    cfg, _ = compose_resolved(["logger=[csv,wandb]"], tmp_path)
    assert list(cfg.logger) == ["csv", "wandb"]
    loggers = stage_loggers(OmegaConf.to_container(cfg.logger), "teacher", tmp_path)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "WandbLogger"]

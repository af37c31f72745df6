"""Every command the README shows is checked: `python train.py` lines compose (the overrides pass
the one-line check and Hydra builds the job config), `xtc-*` lines are console scripts whose
arguments parse, `make` lines name Makefile targets, and the rest are run by the tests named in
ELSEWHERE. The Python example runs in tests/test_export.py."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import REPO, compose_job_config
from xtc_lightning.cli import check_group_overrides

README = (REPO / "README.md").read_text()
# Lines run as written (plus test-sized overrides) by other tests.
ELSEWHERE = {
    "wandb": "test_sweeps.py::test_readme_sweep_commands (names a real sweep file and project)",
    "sbatch": "test_slurm.py (pytest -m slurm)",
    "eval": "test_slurm.py (pytest -m slurm)",
    "scripts/slurm-cluster.sh": "test_slurm.py (pytest -m slurm)",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def commands() -> list[list[str]]:
    return [
        shlex.split(line, comments=True) for b in blocks("bash") for line in b.splitlines() if line.strip()
    ]


def by_program(program: str) -> list[list[str]]:
    return [c for c in commands() if c[0] == program]


def test_every_command_is_of_a_checked_kind():
    checked = {
        "python",
        "make",
        "xtc-train",
        "xtc-export",
        "xtc-evaluate",
        "xtc-predict",
        "xtc-report",
        *ELSEWHERE,
    }
    assert {c[0] for c in commands()} <= checked
    assert len(commands()) == 36  # a new README command lands here: check it above


def first_point(override: str) -> str:
    """A multirun sweep override (``task=rte,mrpc``) as its first point (``task=rte``)."""
    (parsed,) = OverridesParser.create().parse_overrides([override])
    if not parsed.is_sweep_override():
        return override
    return f"{parsed.get_key_element()}={next(parsed.sweep_string_iterator())}"


@pytest.mark.parametrize("cmd", [c for c in by_program("python")], ids=shlex.join)
def test_train_commands_compose(cmd, tmp_path):
    assert cmd[1] == "train.py"
    overrides = [a for a in cmd[2:] if a != "-m"]
    check_group_overrides(overrides)
    cfg, _ = compose_job_config([first_point(a) for a in overrides], tmp_path)
    OmegaConf.resolve(cfg)


def test_make_commands_are_targets():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    assert {c[1] for c in by_program("make")} <= targets


@pytest.mark.parametrize("cmd", [c for c in commands() if c[0].startswith("xtc-")], ids=shlex.join)
def test_console_commands_parse_their_arguments(cmd, tmp_path, monkeypatch, capsys):
    """The placeholder paths (runs/<...>) do not exist: the tool gets past argument parsing and
    stops with its one `error:` line about the path (argparse would print `usage:`)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts[cmd[0]].split(":")
    main = getattr(__import__(module, fromlist=[func]), func)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(cmd[1:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err

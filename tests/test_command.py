"""The ``xtc`` command: every subcommand reaches its tool, in-process through the console entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from xtc_lightning.command import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]

# what each subcommand's own --help says first: argparse's usage line, or Hydra's app help (its
# header names the job: "train" from the command line, the entry module "cli" under pytest)
HELP_START = {
    "train": "",
    "export": "usage: xtc-export [-h]",
    "evaluate": "usage: xtc-evaluate [-h]",
    "predict": "usage: xtc-predict [-h]",
    "report": "usage: xtc-report [-h]",
    "sweep": "usage: xtc sweep [-h]",
}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``xtc <argv>``."""
    from hydra.core.global_hydra import GlobalHydra

    code = 0
    try:
        main(argv)
    except SystemExit as exit:
        code = exit.code
    finally:
        GlobalHydra.instance().clear()  # `xtc train --help` leaves Hydra initialized in this process
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_subcommand(capsys):
    code, out, err = run(["--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: xtc <subcommand> [arguments]")
    listed = [line.split()[0] for line in out.split("subcommands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == ["train", "export", "evaluate", "predict", "report", "sweep"]


def test_no_subcommand_is_usage_and_exit_2(capsys):
    code, out, err = run([], capsys)
    assert (code, out) == (2, "") and err.startswith("usage: xtc <subcommand>")


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_subcommand_help(name, capsys):
    code, out, err = run([name, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(HELP_START[name]), out[:200]
    if name == "train":
        assert out.splitlines()[0].endswith(" is powered by Hydra.")
        assert (
            "\nquant: binary, binary_qk2, fp32, ternary, w4a8, w8a8\n" in out
        )  # the config groups it composes


def test_unknown_subcommand_is_one_error_line(capsys):
    code, out, err = run(["trian", "task=rte"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "error: unknown subcommand 'trian'; choose one of: train, export, evaluate, predict, report, sweep\n"
    )


def test_user_error_inside_a_subcommand_is_one_line(capsys, tmp_path):
    code, out, err = run(["export", str(tmp_path)], capsys)
    assert (code, out) == (2, "")
    assert err == f"error: {tmp_path} is not a finished run folder: results.json is missing\n"


def test_train_checks_overrides_before_hydra(capsys):
    code, out, err = run(["train", "quant=binry"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: unknown quant 'binry'; choose one of: ") and err.count("\n") == 1


def test_sweep_print_is_the_grid_plus_extra_overrides(capsys):
    from xtc_lightning.sweeps import grid_overrides

    grid = REPO / "sweeps" / "grid.yaml"
    code, out, err = run(["sweep", str(grid), "trainer.max_epochs=1", "--print"], capsys)
    assert (code, err) == (0, "")
    assert out == " ".join([*grid_overrides(grid), "trainer.max_epochs=1"]) + "\n"
    code, out, err = run(["sweep", str(REPO / "sweeps" / "bayes.yaml")], capsys)
    assert code == 2 and err.startswith("error: ") and "needs a wandb server" in err

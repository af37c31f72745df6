"""The ``xtc`` command: one console script, one subcommand per tool.

``xtc <subcommand> [arguments]`` hands the arguments to that tool's own entry function, so
``xtc train task=rte`` is ``python train.py task=rte`` (Hydra overrides, ``-m``, ``--help``,
...), ``xtc export RUN_DIR`` is ``xtc-export RUN_DIR`` and so on; ``xtc <subcommand> --help``
is the tool's own help. ``xtc sweep FILE [overrides]`` runs a wandb grid sweep file as a local
Hydra multirun (what ``make sweep`` does). The old names (``xtc-train``, ``xtc-export``,
``xtc-evaluate``, ``xtc-predict``, ``xtc-report``, ``python train.py``) call the same functions.

Every tool reports a ``UserError`` the same way (``errors.entry_point``): one ``error: ...``
line on stderr, exit code 2; an unknown subcommand is one of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xtc_lightning.errors import UserError, entry_point

# subcommand: (module, one-line summary); each module has main(argv: list[str] | None)
SUBCOMMANDS = {
    "train": ("xtc_lightning.cli", "run the XTC pipeline (Hydra overrides: task=rte quant=binary ...)"),
    "export": ("xtc_lightning.export.run", "export a finished run's model as a packed low-bit file"),
    "evaluate": ("xtc_lightning.export.evaluate", "dev metrics of a packed model file, from the file alone"),
    "predict": (
        "xtc_lightning.predictions",
        "GLUE test-set predictions (submission format) of a packed model",
    ),
    "report": ("xtc_lightning.report", "paper-style table and score-vs-size figures from run folders"),
    "sweep": ("xtc_lightning.command", "run a wandb grid sweep file as a local Hydra multirun"),
}


def usage() -> str:
    """The text of ``xtc --help``: the usage line and one line per subcommand."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return (
        "usage: xtc <subcommand> [arguments]\n\n"
        "XTC extreme compression of BERT-style encoders.\n\nsubcommands:\n"
        + "\n".join(lines)
        + "\n\n'xtc <subcommand> --help' gives a subcommand's own options.\n"
    )


def sweep_main(argv: list[str] | None = None) -> None:
    """``xtc sweep FILE [overrides]``: the grid of a wandb sweep file (``sweeps.grid_overrides``)
    plus the extra overrides, run by ``xtc train -m``; ``--print`` only prints those overrides."""
    from xtc_lightning import cli
    from xtc_lightning.sweeps import grid_overrides

    parser = argparse.ArgumentParser(
        prog="xtc sweep", description="Run a wandb grid sweep file as a local Hydra multirun."
    )
    parser.add_argument("sweep_file", help="a wandb sweep file with method: grid (e.g. sweeps/grid.yaml)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, appended to the grid's")
    parser.add_argument("--print", action="store_true", help="print the multirun overrides, run nothing")
    args = parser.parse_args(argv)
    overrides = grid_overrides(args.sweep_file) + args.overrides
    if args.print:
        print(" ".join(overrides))
        return
    cli.main(["-m", *overrides])


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand's entry function."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UserError(f"unknown subcommand '{name}'; choose one of: {', '.join(SUBCOMMANDS)}")
    if name == "sweep":
        sweep_main(rest)
        return
    importlib.import_module(SUBCOMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    main()

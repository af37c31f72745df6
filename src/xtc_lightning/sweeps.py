"""A wandb sweep file's grid as Hydra multirun overrides: ``make sweep`` without a wandb server.

``python -m xtc_lightning.sweeps sweeps/grid.yaml`` prints ``task=cola,sst2,... quant=...``
plus the sweep command's own literal overrides (``logger=wandb`` ..., offline here); the
Makefile passes them to ``train.py -m`` (Hydra's basic sweeper runs the product). Only grid
sweeps translate: a Bayesian one needs the wandb server's controller.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from xtc_lightning.errors import UserError, entry_point

# literal command arguments that only make sense with a wandb server
SERVER_ONLY = ("logger.wandb.offline=false",)


def hydra_value(value) -> str:
    """One sweep value in Hydra's override grammar: lists as ``[1,3,5]`` (no spaces: the Makefile
    splits the overrides on them), booleans ``true``/``false``, ``None`` as ``null``, numbers as
    Python prints them, and strings Hydra would not read back as the same string single-quoted."""
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_./:+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def grid_overrides(sweep_file: str | Path) -> list[str]:
    path = Path(sweep_file)
    if not path.is_file():
        raise UserError(f"sweep file {path} not found")
    sweep = yaml.safe_load(path.read_text())
    if sweep.get("method") != "grid":
        raise UserError(
            f"{path}: method '{sweep.get('method')}' needs a wandb server: wandb sweep {path}, then wandb agent <id>"
        )
    overrides = []
    for key, spec in sweep["parameters"].items():
        values = spec["values"] if "values" in spec else [spec["value"]]
        overrides.append(f"{key}={','.join(hydra_value(v) for v in values)}")
    literals = [a for a in sweep.get("command", []) if not a.startswith("${") and a not in SERVER_ONLY]
    return overrides + literals


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Print a grid sweep file's overrides on one line: ``python -m xtc_lightning.sweeps FILE``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError("usage: python -m xtc_lightning.sweeps <sweep yaml>")
    print(" ".join(grid_overrides(argv[0])))


if __name__ == "__main__":
    main()

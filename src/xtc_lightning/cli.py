"""The Hydra entry point (``python train.py ...`` or the ``xtc-train`` console script)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from xtc_lightning.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _run_id() -> str:
    """The Slurm job id when there is one (a requeued job keeps its folder), else time + pid."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{os.getpid()}"


_RUN_ID = _run_id()
if not OmegaConf.has_resolver("xtc_run_id"):
    OmegaConf.register_new_resolver("xtc_run_id", lambda: _RUN_ID)


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=value`` overrides naming a value that has no ``conf/<group>/<value>.yaml``.

    Hydra's own message for this is several lines; ours names the value and the choices in one.
    """
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group_dir = conf_dir / key
        if "." in key or not group_dir.is_dir() or key.startswith("hydra"):  # hydra/launcher=...: Hydra's
            continue
        choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for v in value.split(","):  # multirun lists: task=rte,mrpc
            if v not in choices and v != "null":
                raise UserError(f"unknown {key} '{v}'; choose one of: {', '.join(choices)}")


def check_override_keys(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``key=value`` overrides whose key the config does not have (``tsak=sst2``), naming the
    nearest known key; Hydra's own message is several lines. ``+key=``/``~key``/``hydra...`` and
    keys inside a group's file (``optim.lr``) are left to Hydra."""
    import difflib

    from xtc_lightning.config import default_schema

    schema = default_schema(conf_dir)
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].strip()
        top, _, rest = key.partition(".")
        if "/" in top or top.startswith("hydra"):
            continue
        if top not in schema:
            known = sorted(schema)
        elif rest and schema[top] is not None and rest.split(".")[0] not in schema[top]:
            top, known = rest.split(".")[0], sorted(schema[top])
        else:
            continue
        near = difflib.get_close_matches(top, known, n=1, cutoff=0.5)
        hint = (
            f"did you mean '{key.replace(top, near[0], 1)}'?" if near else f"known keys: {', '.join(known)}"
        )
        raise UserError(f"unknown config key '{key}' in '{arg}'; {hint}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from xtc_lightning import pipeline
    from xtc_lightning.resume import CONFIG_FILE
    from xtc_lightning.runfolder import discard_unstarted, is_fresh

    run_dir = Path(cfg.paths.output_dir)
    fresh = is_fresh(run_dir)
    try:
        results = pipeline.run(cfg)
    except UserError as err:
        discard_unstarted(run_dir, fresh, CONFIG_FILE)  # a refused start leaves no folder behind
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["score"]  # the optimized metric, for Hydra sweepers


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
        check_override_keys(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _main()

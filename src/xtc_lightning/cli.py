"""The Hydra entry point (``python train.py ...`` or the ``xtc-train`` console script)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.override_parser.types import Glob, IntervalSweep
from omegaconf import DictConfig, OmegaConf

from xtc_lightning.errors import UserError, entry_point, exit_user_error

# The packaged configs: a symlink to the repository's conf/ in a clone (edit conf/ there), real
# files inside an installed wheel.
CONF_DIR = Path(__file__).resolve().parent / "conf"


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


def group_values(override) -> list:
    """The option names one parsed ``group=...`` override picks: ``csv``; ``[csv,wandb]`` (a list
    of options); every value of a sweep (``rte,mrpc``, ``choice(...)``, ``range(...)``, lists inside
    them). A ``glob(...)`` or ``interval(...)`` is returned as is (the caller matches a glob against
    the options; an interval is never an option)."""
    value = override.value()
    if isinstance(value, Glob | IntervalSweep):
        return [value]
    values = list(override.sweep_iterator()) if override.is_discrete_sweep() else [value]
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject overrides Hydra cannot parse, and ``group=...`` overrides naming a value that has no
    ``conf/<group>/<value>.yaml``, each with one line (Hydra's own messages are several).

    Overrides are parsed by Hydra's own grammar, so every form it accepts passes: lists
    (``logger=[csv,wandb]``), sweeps (``task=rte,mrpc``, ``choice(...)``, ``range(...)``,
    ``glob(...)``: a glob must match at least one option). ``null`` and deletions (``~group``)
    pass; ``hydra/...`` groups and dotted keys are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # -m, --cfg job, ...: Hydra's own flags
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as err:
            reason = str(err).splitlines()[0]  # the rest is a link to Hydra's grammar page
            raise UserError(f"cannot parse override '{arg}': {reason} (Hydra's override grammar)") from None
        key = override.key_or_group
        group_dir = conf_dir / key
        if override.is_delete() or "." in key or key.startswith("hydra") or not group_dir.is_dir():
            continue
        choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
        raw = arg.split("=", 1)[1]
        for v in group_values(override):
            if isinstance(v, Glob):
                if not v.filter(choices):
                    raise UserError(f"{key} {raw} matches none of: {', '.join(choices)}")
            elif isinstance(v, IntervalSweep):
                raise UserError(f"{key} takes option names, not {raw}; choose one of: {', '.join(choices)}")
            elif v is not None and (not isinstance(v, str) or v not in choices):
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
        exit_user_error(err)
    return results["score"]  # the optimized metric, for Hydra sweepers


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``xtc train`` / ``xtc-train`` / ``python train.py``: check the overrides (``argv``, default
    ``sys.argv[1:]``), then hand them to Hydra (which reads ``sys.argv``)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    check_group_overrides(sys.argv[1:])
    check_override_keys(sys.argv[1:])
    _main()

"""What a run records: ``<stage>/result.json`` per stage and ``results.json`` per run (the schema).

``StageResult`` is one stage's record (``<stage>/result.json``; the cached teacher's and reduced
student's ``result.json`` in ``paths.cache_dir`` too); ``RunResult`` is ``results.json``. Both
are written only by ``write_json_atomic`` (temp file, rename; NaN/inf refused), and read back
by ``read_json``. A field left ``UNSET`` is absent from the file (``score_at_start`` only in the
quantize stage, ``export`` only once exported...); ``None`` is written as ``null``.

``<stage>/result.json`` (``StageResult``)::

    stage               teacher | reduce | quantize
    metrics_best        {split: {metric: value}} of the selected weights on every dev split
    score_best          the task's score of the selected weights (mean over the dev splits)
    metrics_last_epoch  the same for the weights after the last epoch (trained stages)
    score_last_epoch
    selected            which weights were selected (best val/score checkpoint, final weights, given)
    selected_checkpoint that checkpoint's file name (deleted once finished; the weights stay)
    steps, resumed_from, world_size, cluster_environment      how it ran
    predictions         {split: path of predictions_<split>.tsv}
    train_time_s, wall_time_s
    score_at_start      quantize: the dev score right after quantization, before any step
    train_examples      distillation stages: the (augmented) training examples
    params              {"total": n, ...} (models.count_parameters)
    num_layers, layers  the model's depth; the teacher layers a student kept
    bits                {"weights": b, "activations": b[, "name", "weights_by_target"]}
    params_by_bits      quantize: {bits: parameters stored at that width}
    weights             quantize: the selected student's weights.safetensors (slim.py)
    model_dir           teacher/reduce: the HF folder of the selected model (in the cache)
    cached              teacher/reduce: True when reused from the cache
    checkpoints         quantize, run folders from before ``weights``: {"best"|"last": path}

``results.json`` (``RunResult``)::

    task, stage, run_dir
    limited, limits     trainer settings that cut the run short; ``xtc report`` skips such runs
    data                {"train_examples", "<split>_examples", "dev_scored": {split: rows}}
    augment             the augmented training set's summary, or null (augment.py)
    stages              {name: StageResult} in the order they ran
    final_stage         the last stage; metrics, score and predictions are its own
    metrics, score, predictions, wall_time_s
    export              once exported: export/export.json (export/run.py)

Paths (``run_dir``, ``predictions``, ``weights``, ``model_dir``, ``checkpoints``, ``resumed_from``,
the export's files) are written relative to the run folder when they lie inside it (``run_dir`` is
``.``) and absolute otherwise (the caches), by ``write_record``; ``read_record`` resolves them
against the folder being read, so a moved or copied run folder reads its own files. Files written
before (absolute paths) are read as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from xtc_lightning.errors import UserError
from xtc_lightning.finite import first_nonfinite
from xtc_lightning.io import write_text_atomic

RESULTS_FILE = "results.json"


class _Unset:
    """A field not recorded at all (absent from the JSON), unlike ``None`` (``null``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as JSON (temp file, rename); a NaN or inf anywhere in it is a one-line error."""
    bad = first_nonfinite(data)
    if bad is not None:
        raise UserError(f"{path}: '{bad}' is not finite; nothing non-finite is recorded as a result")
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path) -> dict:
    """A recorded result file; a file that is not JSON is a one-line error."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


_PATHS = (
    "run_dir",
    "weights",
    "model_dir",
    "resumed_from",
    "packed",
    "tokenizer",
    "hf",
    "hf_dequantized",
    "source",
)
_PATH_MAPS = ("predictions", "checkpoints")  # {name: path}


def _map_paths(record: dict, fn: Callable[[str], str]) -> dict:
    """``record`` (``results.json``, a ``<stage>/result.json`` or ``export.json``) with ``fn``
    applied to every path it holds."""
    out = dict(record)
    for key in _PATHS:
        if isinstance(out.get(key), str):
            out[key] = fn(out[key])
    for key in _PATH_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: fn(v) if isinstance(v, str) else v for k, v in out[key].items()}
    if isinstance(out.get("onnx"), dict) and isinstance(out["onnx"].get("path"), str):
        out["onnx"] = {**out["onnx"], "path": fn(out["onnx"]["path"])}
    if isinstance(out.get("stages"), dict):
        out["stages"] = {k: _map_paths(v, fn) for k, v in out["stages"].items()}
    if isinstance(out.get("export"), dict):
        out["export"] = _map_paths(out["export"], fn)
    return out


def write_record(path: Path, record: dict, run_dir: Path) -> None:
    """``record`` as JSON (``write_json_atomic``), its paths inside ``run_dir`` made relative to it."""
    root = os.path.abspath(run_dir)

    def relative(p: str) -> str:
        rel = os.path.relpath(os.path.abspath(p), root)
        return p if rel == ".." or rel.startswith(".." + os.sep) else Path(rel).as_posix()

    write_json_atomic(path, _map_paths(record, relative))


def read_record(path: Path, run_dir: Path) -> dict:
    """A record written by ``write_record`` (``read_json``), its relative paths resolved against
    ``run_dir``, the folder being read (not necessarily the one it was written in)."""
    return _map_paths(read_json(path), lambda p: str(Path(run_dir, p)))


class _Record:
    """Dataclass <-> JSON dict, ``UNSET`` fields left out. Keys this version does not know (files
    written by other versions) are kept in ``other`` and written back as they were."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "other":
                out.update(value)
                continue
            if value is UNSET:
                continue
            if isinstance(value, dict) and value and all(isinstance(v, _Record) for v in value.values()):
                value = {k: v.to_dict() for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            other={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class StageResult(_Record):
    """One stage's record (see the module docstring for every field)."""

    stage: str
    metrics_best: dict
    score_best: float
    metrics_last_epoch: dict | None | _Unset = UNSET
    score_last_epoch: float | None | _Unset = UNSET
    selected: str | _Unset = UNSET
    selected_checkpoint: str | None | _Unset = UNSET
    steps: int | _Unset = UNSET
    resumed_from: str | None | _Unset = UNSET
    world_size: int | _Unset = UNSET
    cluster_environment: str | _Unset = UNSET
    predictions: dict = field(default_factory=dict)
    train_time_s: float | _Unset = UNSET
    wall_time_s: float | _Unset = UNSET
    score_at_start: float | _Unset = UNSET
    train_examples: int | _Unset = UNSET
    params: dict | _Unset = UNSET
    num_layers: int | _Unset = UNSET
    layers: list | _Unset = UNSET
    bits: dict | _Unset = UNSET
    params_by_bits: dict | _Unset = UNSET
    weights: str | _Unset = UNSET
    model_dir: str | _Unset = UNSET
    cached: bool | _Unset = UNSET
    checkpoints: dict | _Unset = UNSET
    other: dict = field(default_factory=dict)


@dataclass
class RunResult(_Record):
    """``results.json`` (see the module docstring for every field)."""

    task: str
    stage: str
    run_dir: str
    limited: bool
    limits: dict
    data: dict
    augment: dict | None = None
    stages: dict = field(default_factory=dict)  # name -> StageResult
    final_stage: str | _Unset = UNSET
    metrics: dict | _Unset = UNSET
    score: float | _Unset = UNSET
    predictions: dict | _Unset = UNSET
    wall_time_s: float | _Unset = UNSET
    export: dict | _Unset = UNSET
    other: dict = field(default_factory=dict)

    def write(self, run_dir: Path) -> None:
        """``<run_dir>/results.json``, atomically, its paths relative to ``run_dir``."""
        write_record(Path(run_dir) / RESULTS_FILE, self.to_dict(), run_dir)


def count_rows(tsv: str | Path) -> int:
    """Data rows of a predictions file (its header excluded)."""
    with open(tsv) as f:
        return sum(1 for _ in f) - 1


def stage_table(results: dict) -> str:
    """The stages of a ``results.json`` as a plain-text table for the console."""
    rows = [("stage", "layers", "W/A bits", "params", "dev score (best)", "last epoch", "time")]
    for name, r in results["stages"].items():
        bits = r.get("bits", {})
        last = r.get("score_last_epoch")
        rows.append(
            (
                name,
                str(r.get("num_layers", "")),
                f"{bits.get('weights', '')}/{bits.get('activations', '')}",
                f"{r['params']['total'] / 1e6:.2f}M",
                f"{100 * r['score_best']:.2f}",
                "" if last is None else f"{100 * last:.2f}",
                "cached" if r.get("cached") else f"{r['wall_time_s']:.0f}s",
            )
        )
    export = results.get("export")
    if export and "score" in (export.get("dev") or {}):
        last_stage = results["stages"][results["final_stage"]]
        bits = last_stage.get("bits", {})
        rows.append(
            (
                "packed",
                str(last_stage.get("num_layers", "")),
                f"{bits.get('weights', '')}/{bits.get('activations', '')}",
                f"{export['size']['file_bytes'] / 2**20:.2f}MiB",
                f"{100 * export['dev']['score']:.2f}",
                "",
                "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)

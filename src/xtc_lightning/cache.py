"""The model cache: fine-tuned teachers and reduced students, keyed by everything that shaped them.

``<paths.cache_dir>/teachers/<task>-<key>/`` and ``<paths.cache_dir>/reduced/<task>-<key>/`` hold
the stage's best model (``model/``, an HF folder with its tokenizer), its ``predictions_<split>.tsv``
and its ``result.json`` (``results.StageResult``). ``key`` is ``shaping_key``: a change in anything
that shapes the model trains a new one; later runs with the same settings reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from xtc_lightning.distributed import barrier, is_rank_zero
from xtc_lightning.finite import check_finite_weights
from xtc_lightning.io import atomic_folder
from xtc_lightning.results import StageResult, read_json, write_json_atomic

log = logging.getLogger("xtc_lightning")

# Trainer settings that change what is logged, not what is learned.
NOT_SHAPING = {"log_every_n_steps", "num_sanity_val_steps"}


def shaping_key(run: Mapping, train_fingerprint: str, **stage: object) -> str:
    """Hash of everything that shapes a stage's model; a change in any of it trains a new one.

    ``run``: the run's part, ``{task, model, data, optim, trainer, seed}`` as plain values
    (``config.RunConfig.shaping``); ``stage``: the stage's own (its budget, its teacher...)."""
    shaping = {
        "task": run["task"],
        "model": run["model"],
        "data": {k: run["data"][k] for k in ("max_length", "batch_size")},
        "train": train_fingerprint,
        "optim": run["optim"],
        "trainer": {k: v for k, v in run["trainer"].items() if k not in NOT_SHAPING},
        "seed": run["seed"],
        **stage,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(cache_dir: Path, kind: str, task: str, key: str) -> Path:
    """``<cache_dir>/<kind>/<task>-<key>`` (kind: teachers | reduced)."""
    return cache_dir / kind / f"{task}-{key}"


def from_cache(cache: Path, stage: str, stage_dir: Path, splits: tuple[str, ...]) -> StageResult | None:
    """The cached result of a stage (predictions copied into this run), or None."""
    if not (cache / "result.json").is_file():
        return None
    log.info("%s: reusing the cached model %s", stage, cache)
    result = StageResult.from_dict(read_json(cache / "result.json"))
    stage_dir.mkdir(parents=True, exist_ok=True)
    result.predictions = {split: str(stage_dir / f"predictions_{split}.tsv") for split in splits}
    if is_rank_zero():
        for split in splits:
            shutil.copy(cache / f"predictions_{split}.tsv", stage_dir)
    result.cached = True
    return result


def publish_to_cache(cache: Path, result: StageResult, model, tokenizer) -> StageResult:
    """Store a stage's best model (HF folder), predictions and result atomically: temp folder, rename.

    Rank 0 publishes; the other ranks wait for it, then all load the same published model."""
    check_finite_weights(model, f"{result.stage} (before caching it)")
    result.model_dir = str(cache / "model")
    if is_rank_zero():
        with atomic_folder(cache, keep_existing=True) as tmp:  # another run's published model wins
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            for split, path in result.predictions.items():
                shutil.copy(path, tmp / f"predictions_{split}.tsv")
            write_json_atomic(tmp / "result.json", result.to_dict())
    barrier()
    result.cached = False
    return result

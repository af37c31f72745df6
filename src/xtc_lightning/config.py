"""The run config checked as a whole before any work: one ``UserError`` line for the first bad value.

``check_config(cfg)`` runs at the start of ``pipeline.run``, before the run folder is touched.
Each section has its own small check (``CHECKS``); a new setting gets its check here, next to the
others, so that no value is first looked at hours into a run. Checks read files (the teacher's
``config.json``) but never load weights or write anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtc_lightning.errors import UserError
from xtc_lightning.resume import RESUME_CHOICES

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the configs shipped in the package (a link in a clone)
STAGES = ("teacher", "reduce", "quantize", "export")
PROGRESS = ("auto", "bar", "plain")
TRAINED_STAGES = ("teacher", "reduce", "quantize")


def check_exact_keys(group: Mapping, keys: Sequence[str], what: str) -> None:
    """A config group must have exactly ``keys``: else one ``UserError`` line naming ``what``, the
    unknown and the missing keys (both sorted) and the expected ones (in ``keys``' order)."""
    unknown = sorted(set(group) - set(keys))
    missing = sorted(set(keys) - set(group))
    if unknown or missing:
        raise UserError(f"{what}: unknown keys {unknown} / missing keys {missing}; expected {list(keys)}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def default_schema(conf_dir: Path = CONF_DIR) -> dict[str, object]:
    """The keys a run config may have: ``config.yaml``'s own entries (with their sub-keys) and one
    key per config group it lists in ``defaults`` (``task``, ``model``, ...), whose content is free."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    schema: dict[str, object] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, Mapping):
            schema.update({str(group).split("/")[0]: None for group in entry})
    schema.pop("hydra", None)
    for key, value in raw.items():
        schema[key] = set(value) if isinstance(value, Mapping) else None
    return schema


def check_known_keys(cfg: DictConfig, schema: Mapping[str, object] | None = None) -> None:
    """No key that nothing reads (``+unknown_key=1``, ``+data.batchsize=8``): it would be ignored."""
    schema = default_schema() if schema is None else schema
    for key in cfg:
        if key not in schema:
            raise UserError(
                f"unknown config key '{key}' (added with +?); top-level keys are: {', '.join(sorted(schema))}"
            )
        known = schema[key]
        if known is not None and isinstance(cfg[key], Mapping):
            unknown = sorted(set(cfg[key]) - known)
            if unknown:
                raise UserError(
                    f"unknown config key '{key}.{unknown[0]}'; {key} has: {', '.join(sorted(known))}"
                )


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UserError(f"{name}={value!r} is not accepted: expected a number > 0")


def _positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        more = " or null" if allow_none else ""
        raise UserError(f"{name}={value!r} is not accepted: expected an integer >= 1{more}")


def check_run_keys(cfg: DictConfig) -> None:
    """``stage``, ``progress``, ``seed``, ``resume``."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}'; choose one of: {', '.join(STAGES)}")
    if cfg.progress not in PROGRESS:
        raise UserError(f"progress={cfg.progress!r} is not accepted; choose one of: {', '.join(PROGRESS)}")
    if not _is_int(cfg.seed):
        raise UserError(f"seed={cfg.seed!r} is not accepted: expected an integer")
    if cfg.resume not in RESUME_CHOICES:
        raise UserError(f"resume '{cfg.resume}' is not accepted; choose one of: auto, true, false")


def check_optimization(cfg: DictConfig) -> None:
    """Learning rates (``optim.lr`` and each stage's ``lr``) and batch sizes / lengths."""
    _positive_number("optim.lr", cfg.optim.lr)
    for stage in TRAINED_STAGES:
        _positive_number(f"{stage}.lr", cfg[stage].lr)
    for name, value in (
        ("optim.warmup_epochs", cfg.optim.warmup_epochs),
        ("quantize.warmup_epochs", cfg.quantize.warmup_epochs),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise UserError(f"{name}={value!r} is not accepted: expected a number >= 0 (epochs)")
    if not _is_int(cfg.quantize.seed):
        raise UserError(f"quantize.seed={cfg.quantize.seed!r} is not accepted: expected an integer")
    _positive_int("data.batch_size", cfg.data.batch_size)
    _positive_int("data.eval_batch_size", cfg.data.eval_batch_size)
    _positive_int("data.max_length", cfg.data.max_length)


def model_config(cfg: DictConfig):
    """The HF config of the model the run starts from (``teacher.checkpoint`` or ``model``), read
    from its ``config.json`` without loading weights; None when it cannot be read here (a hub id
    not in the local cache, a missing folder: reported when the model is loaded)."""
    from transformers import AutoConfig

    from xtc_lightning.models import resolve_name_or_path

    source = cfg.teacher.checkpoint or resolve_name_or_path(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(
            str(source), local_files_only=True, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception:  # noqa: BLE001 -- any unreadable source is reported when it is loaded
        return None


def teacher_depth(cfg: DictConfig) -> int | None:
    """The teacher's number of encoder layers from its ``config.json``, or None (see ``model_config``)."""
    from xtc_lightning.models import num_layers_of

    config = model_config(cfg)
    try:
        return None if config is None else num_layers_of(config)
    except UserError:
        return None


def check_model_type(cfg: DictConfig) -> None:
    """The model type has a sequence-classification head and a padding token (batches are padded)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = model_config(cfg)
    if config is None:
        return
    name = cfg.teacher.checkpoint or cfg.model.name_or_path
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise UserError(
            f"model '{name}' is a '{config.model_type}' model, which has no sequence-classification head "
            "in transformers; use an encoder such as BERT, RoBERTa or DistilBERT"
        )
    if getattr(config, "pad_token_id", None) is None:
        raise UserError(
            f"model '{name}' ('{config.model_type}') has no padding token (pad_token_id); "
            "batches are padded: use an encoder such as BERT, RoBERTa or DistilBERT"
        )


def check_student(cfg: DictConfig) -> None:
    """``student.layers`` / ``num_layers`` against the teacher's depth (when a student is built)."""
    if cfg.stage == "teacher":
        return
    from xtc_lightning.student import layers_from_config

    depth = teacher_depth(cfg)
    student = OmegaConf.to_container(cfg.student, resolve=True)
    # Unknown depth: still refuse empty, duplicate, negative and zero-count selections.
    layers_from_config(student, depth if depth is not None else 10**6)


CHECKS: tuple[Callable[[DictConfig], None], ...] = (
    check_known_keys,
    check_run_keys,
    check_optimization,
    check_model_type,
    check_student,
)


def check_config(cfg: DictConfig) -> None:
    """Every check of ``CHECKS`` in order; the first bad value raises a one-line ``UserError``."""
    for check in CHECKS:
        check(cfg)


def stage_seed(seed: int, stage: str) -> int:
    """The seed a stage starts from: a hash of the run's ``seed`` and the stage name, in [0, 2**31).

    Every stage re-seeds at its start, so its result depends on its inputs only, never on what ran
    before it in the process (a teacher trained here or taken from the cache draws differently)."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

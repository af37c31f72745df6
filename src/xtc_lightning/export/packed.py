"""A quantized model <-> its packed file (``format.py``), and the tokenizer saved next to it.

``export_packed`` writes ``<name>.safetensors`` (one file: codes, scales, other tensors and
the metadata to rebuild the model) and, given a tokenizer, ``<name>.tokenizer/`` beside it
(``save_pretrained`` files; their digest is in the packed file's metadata, so a tokenizer
folder from another export is refused). ``load_packed`` rebuilds a runnable Hugging Face
sequence classifier from the file alone: the class and config from the metadata, each
quantized module restored as a ``PackedLinear`` / ``PackedEmbedding`` using its stored
codes, activation quantization (and static ranges) as in training.

Equality with the model that was exported: with ``other_dtype="float32"`` every tensor
round-trips exactly and the loaded model's outputs equal the fake-quantized model's bit
for bit. With ``float16`` (default) or ``bfloat16``, scales and non-quantized tensors are
rounded, so outputs differ slightly and a rare near-tie prediction can flip.

Metadata written here (next to ``format.py``'s)::

    model_class, model_config   the HF class name and ``config.to_dict()`` (without ``_name_or_path``)
    quant                       the QuantConfig the model was quantized with
    task, labels                GLUE task name and the label names by id
    modules                     every quantized module: name, kind, weight and activation spec
    data                        {"max_length", "eval_batch_size"} to evaluate as in training
    tokenizer                   {"folder", "sha256"} or null
    extra                       the caller's ``extra_meta``
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from xtc_lightning.errors import UserError
from xtc_lightning.export.format import STORED_DTYPES, PackedFile, read_header, read_packed, write_packed
from xtc_lightning.export.layers import PackedEmbedding, PackedLinear
from xtc_lightning.export.size import SizeReport, size_report
from xtc_lightning.io import atomic_folder
from xtc_lightning.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    WeightCodes,
    dequantize_weight,
    weight_codes,
)
from xtc_lightning.quant.layers import RANGE_BUFFER
from xtc_lightning.tasks import GlueTask, get_task

SUFFIX = ".safetensors"
TOKENIZER_SUFFIX = ".tokenizer"


def tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer folder that goes with a packed file: ``model.safetensors`` -> ``model.tokenizer/``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(SUFFIX) + TOKENIZER_SUFFIX)


# ----------------------------------------------------------------------------- export


def export_packed(
    model: nn.Module,
    out_path: str | Path,
    *,
    quant_cfg: QuantConfig | Mapping,
    task: str | GlueTask,
    tokenizer=None,
    other_dtype: str = "float16",
    max_length: int | None = None,
    eval_batch_size: int | None = None,
    extra_meta: Mapping | None = None,
    teacher_bytes: int | None = None,
) -> SizeReport:
    """Write ``model`` (quantized with ``quant_cfg`` by ``apply_quantization``, or fp32) as a packed file.

    ``other_dtype``: float16 | bfloat16 | float32, the width of scales and non-quantized
    tensors. ``max_length`` / ``eval_batch_size``: the evaluation settings of the run, kept
    so ``evaluate_packed`` tokenizes and batches as the run did. Returns the size report.
    """
    out = Path(out_path)
    if out.suffix != SUFFIX:
        raise UserError(f"packed file name {out} must end with {SUFFIX}")
    quant = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig.from_dict(quant_cfg)
    task = get_task(task) if isinstance(task, str) else task
    if other_dtype not in STORED_DTYPES:
        raise UserError(f"other_dtype={other_dtype!r} is not accepted: {' | '.join(STORED_DTYPES)}")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise UserError(f"cannot export {type(model).__name__}: not a Hugging Face model (no .config)")
    if model.config.num_labels != task.num_labels:
        raise UserError(
            f"cannot export a {model.config.num_labels}-label classifier as task '{task.name}' "
            f"({task.num_labels} label(s))"
        )
    modules = _quantized_modules(model, quant)
    state = model.state_dict()
    weights: dict[str, WeightCodes] = {}
    for name, m in modules.items():
        if m.weight_spec.enabled:
            weights[f"{name}.weight"] = (
                m.codes
                if isinstance(m, PackedLinear | PackedEmbedding)
                else weight_codes(m.weight, m.weight_spec)
            )
    plain = {k: v for k, v in state.items() if k not in weights}
    exact = {k for k in plain if k.endswith("." + RANGE_BUFFER)}
    tokenizer_meta = None
    if tokenizer is not None:
        tokenizer_meta = {
            "folder": tokenizer_dir(out).name,
            "sha256": _save_tokenizer(tokenizer, tokenizer_dir(out)),
        }
    metadata = {
        "model_class": type(model).__name__,
        # without _name_or_path: a folder of the machine that trained it (the in-memory student
        # names the teacher, a rebuilt one the cached student), so the bytes do not depend on it
        "model_config": {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"},
        "quant": _plain(
            {
                **dataclasses.asdict(quant),
                "weight_by_target": dict(dataclasses.asdict(quant)["weight_by_target"]),
            }
        ),
        "task": task.name,
        "labels": list(task.label_names),
        "modules": [_module_entry(name, m) for name, m in modules.items()],
        "data": {"max_length": max_length, "eval_batch_size": eval_batch_size},
        "tokenizer": tokenizer_meta,
        "extra": _plain(dict(extra_meta or {})),
    }
    write_packed(out, weights, plain, metadata=metadata, stored_dtype=other_dtype, exact=exact)
    return size_report(out, teacher_bytes=teacher_bytes)


def _quantized_modules(model: nn.Module, quant: QuantConfig) -> dict[str, QuantLinear | QuantEmbedding]:
    """The model's quantized modules, checked against ``quant`` and required to be switched on."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    if quant.enabled and not modules:
        raise UserError(
            f"quant config '{quant.name}' quantizes, but the model has no quantized modules "
            f"(apply_quantization(model, cfg) first)"
        )
    if not quant.enabled and modules:
        raise UserError(f"the model has quantized modules but quant config '{quant.name}' quantizes nothing")
    for name, m in modules.items():
        act = getattr(m, "activation_spec", None)
        role = getattr(m, "role", None)
        expected = quant.weight_for(role) if role else quant.weight
        if m.weight_spec != expected or (act is not None and act != quant.activation):
            raise UserError(
                f"module {name} is quantized as weight={m.weight_spec.describe()}"
                f"{'' if act is None else ', activation=' + act.describe()}, not as quant config "
                f"'{quant.name}' says (weight={expected.describe()}, activation={quant.activation.describe()})"
            )
    off = [n for n, m in modules.items() if not m.quant_enabled]
    if off:
        raise UserError(
            f"quantization is switched off in {len(off)} module(s) (e.g. {off[0]}); the packed file always "
            f"quantizes: call set_quantization_enabled(model, True) before exporting"
        )
    return modules


def _module_entry(name: str, m: QuantLinear | QuantEmbedding) -> dict:
    act = getattr(m, "activation_spec", None)
    return {
        "name": name,
        "kind": "linear" if isinstance(m, QuantLinear) else "embedding",
        "weight": dataclasses.asdict(m.weight_spec),
        "activation": None if act is None else dataclasses.asdict(act),
    }


def _plain(value):
    """Tuples to lists (JSON), recursively; other values unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _save_tokenizer(tokenizer, folder: Path) -> str:
    """``save_pretrained`` into a temporary folder, then swap it in place of ``folder``; returns its digest."""
    with atomic_folder(folder) as tmp:
        tokenizer.save_pretrained(str(tmp))
        digest = _folder_digest(tmp)
    return digest


# ----------------------------------------------------------------------------- load


def packed_metadata(path: str | Path) -> dict:
    """The decoded metadata of a packed file (format, version and tensor table checked; payload not read)."""
    return read_header(path).metadata


# A file saved without its run's evaluation batch size is evaluated in batches of this many:
# the batch size changes the speed, not the predictions (the sequence length does: it is never assumed).
EVAL_BATCH_SIZE = 64


def eval_settings(
    path: str | Path, meta: dict, max_length: int | None = None, batch_size: int | None = None
) -> tuple[int, int]:
    """``(max_length, batch_size)`` to evaluate a packed file: the values given, else those stored
    with it (``data``, as the run evaluated). A file stored without a sequence length needs one given
    (it decides truncation, so the predictions); the batch size falls back to ``EVAL_BATCH_SIZE``."""
    data = meta.get("data") or {}
    max_length = max_length or data.get("max_length")
    if not max_length:
        raise UserError(
            f"{path}: no max_length stored with the file: pass max_length (--max-length), "
            f"or save it with save_packed(..., max_length=...)"
        )
    batch_size = batch_size or data.get("eval_batch_size") or EVAL_BATCH_SIZE
    if max_length < 1 or batch_size < 1:
        raise UserError(f"max_length={max_length} and batch_size={batch_size} must be positive")
    return int(max_length), int(batch_size)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the model from a packed file alone, in eval mode (see the module docstring)."""
    packed = read_packed(path)
    model = _build_model(packed)
    _check_semantics(packed, model)
    for entry in _entries(packed):
        _restore_module(model, entry, packed)
    state = dict(packed.plain)
    for name, wc in packed.weights.items():
        state[name] = dequantize_weight(wc)
    _load_state(model, state, packed.header.path)
    return model.eval()


def _build_model(packed: PackedFile) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    meta, where = packed.metadata, packed.header.path
    config_dict = dict(meta.get("model_config") or {})
    model_type = config_dict.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{where}: cannot rebuild the model config ({model_type=}): {err}") from None
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    except (ValueError, KeyError) as err:
        raise UserError(f"{where}: cannot build a {model_type} sequence classifier: {err}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if type(model).__name__ != meta.get("model_class"):
        raise UserError(
            f"{where}: the file holds a {meta.get('model_class')}, but its config builds a {type(model).__name__}"
        )
    return model


def _check_semantics(packed: PackedFile, model: nn.Module) -> None:
    """Refuse metadata that is consistent with its checksum but impossible (the checksum detects
    corruption, it does not authenticate: anyone can edit a file and recompute it): a quant config
    outside the supported set, module specs that differ from it, a task unknown or whose labels
    differ from the classifier's. Non-finite scales are refused by ``read_packed``."""
    meta, where = packed.metadata, packed.header.path
    try:
        quant = QuantConfig.from_dict(meta.get("quant") or {})
        for entry in _entries(packed):
            spec = QuantConfig.from_dict(
                {"weight": entry.get("weight") or {}, "activation": entry.get("activation") or {}}
            )
            act = spec.activation if entry.get("activation") else None
            allowed = {quant.weight, *(w for _, w in quant.weight_by_target)}  # mixed precision
            if spec.weight not in allowed or (act is not None and act != quant.activation):
                raise UserError(
                    f"module '{entry.get('name')}' is stored as weight={spec.weight.describe()}, "
                    f"activation={spec.activation.describe()}, not as the file's quant config says"
                )
        task = get_task(str(meta.get("task")))
    except UserError as err:
        raise UserError(f"{where}: impossible metadata: {err}") from None
    labels = list(task.label_names or ("score",)) if task.is_regression else list(task.label_names)
    if model.config.num_labels != task.num_labels or list(meta.get("labels") or []) != list(task.label_names):
        raise UserError(
            f"{where}: impossible metadata: task '{task.name}' has {task.num_labels} label(s) "
            f"{labels}, the stored classifier has {model.config.num_labels} and the file lists "
            f"{meta.get('labels')}"
        )


def _entries(packed: PackedFile) -> list[dict]:
    entries = packed.metadata.get("modules")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{packed.header.path}: corrupt metadata entry 'modules'")
    return entries


def _restore_module(model: nn.Module, entry: dict, packed: PackedFile) -> None:
    where = packed.header.path
    name, kind = entry.get("name"), entry.get("kind")
    try:
        module = model.get_submodule(name)
    except (AttributeError, TypeError):
        raise UserError(f"{where}: quantized module '{name}' does not exist in the rebuilt model") from None
    spec = {"weight": entry.get("weight") or {}, "activation": entry.get("activation") or {}}
    quant = QuantConfig.from_dict(spec)  # validates the stored specs
    codes = packed.weights.get(f"{name}.weight")
    if quant.weight.enabled and codes is None:
        raise UserError(f"{where}: quantized module '{name}' has no packed weight '{name}.weight'")
    if kind == "linear" and type(module) is nn.Linear:
        new = PackedLinear(module, quant.weight, quant.activation, codes)
    elif kind == "embedding" and type(module) is nn.Embedding and codes is not None:
        new = PackedEmbedding(module, quant.weight, codes)
    else:
        raise UserError(
            f"{where}: module '{name}' is a {type(module).__name__}, cannot restore it as '{kind}'"
        )
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _load_state(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise UserError(
            f"{where}: the tensors do not fit the rebuilt model: {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UserError(
                f"{where}: tensor '{k}' has shape {list(t.shape)}, the rebuilt model needs {list(own[k].shape)}"
            )
    model.load_state_dict(state, strict=True)


def load_packed_tokenizer(path: str | Path):
    """The tokenizer saved with a packed file, checked against the digest in the file's metadata."""
    from transformers import AutoTokenizer

    meta = packed_metadata(path)
    info = meta.get("tokenizer")
    if not info:
        raise UserError(f"{path}: exported without a tokenizer (pass tokenizer= to export_packed)")
    folder = Path(path).with_name(info["folder"])
    if not folder.is_dir():
        raise UserError(f"{path}: its tokenizer folder {folder} is missing")
    if _folder_digest(folder) != info["sha256"]:
        raise UserError(
            f"{folder}: does not match the tokenizer this file was exported with (digest differs)"
        )
    return AutoTokenizer.from_pretrained(str(folder))

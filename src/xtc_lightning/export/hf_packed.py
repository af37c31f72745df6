"""A Hugging Face model folder whose weights stay bit-packed: ``from_pretrained`` through a registered quantizer.

``import xtc_lightning`` registers the quantization method ``"xtc"`` with transformers'
quantizer registry (``register_quantization_config`` / ``register_quantizer``, its public
API for custom methods). A folder written by ``export_hf_packed`` then loads with
``AutoModelForSequenceClassification.from_pretrained(folder)`` and ``pipeline(...)``:

    config.json          the model config, label names, and ``quantization_config``:
                         {"quant_method": "xtc", "format_version": 1, "name", "weight":
                         {method, bits, groups}, "activation": {method, bits, range,
                         ema_momentum}, "targets", "word_embeddings", "pooler",
                         "modules": [{"name", "kind": linear | embedding, "weight"?}], "other_dtype"}
    model.safetensors    per quantized module ``<m>.weight_packed`` (uint8, the packed file's
                         bit stream: ``packing.py``), ``<m>.weight_scale`` (per group, in
                         ``other_dtype``), ``<m>.weight_zero_point`` (uint8, asymmetric only);
                         every other tensor under its own name in ``other_dtype``, except
                         the static activation ranges (``act_range``, fp32) and integer tensors
    tokenizer files, README.md (the model card, ``card.py``)

Loading (``XtcHfQuantizer``): before the weights are read, each listed module of the
skeleton becomes an ``XtcLinear`` / ``XtcEmbedding`` (a ``PackedLinear`` /
``PackedEmbedding`` whose state is the packed buffers); after, the codes are unpacked and
checked, and the layer's weight is ``dequantize_weight`` of them (a non-persistent buffer):
the same tensors ``load_packed`` builds, so the forward equals ``load_packed``'s bit for bit
(activation quantization included). The model computes in fp32 whatever ``dtype`` is asked
for; floating tensors stored narrower are widened exactly, as ``load_packed`` does.
``save_pretrained`` writes the packed buffers and narrows the other tensors back to
``other_dtype`` (exact: they were widened from it), so a load / save round trip gives the
same tensors, byte for byte. ``load_runtime``'s ``optimize_for_inference`` accepts the
loaded model (its layers are ``PackedLinear``s with ``codes``).

Without ``import xtc_lightning``, transformers does not know ``quant_method: xtc``: it warns,
skips the quantization config and loads the rest, leaving every quantized layer's weight
missing (randomly initialized, listed as missing keys). Import the package first, or give such
tools the dequantized fp32 copy (``hf.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from xtc_lightning.errors import UserError
from xtc_lightning.export.format import STORED_DTYPES, PackedFile, read_packed
from xtc_lightning.export.layers import PackedEmbedding, PackedLinear
from xtc_lightning.export.packed import load_packed_tokenizer
from xtc_lightning.export.packing import (
    from_unsigned,
    max_unsigned,
    pack_bits,
    packed_nbytes,
    to_unsigned,
    unpack_bits,
)
from xtc_lightning.io import atomic_folder
from xtc_lightning.quant import QuantConfig, WeightCodes, dequantize_weight
from xtc_lightning.quant.layers import RANGE_BUFFER
from xtc_lightning.quant.quantizers import num_groups

METHOD = "xtc"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
PACKED, SCALE, ZERO_POINT = "weight_packed", "weight_scale", "weight_zero_point"


# ----------------------------------------------------------------------------- config


@register_quantization_config(METHOD)
class XtcQuantConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of an XTC folder (see the module docstring)."""

    def __init__(
        self,
        weight: Mapping,
        activation: Mapping,
        modules: list,
        targets: list | None = None,
        word_embeddings: bool = False,
        pooler: bool = False,
        other_dtype: str = "float16",
        name: str = METHOD,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = METHOD
        self.format_version = format_version
        self.name = name
        self.weight = dict(weight)
        self.activation = dict(activation)
        self.targets = list(targets) if targets is not None else []
        self.word_embeddings = word_embeddings
        self.pooler = pooler
        self.modules = [dict(m) for m in modules]
        self.other_dtype = other_dtype
        self.post_init()

    def post_init(self) -> None:
        """Validate: known version, a valid weight / activation spec, listed modules, a stored dtype."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"xtc quantization_config format_version {self.format_version!r} is not supported "
                f"(this package reads {FORMAT_VERSION})"
            )
        self.quant_config()  # raises on a bad spec
        if self.other_dtype not in STORED_DTYPES:
            raise ValueError(
                f"xtc quantization_config other_dtype={self.other_dtype!r}: {' | '.join(STORED_DTYPES)}"
            )
        for m in self.modules:
            if not isinstance(m.get("name"), str) or m.get("kind") not in ("linear", "embedding"):
                raise ValueError(f"xtc quantization_config: bad module entry {m!r}")

    def quant_config(self) -> QuantConfig:
        try:
            return QuantConfig.from_dict(
                {
                    "name": self.name,
                    "weight": self.weight,
                    "activation": self.activation,
                    "targets": self.targets,
                    "word_embeddings": self.word_embeddings,
                    "pooler": self.pooler,
                }
            )
        except UserError as err:
            raise ValueError(f"xtc quantization_config: {err}") from None


# ----------------------------------------------------------------------------- layers


class XtcLinear(PackedLinear):
    """A ``PackedLinear`` whose state dict is the packed form: ``weight_packed``, ``weight_scale`` (+ zero point).

    ``weight`` is a non-persistent buffer holding the dequantized codes, set by ``unpack``.
    """

    def __init__(self, linear: nn.Linear, quant: QuantConfig):
        super().__init__(linear, quant.weight, quant.activation, codes=None)
        _packed_state(self, quant, (linear.out_features, linear.in_features), linear.weight.device)

    def unpack(self, where: str) -> None:
        _unpack(self, where)


class XtcEmbedding(PackedEmbedding):
    """A ``PackedEmbedding`` whose state dict is the packed form (see ``XtcLinear``)."""

    def __init__(self, embedding: nn.Embedding, quant: QuantConfig):
        super().__init__(embedding, quant.weight, codes=None)
        shape = (embedding.num_embeddings, embedding.embedding_dim)
        _packed_state(self, quant, shape, embedding.weight.device)

    def unpack(self, where: str) -> None:
        _unpack(self, where)


def _packed_state(module: nn.Module, quant: QuantConfig, shape: tuple[int, int], device) -> None:
    """Replace the ``weight`` parameter by the packed buffers (allocated on ``device``, shapes from the spec)."""
    spec = quant.weight
    groups = num_groups(shape, spec.groups)
    del module.weight
    module.register_buffer(
        PACKED, torch.empty(packed_nbytes(math.prod(shape), spec.bits), dtype=torch.uint8, device=device)
    )
    module.register_buffer(SCALE, torch.empty(groups, dtype=torch.float32, device=device))
    if spec.method == "asymmetric":
        module.register_buffer(ZERO_POINT, torch.empty(groups, dtype=torch.uint8, device=device))
    module.register_buffer("weight", torch.empty(shape, dtype=torch.float32, device=device), persistent=False)
    module.weight_shape = shape


def _unpack(module: XtcLinear | XtcEmbedding, where: str) -> None:
    """Unpack the loaded codes: ``module.codes`` and the dequantized ``module.weight``."""
    spec = module.weight_spec
    unsigned = unpack_bits(getattr(module, PACKED).cpu(), spec.bits, math.prod(module.weight_shape))
    if unsigned.numel() and int(unsigned.max()) > max_unsigned(spec.method, spec.bits):
        raise UserError(f"{where}: codes out of range for {spec.method} {spec.bits}-bit")
    scale = getattr(module, SCALE)
    module.codes = WeightCodes(
        codes=from_unsigned(unsigned, spec.method, spec.bits).reshape(module.weight_shape),
        scale=scale.detach().cpu(),
        zero_point=getattr(module, ZERO_POINT, None),
        method=spec.method,
        bits=spec.bits,
        num_groups=scale.numel(),
    )
    module.weight = dequantize_weight(module.codes).to(scale.device)


# ----------------------------------------------------------------------------- quantizer


@register_quantizer(METHOD)
class XtcHfQuantizer(HfQuantizer):
    """Loads (and saves) XTC folders; quantizing an fp32 model on the fly is not offered (train it instead)."""

    requires_calibration = True  # pre-quantized folders only

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the packed model's forward is defined in fp32

    def update_attn_implementation(self, config):
        """Eager attention unless another was asked for: ``load_packed``'s, so the logits match it bit for bit."""
        if config._attn_implementation is None:
            config._attn_implementation = "eager"
        return config

    def _process_model_before_weight_loading(self, model, **kwargs):
        quant = self.quantization_config.quant_config()
        for entry in self.quantization_config.modules:
            name, kind = entry["name"], entry["kind"]
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"xtc: quantized module '{name}' does not exist in {type(model).__name__}"
                ) from None
            own = quant  # a mixed-precision module carries its own weight spec
            if "weight" in entry:
                own = QuantConfig.from_dict(
                    {"weight": entry["weight"], "activation": self.quantization_config.activation}
                )
            if kind == "linear" and type(module) is nn.Linear:
                new = XtcLinear(module, own)
            elif kind == "embedding" and type(module) is nn.Embedding:
                new = XtcEmbedding(module, own)
            else:
                raise ValueError(
                    f"xtc: module '{name}' is a {type(module).__name__}, cannot load it as {kind}"
                )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        where = getattr(model.config, "_name_or_path", "") or type(model).__name__
        for name, module in model.named_modules():
            if isinstance(module, XtcLinear | XtcEmbedding):
                module.unpack(f"{where}: {name}")
        return model

    def get_state_dict_and_metadata(self, model):
        return folder_state_dict(model.state_dict(), self.quantization_config.other_dtype), {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def folder_state_dict(state: Mapping[str, Tensor], other_dtype: str) -> dict[str, Tensor]:
    """The tensors of an XTC folder: floating tensors in ``other_dtype`` except activation ranges."""
    target = STORED_DTYPES[other_dtype]
    out = {}
    for name, t in state.items():
        keep = not t.is_floating_point() or name.endswith("." + RANGE_BUFFER)
        out[name] = (t if keep else t.to(target)).detach().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------- export


def _folder_tensors(packed: PackedFile) -> dict[str, Tensor]:
    """The packed file's tensors under the folder's names, in the file's stored dtypes."""
    manifest = packed.header.manifest
    out: dict[str, Tensor] = {}
    for name, wc in packed.weights.items():
        module = name.removesuffix(".weight")
        stored = STORED_DTYPES[manifest[name]["stored"]]
        out[f"{module}.{PACKED}"] = pack_bits(to_unsigned(wc.codes, wc.method, wc.bits), wc.bits)
        out[f"{module}.{SCALE}"] = wc.scale.to(stored).contiguous()
        if wc.zero_point is not None:
            out[f"{module}.{ZERO_POINT}"] = wc.zero_point.contiguous()
    for name, t in packed.plain.items():
        out[name] = t.to(getattr(torch, manifest[name]["stored"])).contiguous()
    return out


def quantization_config_of(packed: PackedFile) -> XtcQuantConfig:
    meta = packed.metadata
    quant = meta["quant"]
    return XtcQuantConfig(
        name=quant["name"],
        weight=quant["weight"],
        activation=quant["activation"],
        targets=quant["targets"],
        word_embeddings=quant["word_embeddings"],
        pooler=quant["pooler"],
        # a module's own weight spec only where it differs (mixed precision, quant.weight_by_target)
        modules=[
            {"name": m["name"], "kind": m["kind"]}
            | ({"weight": m["weight"]} if m["weight"] != quant["weight"] else {})
            for m in meta["modules"]
        ],
        other_dtype=meta["stored_dtype"],
    )


def model_config_of(packed: PackedFile):
    """The HF config of the packed model, with the task's label names (and the xtc quantization_config)."""
    from transformers import AutoConfig

    meta = packed.metadata
    config_dict = dict(meta["model_config"])
    model_type = config_dict.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **config_dict)
    labels = meta.get("labels") or []
    if len(labels) == config.num_labels and config.num_labels > 1:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    if config.num_labels == 1:
        config.problem_type = "regression"
    config.architectures = [meta["model_class"]]
    config.dtype = "float32"
    if packed.weights:
        config.quantization_config = quantization_config_of(packed)
    return config


def export_hf_packed(packed_path: str | Path, folder: str | Path, card: str | None = None) -> Path:
    """Write the XTC folder of a packed file (written aside, then renamed into place); returns ``folder``.

    The tokenizer saved with the packed file is copied in (if any); ``card`` is written as
    ``README.md``. A packed file without quantized weights gives a plain fp32/fp16 folder.
    """
    packed = read_packed(packed_path)
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        model_config_of(packed).save_pretrained(str(tmp))
        save_file(_folder_tensors(packed), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if packed.metadata.get("tokenizer"):
            load_packed_tokenizer(packed_path).save_pretrained(str(tmp))
        if card is not None:
            (tmp / "README.md").write_text(card)
    return folder


def folder_quantization_config(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of a model folder's config.json (None if it has none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (not a model folder)")
    return json.loads(path.read_text()).get("quantization_config")

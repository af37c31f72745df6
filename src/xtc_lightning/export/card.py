"""The model card (``README.md``) of an exported folder: Hugging Face conventions, YAML metadata first.

``model_card(...)`` is a pure function of the run's ``results.json``, its resolved config,
its Hydra overrides and the export summary. The YAML front matter holds::

    library_name: transformers          pipeline_tag: text-classification
    base_model: the teacher's hub id (omitted for a local folder)
    datasets: [nyu-mll/glue]            language: [en]     license: (none claimed)
    tags: [xtc, quantization, <weight method>-weights, w<bits>a<bits>, glue, <task>]
    model-index: one result per dev split and metric of the packed model (values in percent)
    xtc: {task, weight_bits, activation_bits, stages: {stage: {score, metrics}}, packed:
          {score, metrics}, size: {file_bytes, bound_bytes, bound_ratio, teacher_ratio}}

The body repeats it for people: the dev metrics of each stage and of the packed model, the
bits, the size report, the command and resolved config that produced it, how to load the
folder (transformers, ONNX Runtime, the int8 runtime) and the limits of activation
quantization.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from xtc_lightning.export.size import SizeReport
from xtc_lightning.tasks import get_task

HUB_IDS = {"package:minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(name_or_path: str) -> str | None:
    """The hub id of the teacher backbone, or None when it was a local folder."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    if Path(name_or_path).exists() or name_or_path.startswith(("/", ".", "~")):
        return None
    return name_or_path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _activation_limits(act: dict) -> str:
    if act.get("method", "none") == "none":
        return (
            "Activations are not quantized (weight-only quantization): every runtime computes the "
            "same function up to float rounding."
        )
    rng = (
        "a per-token scale computed on the fly (max |x| of each token over the hidden dimension)"
        if act.get("range") == "dynamic"
        else "one per-tensor range calibrated during training (an EMA of min/max), fixed at inference"
    )
    return (
        f"The inputs of every quantized linear are quantized to {act['bits']}-bit {act['method']} "
        f"integers with {rng}. This is part of the model: `from_pretrained` (with `import xtc_lightning`) "
        "and the runtimes below reproduce it; a plain dequantized copy without it (`--hf-dequantized`) "
        "computes with fp32 activations and its predictions differ slightly. Attention scores, softmax, "
        "LayerNorm, GELU, the pooler and the classifier run in fp32."
    )


def model_card(results: dict, cfg: dict, overrides: list[str], summary: dict) -> str:
    """The card text (see the module docstring). ``cfg``: the resolved config as a plain dict."""
    task = get_task(results["task"])
    quant = cfg.get("quant") or {}
    weight, act = quant.get("weight") or {}, quant.get("activation") or {}
    wbits, abits = weight.get("bits", 32), act.get("bits", 32)
    size = SizeReport.from_dict(summary["size"])
    dev = summary.get("dev") or {}
    stages = {
        name: {"score": s.get("score_best"), "metrics": s.get("metrics_best")}
        for name, s in results.get("stages", {}).items()
    }
    packed = {"score": dev.get("score"), "metrics": dev.get("splits")}
    base = base_model_id(str((cfg.get("model") or {}).get("name_or_path", "")))
    method = weight.get("method", "none")
    tags = ["xtc", "quantization", f"{method}-weights", f"w{wbits}a{abits}", "glue", task.name]
    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-classification"}
    if base:
        meta["base_model"] = base
    meta.update(datasets=["nyu-mll/glue"], language=["en"], tags=tags)
    if packed["metrics"]:
        meta["model-index"] = [
            {
                "name": f"xtc-{task.name}-w{wbits}a{abits}",
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "dataset": {
                            "name": f"GLUE {task.folder}",
                            "type": "nyu-mll/glue",
                            "config": task.name,
                            "split": task.hub_split(split),
                        },
                        "metrics": [
                            {"type": metric, "value": round(100 * value, 2)}
                            for metric, value in metrics.items()
                            if metric in task.metrics
                        ],
                    }
                    for split, metrics in packed["metrics"].items()
                ],
            }
        ]
    meta["xtc"] = {
        "task": task.name,
        "weight_bits": wbits,
        "activation_bits": abits,
        "stages": stages,
        "packed": packed,
        "size": {
            "file_bytes": size.file_bytes,
            "bound_bytes": round(size.bound_bytes),
            "bound_ratio": round(size.bound_ratio, 4),
            "teacher_ratio": None if size.teacher_ratio is None else round(size.teacher_ratio, 2),
        },
    }
    rows = [f"| {name} | {_pct(s['score'])} |" for name, s in stages.items()]
    rows.append(f"| packed model (this folder) | {_pct(packed['score'])} |")
    command = "python train.py " + " ".join(overrides) if overrides else "python train.py"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# XTC {task.folder} classifier, W{wbits}A{abits}",
        "",
        f"A {method} ({wbits}-bit) weight, {abits}-bit activation student of "
        f"`{base or (cfg.get('model') or {}).get('name_or_path')}` fine-tuned on GLUE {task.folder}, "
        "compressed with XTC (Wu et al., NeurIPS 2022: layer reduction, then one-stage "
        "quantization-aware distillation) by xtc-lightning. The weights in `model.safetensors` "
        f"stay packed: {wbits} bit(s) per quantized weight, one scale per group.",
        "",
        "## Dev results",
        "",
        f"Task score (GLUE convention, {', '.join(task.metrics)}), in percent:",
        "",
        "| stage | dev score |",
        "| --- | --- |",
        *rows,
        "",
        "## Size",
        "",
        "```",
        size.text(),
        "```",
        "",
        "## How to load",
        "",
        "```python",
        "import xtc_lightning  # registers the 'xtc' quantization method with transformers",
        "from transformers import pipeline",
        "",
        'classify = pipeline("text-classification", model="<this folder>")',
        "```",
        "",
        "`AutoModelForSequenceClassification.from_pretrained` works the same way. Without "
        "`import xtc_lightning` transformers does not know `quant_method: xtc` (it warns and leaves the "
        "quantized layers' weights uninitialized): use the packed file "
        "with `xtc_lightning.export.load_packed`, the ONNX model (`xtc-export RUN_DIR --onnx`), or "
        "the dequantized copy (`xtc-export RUN_DIR --hf-dequantized`).",
        "",
        "## Limits",
        "",
        _activation_limits(act),
        "",
        "## How it was made",
        "",
        "```bash",
        command,
        "```",
        "",
        "<details><summary>resolved config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def read_card_metadata(text: str) -> dict:
    """The YAML front matter of a card (the inverse of what ``model_card`` writes)."""
    if not text.startswith("---\n"):
        raise ValueError("no YAML front matter")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])

"""What 8-bit activations alone cost a trained full-precision model: dev score with no training.

Takes a fine-tuned HF folder (default: the 3L fp32 student of the quality benchmark's
``<task>/l3_fp32`` run), puts fake-quantized 8-bit inputs on the same linears that
``quant=binary`` quantizes (weights and embeddings left in fp32), and scores the dev set.
Also prints how peaked each linear's input is (per token max|x| / median|x|), since
outlier features are what per-token scales suffer from.

    python bench/ptq_activations.py --task mrpc
    python bench/ptq_activations.py --task cola --model-dir path/to/hf_folder

Prints JSON; the quality section of BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import copy
import json

import torch
from fp32_student import load_student, student_arguments  # also puts src/ on sys.path

from xtc_lightning.export.evaluate import metrics_of, predict
from xtc_lightning.modules import model_inputs
from xtc_lightning.quant import apply_quantization
from xtc_lightning.quant.config import QuantConfig


def activation_only(method: str) -> QuantConfig:
    return QuantConfig.from_dict(
        {
            "name": f"w32a8-{method}",
            "weight": {"method": "none", "bits": 32},
            "activation": {"method": method, "bits": 8, "range": "dynamic"},
            "word_embeddings": False,
        }
    )


@torch.no_grad()
def input_peakedness(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """Per linear of the encoder: the median over tokens of max|x| / median|x| of its input."""
    out: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".encoder." in f".{name}":

            def hook(_m, inp, _o, name=name):
                x = inp[0].flatten(0, -2)
                ratio = x.abs().amax(-1) / x.abs().median(-1).values.clamp_min(1e-12)
                out[name] = round(ratio.median().item(), 1)

            hooks.append(mod.register_forward_hook(hook))
    model(**model_inputs(batch))
    for h in hooks:
        h.remove()
    return out


def main() -> None:
    args = student_arguments(__doc__.splitlines()[0], task="mrpc")
    model_dir, task, dm, base = load_student(args.task, args.model_dir)
    scores = {}
    for name, cfg in [("fp32", None), ("A8 symmetric", activation_only("symmetric")), ("A8 asymmetric", activation_only("asymmetric"))]:  # fmt: skip
        model = copy.deepcopy(base)
        if cfg is not None:
            apply_quantization(model, cfg)
        scores[name] = round(100 * metrics_of(task, predict(model, task, dm))["score"], 2)
    report = {
        "task": args.task,
        "model_dir": model_dir,
        "dev_score_no_training": scores,
        "input_max_over_median_per_token": input_peakedness(base, next(iter(dm.val_dataloader()[0]))),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

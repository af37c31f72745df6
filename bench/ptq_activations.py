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

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from xtc_lightning.export.evaluate import dev_data, metrics_of, predict  # noqa: E402
from xtc_lightning.modules import model_inputs  # noqa: E402
from xtc_lightning.quant import apply_quantization  # noqa: E402
from xtc_lightning.quant.config import QuantConfig  # noqa: E402
from xtc_lightning.tasks import get_task  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--model-dir", help="an HF folder; default: the quality run's 3L fp32 student")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    if model_dir is None:
        results = REPO / "bench" / "out" / "quality" / args.task / "l3_fp32" / "results.json"
        if not results.is_file():
            raise SystemExit(f"no --model-dir and no quality run at {results}: run bench/quality.py first")
        model_dir = json.loads(results.read_text())["stages"]["reduce"]["model_dir"]
    glue_dir = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dm = dev_data(task, tokenizer, glue_dir, max_length=128, batch_size=64)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
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

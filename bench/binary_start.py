"""Where the 1-bit starting point is lost: the dev score of a trained fp32 student right after its
weights are binarized with different scale layouts, with no training.

Takes a fine-tuned HF folder (default: the 3L fp32 student of the quality benchmark's
``<task>/l3_fp32`` run) and replaces the weights of the roles ``quant=binary`` quantizes (the six
encoder linears per layer and the word embeddings) by ``sign(w)`` times:

    row          mean|w| per output row (what the project trains and packs)
    tensor       mean|w| of the whole tensor (DeepSpeed's XTC 1-bit linears)
    row/64       mean|w| per group of 64 consecutive weights of a row
    row x col    g_o * h_i: the rank-1 approximation of |w| (first singular pair of |W|, as
                 OneBit's sign-value decomposition), an output scale and an input scale
    ternary row  TWN per row (2 bits: the W2A8 starting point, for reference)

Activations stay fp32 (8-bit activations cost a trained student nothing: bench/ptq_activations.py).
Also reports, per scheme, the mean cosine between each weight row and its approximation.

    python bench/binary_start.py --task stsb

Prints JSON; the issue-12 section of BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from xtc_lightning.export.evaluate import dev_data, metrics_of, predict  # noqa: E402
from xtc_lightning.quant import WeightSpec, fake_quantize_weight, find_quant_targets  # noqa: E402
from xtc_lightning.tasks import get_task  # noqa: E402


def row_col(w: Tensor) -> Tensor:
    """``sign(w) * g h^T`` with ``g h^T`` the best rank-1 approximation of ``|w|`` (non-negative)."""
    u, s, vh = torch.linalg.svd(w.abs(), full_matrices=False)
    g, h = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
    if g.sum() < 0:  # the Perron vector's sign is arbitrary
        g, h = -g, -h
    return torch.sign(w) * torch.outer(g, h)


SCHEMES = {
    "row": lambda w: fake_quantize_weight(w, WeightSpec("binary", 1, "row")),
    "tensor": lambda w: fake_quantize_weight(w, WeightSpec("binary", 1, "tensor")),
    "row/64": lambda w: fake_quantize_weight(w, WeightSpec("binary", 1, w.numel() // 64)),
    "row x col": row_col,
    "ternary row": lambda w: fake_quantize_weight(w, WeightSpec("ternary", 2, "row")),
}


@torch.no_grad()
def binarized(base: torch.nn.Module, scheme: str) -> tuple[torch.nn.Module, float]:
    """A copy of ``base`` with every binary-quantized role's weight replaced; mean row cosine."""
    model = copy.deepcopy(base)
    cosines = []
    for t in find_quant_targets(model):
        if t.role == "pooler":
            continue
        w = t.module.weight
        q = SCHEMES[scheme](w.float())
        cosines.append(torch.nn.functional.cosine_similarity(w, q, dim=1).mean().item())
        w.copy_(q)
    return model, sum(cosines) / len(cosines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="stsb")
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
    report = {"task": args.task, "model_dir": model_dir, "fp32": None, "schemes": {}}
    report["fp32"] = round(100 * metrics_of(task, predict(base, task, dm))["score"], 2)
    for scheme in SCHEMES:
        model, cosine = binarized(base, scheme)
        score = metrics_of(task, predict(model, task, dm))["score"]
        report["schemes"][scheme] = {"dev_score": round(100 * score, 2), "mean_row_cosine": round(cosine, 4)}
        print(json.dumps({scheme: report["schemes"][scheme]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

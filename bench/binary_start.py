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

import copy
import json

import torch
from fp32_student import load_student, student_arguments  # also puts src/ on sys.path
from torch import Tensor

from xtc_lightning.export.evaluate import metrics_of, predict
from xtc_lightning.quant import WeightSpec, fake_quantize_weight, find_quant_targets


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
    args = student_arguments(__doc__.splitlines()[0], task="stsb")
    model_dir, task, dm, base = load_student(args.task, args.model_dir)
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

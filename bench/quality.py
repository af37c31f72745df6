"""Quality on real GLUE dev sets: MiniLM teacher vs 3-layer students (fp32, W1A8, W2A8, W1A8 augmented).

Each (task, variant) is one ``train.py`` run into ``bench/out/quality/<task>/<variant>``;
a run whose ``results.json`` exists is not run again, so the benchmark resumes where it
stopped (run it in the background, it takes tens of minutes per task on 2 CPU cores).
Fine-tuned teachers are cached in ``cache/`` and shared by the variants.

    python bench/quality.py                      # everything (resumes)
    python bench/quality.py --tasks rte --variants teacher
    python bench/quality.py --report-only        # rebuild the table from what exists

Prints the table as JSON and rewrites the quality section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmarks_md import BENCHMARKS_MD, update_section  # bench/ is on sys.path when run as a script
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "quality"
# Each finished run's numbers (``run_record``), committed: the run folders stay on the machine that
# ran them, these let any checkout redraw the tables (the runs before 2026-12-01 have none: their
# folders were lost with their machine, so the sections they fill are only rewritten when no row is lost).
RECORDS = REPO / "bench" / "records" / "quality"
sys.path.insert(0, str(REPO / "src"))

from xtc_lightning.data import read_local_split  # noqa: E402
from xtc_lightning.tasks import get_task  # noqa: E402

TASKS = ["mrpc", "cola", "stsb", "rte", "sst2"]
# Shared by every run: the data settings (paper: batch 32, seq 128) and each stage's budget
# (DeepSpeed's XTC recipe: 3 epochs per stage; lr 1e-4 suits the small MiniLM better than 5e-5).
COMMON = [
    "data.max_length=128", "data.batch_size=32", "teacher.max_epochs=3", "teacher.lr=1e-4",
    "reduce.max_epochs=3", "reduce.lr=1e-4", "quantize.max_epochs=3", "quantize.lr=1e-4",
    "recipe=xtc",  # the paper's step 2; the screen's variants add levers to it (fast_latent: latent_lr=2e-3)
]  # fmt: skip
TASK_OVERRIDES = {"sst2": ["data.max_train_examples=8000"]}
# Augmented W1A8 (embedding neighbours, offline; the distillation stages only; later overrides
# win over COMMON): `aug` = 2 new examples per example for 1 epoch per stage, about the steps of
# the 3 plain epochs; `aug_full` = 20 per example (the paper's factor) for 1 epoch, ~7x the steps.
AUGMENTED = [
    "student=l3",
    "quant=binary",
    "augment=embedding_nn",
    "reduce.max_epochs=1",
    "quantize.max_epochs=1",
]
VARIANTS = {
    "teacher": ["stage=teacher"],
    "l3_fp32": ["student=l3", "quant=fp32"],
    "l3_w1a8": ["student=l3", "quant=binary"],
    "l3_w2a8": ["student=l3", "quant=ternary"],
    "l3_w1a8_aug": [*AUGMENTED, "augment.factor=2"],
    "l3_w1a8_aug_full": [*AUGMENTED, "augment.factor=20"],
    # Why W1A8 falls short (MRPC): the attention-score MSE is ~75% of the loss and the logits
    # loss does not decrease at equal weights; and the budget (paper: much longer than 3 epochs).
    "l3_w1a8_logits10": ["student=l3", "quant=binary", "distill.weights.logits=10"],
    "l3_w1a8_long": ["student=l3", "quant=binary", "quantize.max_epochs=9"],
    # Where the 1-bit loss comes from: binary weights alone (A32), the binary word embeddings (half
    # of MiniLM's weights), and W1A8 without layer reduction (6 layers, as the paper's 12L rows).
    # (8-bit activations alone cost nothing: bench/ptq_activations.py.)
    "l3_w1a32": ["student=l3", "quant=binary", "quant.name=w1a32", "quant.activation.method=none", "quant.activation.bits=32"],
    "l3_w1a8_fp_emb": ["student=l3", "quant=binary", "quant.word_embeddings=false"],
    "l6_w1a8": ["student=teacher", "quant=binary"],
    # Does data fix the overfitting of the 9-epoch run (train losses fall, dev falls)? x20
    # augmented data for the same steps: 15% of an epoch's batches per epoch (~360), 1 reduce +
    # 3 quantize epochs; the cached teacher is passed in so the batch limit does not retrain it.
    "l3_w1a8_aug20_capped": [*AUGMENTED, "augment.factor=20", "trainer.limit_train_batches=0.15", "quantize.max_epochs=3", "teacher.checkpoint={teacher}"],
}  # fmt: skip
# Issue 12's screen: the quantize stage's recipe (conf/recipe/, src/xtc_lightning/recipe.py), from the
# same cached teacher and 3L fp32 student as l3_w1a8. Every run also records the dev score right
# after binarization (score_at_start), where the recipes differ most.
W1A8_3L = ["student=l3", "quant=binary"]
NO_DECAY = "recipe.latent_weight_decay=0"
# One role's weights at 8 bits (symmetric, one scale per row), for `quant.weight_by_target`.
W8 = "{method:symmetric,bits:8}"
# The default recipe distilling SST-2 on 24,000 of its sentences (1 reduce epoch, cached teacher).
SST2_24K = [*W1A8_3L, "recipe.latent_lr=2e-3", "data.max_train_examples=24000", "teacher.checkpoint={teacher}", "reduce.max_epochs=1"]  # fmt: skip
VARIANTS.update({
    "l3_w1a8_nodecay": [*W1A8_3L, NO_DECAY],
    "l3_w1a8_ramp": [*W1A8_3L, NO_DECAY, "recipe.progressive=ramp", "recipe.progressive_epochs=1"],
    "l3_w1a8_ternary": [*W1A8_3L, NO_DECAY, "recipe.progressive=ternary", "recipe.progressive_epochs=1"],
    "l3_w1a8_latent_lr5": [*W1A8_3L, NO_DECAY, "recipe.latent_lr=5e-4"],
    "l3_w1a8_att01": [*W1A8_3L, "recipe.attention_scale=0.1"],
    # trade-offs, not 1-bit models: query and key (the most damaged part) at 8 or 2 bits
    "l3_w1a8_qk8": [*W1A8_3L, "quant.weight_by_target={query:{method:symmetric,bits:8},key:{method:symmetric,bits:8}}"],
    "l3_w1a8_qk2": [*W1A8_3L, "quant.weight_by_target={query:{method:ternary},key:{method:ternary}}"],
    "l3_w1a8_emb2": [*W1A8_3L, "quant.weight_by_target={word_embeddings:{method:ternary}}"],
    "l3_w1a8_scale_grad": [*W1A8_3L, "recipe.scale_gradient=true"],
    # DeepSpeedExamples' XTC 1-bit budget: 18 quantize epochs, 1 of warm-up, lr 5e-5 (budget or capacity?)
    "l3_w1a8_ref": [*W1A8_3L, "quantize.max_epochs=18", "quantize.warmup_epochs=1", "quantize.lr=5e-5"],
    "l3_w2a8_ref": ["student=l3", "quant=ternary", "quantize.max_epochs=18", "quantize.warmup_epochs=1", "quantize.lr=5e-5"],
    # The two levers that worked, together: ternary query/key at the reference budget.
    "l3_w1a8_qk2_ref": ["student=l3", "quant=binary_qk2", "quantize.max_epochs=18", "quantize.warmup_epochs=1", "quantize.lr=5e-5"],
    # Few signs flip at lr 1e-4 (1.1% in 100 steps): move the latent weights faster instead of longer.
    "l3_w1a8_lr5e4": [*W1A8_3L, "quantize.lr=5e-4"],
    "l3_w1a8_qk2_latent_lr5": ["student=l3", "quant=binary_qk2", NO_DECAY, "recipe.latent_lr=5e-4"],
    # Distil the binary student from its own fp32 self, layer for layer (TernaryBERT / BinaryBERT).
    "l3_w1a8_self": [*W1A8_3L, "recipe.teacher=fp32_student"],
    # The quantize lr sweep (Hydra multirun does the same: `-m quantize.lr=5e-4,1e-3,2e-3`).
    "l3_w1a8_lr1e3": [*W1A8_3L, "quantize.lr=1e-3"],
    "l3_w1a8_lr2e3": [*W1A8_3L, "quantize.lr=2e-3"],
    "l3_w1a8_lr4e3": [*W1A8_3L, "quantize.lr=4e-3"],
    "l3_w1a8_self_lr5e4": [*W1A8_3L, "recipe.teacher=fp32_student", "quantize.lr=5e-4"],
    "l3_w1a8_qk2_lr5e4": ["student=l3", "quant=binary_qk2", "quantize.lr=5e-4"],
    "l3_w1a8_qk2_lr1e3": ["student=l3", "quant=binary_qk2", "quantize.lr=1e-3"],
    "l3_w1a8_lr5e4_nodecay": [*W1A8_3L, NO_DECAY, "quantize.lr=5e-4"],
    # Is it the latent weights that want the high lr, or everything? Latent weights at 2e-3, the
    # rest (LayerNorms, biases, position embeddings, head) at 1e-4.
    "l3_w1a8_latent_lr20": [*W1A8_3L, "recipe.latent_lr=2e-3"],
    "l3_w1a8_latent_lr10": [*W1A8_3L, "recipe.latent_lr=1e-3"],
    "l3_w1a8_latent_lr40": [*W1A8_3L, "recipe.latent_lr=4e-3"],
    "l3_w2a8_latent_lr20": ["student=l3", "quant=ternary", "recipe.latent_lr=2e-3"],
    # Latent 2e-3 was still rising at its last epoch (48.1, 67.5, 69.3): twice the budget on top.
    "l3_w1a8_latent_lr20_e6": [*W1A8_3L, "recipe.latent_lr=2e-3", "quantize.max_epochs=6"],
    # The slow-latent levers again, now that the latent weights move (recipe=fast_latent's setting).
    "l3_w1a8_fast_scale_grad": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.scale_gradient=true"],
    "l3_w1a8_fast_ramp": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.progressive=ramp", "recipe.progressive_epochs=1"],
    "l3_w1a8_fast_qk2": ["student=l3", "quant=binary_qk2", "recipe.latent_lr=2e-3"],
    "l3_w1a8_fast_ternary": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.progressive=ternary", "recipe.progressive_epochs=1"],
    "l3_w1a8_fast_att01": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.attention_scale=0.1"],
    # SST-2 trains on 8,000 of its 67,349 sentences (a compute cap): the same steps over 24,000
    # distinct ones, 1 epoch per distillation stage, from the same cached (8,000-trained) teacher.
    "l3_w1a8_latent_lr20_d24k": [*SST2_24K, "quantize.max_epochs=1"],
    # ...and twice those quantize steps (2 epochs over the 24,000; the reduce stage is the same, cached).
    "l3_w1a8_latent_lr20_d24k_e2": [*SST2_24K, "quantize.max_epochs=2"],
    # ...without dropout in the quantize stage (as l3_w1a8_fast_nodrop).
    "l3_w1a8_latent_lr20_d24k_e2_nodrop": [*SST2_24K, "quantize.max_epochs=2", "recipe.dropout=0"],
    # The small tasks have no more sentences to draw: new versions of theirs instead (augment x2,
    # 1 epoch per distillation stage: the steps of 3 plain epochs), with fast latent weights.
    "l3_w1a8_fast_aug": [*AUGMENTED, "augment.factor=2", "recipe.latent_lr=2e-3"],
    # ...and twice those quantize steps (the reduce stage is the same, cached).
    "l3_w1a8_fast_aug_e2": [*AUGMENTED, "augment.factor=2", "recipe.latent_lr=2e-3", "quantize.max_epochs=2"],
    # The fast latent weights drift from zero (largest rows' scales 2-3x): clamp them after every
    # step to +-c x their row's mean|w| (c = 3: the far tail; c = 2: ~1 in 10 of a Gaussian's; 1.5: ~1 in 4).
    "l3_w1a8_fast_clip3": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.latent_clip=3"],
    "l3_w1a8_fast_clip2": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.latent_clip=2"],
    "l3_w1a8_fast_clip15": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.latent_clip=1.5"],
    # CoLA's 1-bit student keeps 87% of its 3L fp32 student, which itself keeps only 85% of the
    # teacher (23.2 / 27.4): a better fp32 start (6 reduce epochs), or the labels beside the weak
    # teacher in both distillation stages (each with its own reduce stage).
    "l3_w1a8_fast_r6": [*W1A8_3L, "recipe.latent_lr=2e-3", "reduce.max_epochs=6"],
    "l3_w1a8_fast_gt": [*W1A8_3L, "recipe.latent_lr=2e-3", "distill.weights.ground_truth=1"],
    # Multi-step distillation (BiT): the binary student starts from the finished W2A8 run of the
    # default recipe (seed 42's, `l3_w2a8_latent_lr20`) and distils from it, layer for layer; and,
    # to tell the start from the teacher, the same start distilled from the task's teacher.
    "l3_w1a8_fast_ms": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.start_run={w2a8}", "recipe.teacher=start_run"],
    "l3_w1a8_fast_from_w2": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.start_run={w2a8}"],
    # A control: the same quantize stage with 8-bit weights (near-lossless), to tell what the stage
    # costs on its own (3 more distillation epochs, 8-bit activations) from what the 1 or 2 bits cost.
    "l3_w8a8": ["student=l3", "quant=w8a8"],
    # ...which on CoLA ends near the teacher: the binary student started from it (its 8-bit latent weights).
    "l3_w1a8_fast_from_w8": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.start_run={w8a8}"],
    # Where CoLA's low-bit loss sits (8 bits keep 94% of the teacher, 2 and 1 bit 73%): 4-bit
    # weights, and the default with one role kept at 8 bits, the rest binary (its gain over the
    # default is what binarizing that role costs).
    "l3_w4a8": ["student=l3", "quant=w4a8"],
    "l3_w1a8_fast_qk8": [*W1A8_3L, "recipe.latent_lr=2e-3", f"quant.weight_by_target={{query:{W8},key:{W8}}}"],
    "l3_w1a8_fast_vo8": [*W1A8_3L, "recipe.latent_lr=2e-3", f"quant.weight_by_target={{value:{W8},attention_output:{W8}}}"],
    "l3_w1a8_fast_ffn8": [*W1A8_3L, "recipe.latent_lr=2e-3", f"quant.weight_by_target={{intermediate:{W8},output:{W8}}}"],
    "l3_w1a8_fast_emb8": [*W1A8_3L, "recipe.latent_lr=2e-3", f"quant.weight_by_target={{word_embeddings:{W8}}}"],
    # Never screened with fast latent weights: two-stage distillation (TinyBERT/BinaryBERT: attention +
    # hidden for the first 2 epochs of each distilling stage, then logits; its own reduce stage).
    "l3_w1a8_fast_two_stage": [*W1A8_3L, "recipe.latent_lr=2e-3", "distill=two_stage"],
    # CoLA's word swaps (embedding_nn) can make a sentence ungrammatical and cost its fp32 student
    # 3 points: a transfer set of natural text instead, SST-2's training sentences (x2, 1 epoch per
    # distillation stage: the steps of 3 plain epochs; its own reduce stage).
    "l3_w1a8_fast_transfer": [
        *W1A8_3L, "recipe.latent_lr=2e-3", "augment=transfer", "augment.source=sst2", "augment.factor=2",
        "reduce.max_epochs=1", "quantize.max_epochs=1",
    ],
    # CoLA and STS-B score low while the lr is high and rise as it decays (6 epochs: 11.9, 8.3, 10.2,
    # 14.6, 19.1, 21.4): the LayerNorms, biases and head, at 1e-4, may be too slow to follow ~10% of
    # the signs flipping. The rest at 3x and 10x, the latent weights still at 2e-3.
    "l3_w1a8_fast_rest3e4": [*W1A8_3L, "recipe.latent_lr=2e-3", "quantize.lr=3e-4"],
    "l3_w1a8_fast_rest1e3": [*W1A8_3L, "recipe.latent_lr=2e-3", "quantize.lr=1e-3"],
    # Multi-step from W2A8 was capped by its teacher (19.9 on CoLA): from the W8A8 student instead
    # (25.8), a teacher of the student's own shape that nearly keeps the 6L teacher's score.
    "l3_w1a8_fast_ms_w8": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.start_run={w8a8}", "recipe.teacher=start_run"],
    # At lr 2e-3 Adam moves every latent weight ~2e-3 a step whatever its gradient, ~5% of a row's
    # mean|w| (0.035-0.067): near-zero weights flip back and forth on noise. The pull toward
    # mean|w| * sign(w) (oscillation dampening) lets a sign flip only on a gradient that persists
    # (possible while lr > pull * mean|w|: the stronger pull freezes the signs earlier as the lr decays).
    "l3_w1a8_fast_pull3e3": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.latent_pull=3e-3"],
    "l3_w1a8_fast_pull1e2": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.latent_pull=1e-2"],
    # The binary student's attention-score MSE is ~95% of its gradient and pays for scales its binary
    # weights cannot reach; attention x0.1 lowered CoLA. BiBERT's direction matching instead: the
    # normalised distance between the q, k, v similarity matrices and between the hidden states
    # (scale-free, each term in [0, 2]).
    "l3_w1a8_fast_dmd": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.direction_matching=all"],
    # ...which lowered STS-B early (22.5, 47.8 after two epochs against 34.5, 63.1): the q/k/v
    # direction alone, the hidden states' MSE kept.
    "l3_w1a8_fast_dmd_qkv": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.direction_matching=attention"],
    # BiBERT and BiT train their binary students at batch 16: twice the optimizer steps (and sign
    # flips) in the same epochs and about the same compute. The same teacher; its own reduce stage
    # at batch 16 too.
    "l3_w1a8_fast_b16": [*W1A8_3L, "recipe.latent_lr=2e-3", "data.batch_size=16", "teacher.checkpoint={teacher}"],
    # The binary student underfits its teacher and binarization regularizes it already: no dropout
    # in the quantize stage.
    "l3_w1a8_fast_nodrop": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.dropout=0"],
    # ...with 6 quantize epochs (which alone added a point on CoLA), and on STS-B's augmented recipe.
    "l3_w1a8_fast_nodrop_e6": [*W1A8_3L, "recipe.latent_lr=2e-3", "recipe.dropout=0", "quantize.max_epochs=6"],
    "l3_w1a8_fast_aug_nodrop": [*AUGMENTED, "augment.factor=2", "recipe.latent_lr=2e-3", "recipe.dropout=0"],
})  # fmt: skip
# The main table's columns; the other variants are diagnoses of 3L W1A8, listed below it.
MAIN = ["teacher", "l3_fp32", "l3_w1a8", "l3_w2a8"]
LABELS = {
    "teacher": "teacher 6L fp32",
    "l3_fp32": "3L fp32",
    "l3_w1a8": "3L W1A8",
    "l3_w2a8": "3L W2A8",
    "l3_w1a8_aug": "3L W1A8, augmented x2 (1 epoch per distillation stage: about the same steps)",
    "l3_w1a8_aug_full": "3L W1A8, augmented x20 (the paper's factor; 1 epoch per stage: ~7x the steps)",
    "l3_w1a8_logits10": "3L W1A8, logits loss x10 (both distillation stages)",
    "l3_w1a8_long": "3L W1A8, 9 quantize epochs (3x the step-2 budget)",
    "l3_w1a32": "3L W1A32: binary weights, full-precision activations",
    "l3_w1a8_fp_emb": "3L W1A8 with full-precision word embeddings",
    "l6_w1a8": "6L W1A8: no layer reduction (quantize the teacher's 6 layers)",
    "l3_w1a8_aug20_capped": "3L W1A8, augmented x20 for the 9-epoch run's steps (~360 reduce + ~1,080 quantize)",
    "l3_w1a8_nodecay": "3L W1A8, no weight decay on the latent weights",
    "l3_w1a8_ramp": "3L W1A8, no latent decay, progressive ramp fp32 -> binary over the first epoch",
    "l3_w1a8_ternary": "3L W1A8, no latent decay, ternary for the first epoch, then binary",
    "l3_w1a8_latent_lr5": "3L W1A8, no latent decay, latent weights at 5x the lr",
    "l3_w1a8_att01": "3L W1A8, attention loss x0.1 in the quantize stage",
    "l3_w1a8_qk8": "3L W1A8 with 8-bit query and key (mixed precision: a trade-off, not 1 bit)",
    "l3_w1a8_qk2": "3L W1A8 with ternary query and key (mixed precision: a trade-off, not 1 bit)",
    "l3_w1a8_emb2": "3L W1A8 with ternary word embeddings (mixed precision: a trade-off, not 1 bit)",
    "l3_w1a8_scale_grad": "3L W1A8, the gradient also flows through the binary scales (learned scales)",
    "l3_w1a8_ref": "3L W1A8 at DeepSpeed's 1-bit budget: 18 quantize epochs, 1 warm-up, lr 5e-5",
    "l3_w2a8_ref": "3L W2A8 at DeepSpeed's 1-bit budget: 18 quantize epochs, 1 warm-up, lr 5e-5",
    "l3_w1a8_qk2_ref": "3L W1A8 with ternary query and key at DeepSpeed's 1-bit budget (18 epochs, 1 warm-up, lr 5e-5)",
    "l3_w1a8_lr5e4": "3L W1A8, quantize lr 5e-4 (5x)",
    "l3_w1a8_qk2_latent_lr5": "3L W1A8 with ternary query and key, no latent decay, latent weights at 5x the lr",
    "l3_w1a8_self": "3L W1A8 distilled from the 3L fp32 student, layer for layer (recipe.teacher=fp32_student)",
    "l3_w1a8_lr1e3": "3L W1A8, quantize lr 1e-3 (10x)",
    "l3_w1a8_lr2e3": "3L W1A8, quantize lr 2e-3 (20x)",
    "l3_w1a8_lr4e3": "3L W1A8, quantize lr 4e-3 (40x)",
    "l3_w1a8_self_lr5e4": "3L W1A8 distilled from the 3L fp32 student, quantize lr 5e-4",
    "l3_w1a8_qk2_lr5e4": "3L W1A8 with ternary query and key, quantize lr 5e-4",
    "l3_w1a8_qk2_lr1e3": "3L W1A8 with ternary query and key, quantize lr 1e-3",
    "l3_w1a8_lr5e4_nodecay": "3L W1A8, quantize lr 5e-4, no latent decay",
    "l3_w1a8_latent_lr20": "3L W1A8, latent weights at lr 2e-3, the rest at 1e-4 (recipe=fast_latent, the default)",
    "l3_w1a8_latent_lr10": "3L W1A8, latent weights at lr 1e-3, the rest at 1e-4",
    "l3_w1a8_latent_lr40": "3L W1A8, latent weights at lr 4e-3, the rest at 1e-4",
    "l3_w2a8_latent_lr20": "3L W2A8, latent weights at lr 2e-3, the rest at 1e-4 (recipe=fast_latent, the default)",
    "l3_w1a8_latent_lr20_e6": "3L W1A8, latent weights at lr 2e-3, the rest at 1e-4, 6 quantize epochs",
    "l3_w1a8_fast_scale_grad": "3L W1A8, latent weights at lr 2e-3, learned scales (the gradient also flows into the binary scales)",
    "l3_w1a8_fast_ramp": "3L W1A8, latent weights at lr 2e-3, progressive ramp fp32 -> binary over the first epoch",
    "l3_w1a8_fast_qk2": "3L W1A8 with ternary query and key, latent weights at lr 2e-3 (mixed precision: a trade-off, not 1 bit)",
    "l3_w1a8_fast_ternary": "3L W1A8, latent weights at lr 2e-3, ternary for the first epoch, then binary",
    "l3_w1a8_fast_att01": "3L W1A8, latent weights at lr 2e-3, attention loss x0.1 in the quantize stage",
    "l3_w1a8_latent_lr20_d24k": "3L W1A8, latent weights at lr 2e-3, 24,000 distinct train sentences for 1 epoch per distillation stage (the same steps as 8,000 x 3)",
    "l3_w1a8_latent_lr20_d24k_e2": "3L W1A8, latent weights at lr 2e-3, 24,000 distinct train sentences, 2 quantize epochs (twice the steps)",
    "l3_w1a8_latent_lr20_d24k_e2_nodrop": "3L W1A8, latent weights at lr 2e-3, 24,000 distinct train sentences, 2 quantize epochs, no dropout in the quantize stage",
    "l3_w1a8_fast_aug": "3L W1A8, latent weights at lr 2e-3, augmented x2 (1 epoch per distillation stage: the same steps)",
    "l3_w1a8_fast_aug_e2": "3L W1A8, latent weights at lr 2e-3, augmented x2, 2 quantize epochs (twice the steps)",
    "l3_w1a8_fast_clip3": "3L W1A8, latent weights at lr 2e-3, clamped to +-3x their row's mean|w| after every step",
    "l3_w1a8_fast_clip2": "3L W1A8, latent weights at lr 2e-3, clamped to +-2x their row's mean|w| after every step",
    "l3_w1a8_fast_clip15": "3L W1A8, latent weights at lr 2e-3, clamped to +-1.5x their row's mean|w| after every step",
    "l3_w1a8_fast_r6": "3L W1A8, latent weights at lr 2e-3, from a 3L fp32 student of 6 reduce epochs (its own)",
    "l3_w1a8_fast_gt": "3L W1A8, latent weights at lr 2e-3, the labels' loss beside the teacher's in both distillation stages (its own reduce stage)",
    "l3_w1a8_fast_ms": "3L W1A8, latent weights at lr 2e-3, multi-step: from the finished 3L W2A8 student and distilled from it (recipe.start_run, recipe.teacher=start_run)",
    "l3_w1a8_fast_from_w2": "3L W1A8, latent weights at lr 2e-3, from the finished 3L W2A8 student, distilled from the teacher (recipe.start_run)",
    "l3_w8a8": "3L W8A8: the same quantize stage with 8-bit weights (a control: what the stage costs without the low bits)",
    "l3_w1a8_fast_from_w8": "3L W1A8, latent weights at lr 2e-3, from the finished 3L W8A8 student, distilled from the teacher (recipe.start_run)",
    "l3_w4a8": "3L W4A8: the same quantize stage with 4-bit weights (a control)",
    "l3_w1a8_fast_qk8": "3L W1A8, latent weights at lr 2e-3, with 8-bit query and key (a diagnosis: what binarizing them costs)",
    "l3_w1a8_fast_vo8": "3L W1A8, latent weights at lr 2e-3, with 8-bit value and attention output (a diagnosis)",
    "l3_w1a8_fast_ffn8": "3L W1A8, latent weights at lr 2e-3, with 8-bit FFN (intermediate, output) (a diagnosis)",
    "l3_w1a8_fast_emb8": "3L W1A8, latent weights at lr 2e-3, with 8-bit word embeddings (a diagnosis)",
    "l3_w1a8_fast_two_stage": "3L W1A8, latent weights at lr 2e-3, two-stage distillation: attention + hidden for 2 epochs, then logits (both stages; its own reduce stage)",
    "l3_w1a8_fast_transfer": "3L W1A8, latent weights at lr 2e-3, distilled on CoLA plus twice as many SST-2 training sentences (augment=transfer; 1 epoch per distillation stage: the same steps; its own reduce stage)",
    "l3_w1a8_fast_rest3e4": "3L W1A8, latent weights at lr 2e-3, the rest (LayerNorms, biases, position embeddings, head) at 3e-4",
    "l3_w1a8_fast_rest1e3": "3L W1A8, latent weights at lr 2e-3, the rest at 1e-3",
    "l3_w1a8_fast_ms_w8": "3L W1A8, latent weights at lr 2e-3, multi-step: from the finished 3L W8A8 student and distilled from it",
    **{
        f"l3_w1a8_fast_pull{k}": f"3L W1A8, latent weights at lr 2e-3, pulled {v} of the way to mean|w| x sign(w) after every step"
        for k, v in {"3e3": "0.3%", "1e2": "1%"}.items()
    },
    "l3_w1a8_fast_dmd": "3L W1A8, latent weights at lr 2e-3, BiBERT's direction matching: q/k/v similarity and hidden directions instead of the attention-score and hidden MSE",
    "l3_w1a8_fast_dmd_qkv": "3L W1A8, latent weights at lr 2e-3, BiBERT's direction matching of the q/k/v similarity instead of the attention-score MSE (the hidden MSE kept)",
    "l3_w1a8_fast_b16": "3L W1A8, latent weights at lr 2e-3, batch 16 (twice the steps; the same teacher, its own reduce stage at batch 16)",
    "l3_w1a8_fast_nodrop": "3L W1A8, latent weights at lr 2e-3, no dropout in the quantize stage",
    "l3_w1a8_fast_nodrop_e6": "3L W1A8, latent weights at lr 2e-3, no dropout in the quantize stage, 6 quantize epochs",
    "l3_w1a8_fast_aug_nodrop": "3L W1A8, latent weights at lr 2e-3, augmented x2 (1 epoch per distillation stage), no dropout in the quantize stage",
}
# XTC augments only the small tasks; the diagnosis variants run on MRPC.
VARIANT_TASKS = {
    "l3_w1a8_aug": ["mrpc", "cola", "stsb", "rte"],
    "l3_w1a8_aug_full": ["mrpc", "cola", "stsb", "rte"],
    "l3_w1a8_fast_aug": ["mrpc", "cola", "stsb", "rte"],
    "l3_w1a8_fast_aug_e2": ["mrpc", "cola", "stsb", "rte"],
    "l3_w1a8_logits10": ["mrpc"],
    "l3_w1a8_long": ["mrpc"],
    "l3_w1a32": ["mrpc"],
    "l3_w1a8_fp_emb": ["mrpc"],
    "l6_w1a8": ["mrpc"],
    "l3_w1a8_aug20_capped": ["mrpc"],
    "l3_w1a8_latent_lr20_d24k": ["sst2"],
    "l3_w1a8_latent_lr20_d24k_e2": ["sst2"],
    "l3_w1a8_latent_lr20_d24k_e2_nodrop": ["sst2"],
    "l3_w1a8_fast_r6": ["cola"],
    "l3_w1a8_fast_gt": ["cola"],
    **dict.fromkeys(
        [
            "l3_w1a8_fast_qk8",
            "l3_w1a8_fast_vo8",
            "l3_w1a8_fast_ffn8",
            "l3_w1a8_fast_emb8",
            "l3_w1a8_fast_two_stage",
            "l3_w1a8_fast_transfer",
            "l3_w1a8_fast_rest1e3",
            "l3_w1a8_fast_ms_w8",
            "l3_w1a8_fast_pull3e3",
            "l3_w1a8_fast_pull1e2",
        ],
        ["cola"],
    ),
    "l3_w1a8_fast_rest3e4": ["cola", "stsb"],
    "l3_w1a8_fast_dmd": ["cola", "stsb", "mrpc"],
    "l3_w1a8_fast_dmd_qkv": ["cola", "stsb", "mrpc"],
    "l3_w1a8_fast_b16": ["cola", "stsb", "mrpc"],
    "l3_w1a8_fast_nodrop": ["cola", "stsb", "mrpc", "rte"],
    "l3_w1a8_fast_nodrop_e6": ["cola", "stsb", "mrpc"],
    "l3_w1a8_fast_aug_nodrop": ["mrpc", "stsb", "rte"],
}
SEED = 42  # the pipeline's default; other seeds vary the quantize stage alone (quantize.seed)


def majority_baseline(task_name: str, glue_dir: str) -> float:
    """The task score of always predicting the most frequent dev label (STS-B: a constant, 0)."""
    task = get_task(task_name)
    if task.is_regression:
        return 0.0
    labels = read_local_split(task, glue_dir, task.dev_splits[0]).labels
    majority = max(set(labels), key=labels.count)
    p = labels.count(majority) / len(labels)
    values = {"accuracy": p, "matthews": 0.0, "f1": 2 * p / (1 + p) if majority == 1 else 0.0}
    return sum(values[m] for m in task.metrics) / len(task.metrics)


def teacher_model_dir(task: str) -> str:
    """The fine-tuned teacher of the task's `teacher` run (run it first)."""
    path = OUT / task / "teacher" / "results.json"
    if not path.is_file():
        raise SystemExit(f"[quality] {task}: this variant needs the teacher run first ({path} is missing)")
    return json.loads(path.read_text())["stages"]["teacher"]["model_dir"]


# The runs a `{w2a8}` or `{w8a8}` override names (seed 42's): the task's W2A8 student of the
# default recipe, and the W8A8 control.
START_RUNS = {"w2a8": "l3_w2a8_latent_lr20", "w8a8": "l3_w8a8"}


def start_run_dir(task: str, start: str) -> str:
    """The finished run a start-run variant starts from (run it first)."""
    path = OUT / task / START_RUNS[start]
    if not (path / "results.json").is_file():
        raise SystemExit(
            f"[quality] {task}: this variant needs the {START_RUNS[start]} run first ({path} is unfinished)"
        )
    return str(path)


def run_dir_of(task: str, variant: str, seed: int) -> Path:
    return OUT / task / (variant if seed == SEED else f"{variant}@seed{seed}")


def expand(arg: str, task: str) -> str:
    """An override with its `{teacher}` (the cached teacher's folder), or its `{w2a8}` or `{w8a8}`
    (the run to start from, ``START_RUNS``), filled in."""
    if "{teacher}" in arg:
        return arg.format(teacher=teacher_model_dir(task))
    if "{w2a8}" in arg or "{w8a8}" in arg:
        return arg.format(**{k: start_run_dir(task, k) for k in START_RUNS if f"{{{k}}}" in arg})
    return arg


def run_one(task: str, variant: str, threads: int, seed: int = SEED) -> Path:
    run_dir = run_dir_of(task, variant, seed)
    if (run_dir / "results.json").is_file() or task not in VARIANT_TASKS.get(variant, [task]):
        return run_dir
    if seed != SEED and variant in ("teacher", "l3_fp32"):
        return run_dir  # seeds vary the low-bit stage only
    cmd = [
        sys.executable, str(REPO / "train.py"), f"task={task}", *COMMON, *TASK_OVERRIDES.get(task, []),
        *(expand(a, task) for a in VARIANTS[variant]),
        f"quantize.seed={seed}", f"hydra.run.dir={run_dir}", f"paths.cache_dir={REPO / 'cache'}",
        f"num_threads={threads}", "progress=plain",
    ]  # fmt: skip
    print(f"[quality] {task} {variant} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"[quality] {task} {variant} failed with exit code {proc.returncode}")
    print(f"[quality] {task} {variant} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def dev_by_epoch(run_dir: Path, steps: int) -> list[float]:
    """The quantize stage's dev score at the end of each epoch, from its CSV log (the evaluations
    at step 0, the score right after quantization, and after training, the best checkpoint's, are
    left out)."""
    path = run_dir / "logs" / "quantize" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/score")]
    return [float(r["val/score"]) for r in rows if 0 < int(r["step"]) < steps]


def latent_moves(run_dir: Path, res: dict) -> dict | None:
    """How far the quantize stage moved the encoder's linear weights (the six per layer, 2-D)
    from the full-precision student it started from, in its selected latent weights:
    ``signs_changed``, the share whose sign differs, and ``scale_drift``, the mean and the largest
    ratio of a row's mean|w| (its binary scale) to the start's. Latent-weight clipping would only
    matter if the scales drifted. None without both files."""
    reduce, quantize = res["stages"].get("reduce") or {}, res["stages"].get("quantize")
    if quantize is None or not reduce.get("model_dir"):
        return None
    start = Path(reduce["model_dir"]) / "model.safetensors"
    end = run_dir / "quantize" / "weights.safetensors"
    if not start.is_file():
        return None
    if end.is_file():
        latent = load_file(end)
    else:  # runs recorded before weights.safetensors existed: the best checkpoint's student
        checkpoints = sorted((run_dir / "quantize" / "checkpoints").glob("best*.ckpt"))
        if not checkpoints:
            return None
        state = torch.load(checkpoints[-1], weights_only=True, map_location="cpu")["state_dict"]
        latent = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    fp32 = load_file(start)
    changed = total = 0
    ratios = []
    for name, w in latent.items():
        if "encoder.layer." in name and name.endswith(".weight") and w.dim() == 2:
            changed += int((torch.sign(w) != torch.sign(fp32[name])).sum())
            total += w.numel()
            ratios.append(w.abs().mean(dim=1) / fp32[name].abs().mean(dim=1))
    if not total:
        return None
    ratios = torch.cat(ratios)
    return {"signs_changed": changed / total, "scale_drift": (float(ratios.mean()), float(ratios.max()))}


def run_record(run_dir: Path) -> dict:
    """One finished run's numbers, as the tables use them (``RECORDS`` keeps them)."""
    name = run_dir.name
    res = json.loads((run_dir / "results.json").read_text())
    stage = res["stages"][res.get("final_stage", res["stage"])]
    return {
        "seed": SEED if "@seed" not in name else int(name.split("@seed")[1]),
        "score": res["score"],
        "score_at_start": stage.get("score_at_start"),
        "metrics": res["metrics"],
        "score_last_epoch": stage.get("score_last_epoch"),
        "wall_time_s": stage["wall_time_s"] if stage.get("cached") else res["wall_time_s"],  # a cache hit: its first run's
        "train_examples": stage.get("train_examples", res["data"]["train_examples"]),
        "file_bytes": (res.get("export") or {}).get("size", {}).get("file_bytes"),
        "dev_by_epoch": dev_by_epoch(run_dir, stage.get("steps", 0)) if "quantize" in res["stages"] else [],
        "moves": latent_moves(run_dir, res),
        "reduce_score": (res["stages"].get("reduce") or {}).get("score_best"),
    }  # fmt: skip


def variant_runs(task: str, variant: str) -> list[dict]:
    """Each seed's record of ``variant`` on ``task``: from its run folder under ``OUT`` (and then
    kept in ``RECORDS``), else from ``RECORDS``; seed 42's first."""

    def named(paths, name_of):
        return {
            name_of(p): p for p in paths if name_of(p) == variant or name_of(p).startswith(f"{variant}@seed")
        }

    runs = {}
    for name, path in named((OUT / task).glob(f"{variant}*/results.json"), lambda p: p.parent.name).items():
        runs[name] = run_record(path.parent)
        record = RECORDS / task / f"{name}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(runs[name], indent=1) + "\n")
    for name, path in named((RECORDS / task).glob(f"{variant}*.json"), lambda p: p.stem).items():
        runs.setdefault(name, json.loads(path.read_text()))
    return [runs[name] for name in sorted(runs)]


def collect(glue_dir: str) -> dict:
    """Per task and variant: the mean over the seeds that ran (``score``, ``score_at_start``, wall
    time) and each seed's numbers (``runs``)."""
    table: dict = {}
    for task in TASKS:
        row = {"baseline": majority_baseline(task, glue_dir)}
        for variant in VARIANTS:
            runs = variant_runs(task, variant)
            if runs:
                starts = [r["score_at_start"] for r in runs if r["score_at_start"] is not None]
                row[variant] = {
                    "score": statistics.mean(r["score"] for r in runs),
                    "std": statistics.stdev(r["score"] for r in runs) if len(runs) > 1 else None,
                    "score_at_start": statistics.mean(starts) if starts else None,
                    "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
                    "file_bytes": runs[0]["file_bytes"],
                    "moves": runs[0]["moves"],  # seed 42's (or the first seed's)
                    "reduce_score": runs[0]["reduce_score"],  # the 3L fp32 student it started from
                    "runs": runs,
                }
        table[task] = row
    return table


def fmt(x: float | None, unit: str = "") -> str:
    return "–" if x is None else f"{100 * x:.1f}{unit}"


def seeds_score(r: dict) -> str:
    """``mean ± std (n seeds)``, or one seed's score."""
    return (
        fmt(r["score"])
        if r["std"] is None
        else f"{fmt(r['score'])} ± {fmt(r['std'])} ({len(r['runs'])} seeds)"
    )


def cell(r: dict | None) -> str:
    """``seeds_score``, then the score right after quantization (``@0``, when recorded) and the
    wall time of one run."""
    if r is None:
        return "–"
    start = "" if r["score_at_start"] is None else f", @0 {fmt(r['score_at_start'])}"
    return f"{seeds_score(r)}{start} ({r['wall_time_s'] / 60:.0f} min)"


class Kept:
    """Retention (student / teacher) and margin kept ((student - majority) / (teacher - majority))
    per task, and their averages over the tasks added: the mean of the ratios, and the margin
    pooled in points, which a near-chance teacher (a tiny denominator) cannot inflate."""

    def __init__(self) -> None:
        self.retention: list[float] = []
        self.margin: list[float] = []
        self.kept = self.given = 0.0

    def add(self, row: dict, variant: str) -> tuple[float | None, float | None]:
        t, s = row.get("teacher"), row.get(variant)
        if not (t and s):
            return None, None
        self.retention.append(s["score"] / t["score"])
        self.margin.append((s["score"] - row["baseline"]) / (t["score"] - row["baseline"]))
        self.kept += s["score"] - row["baseline"]
        self.given += t["score"] - row["baseline"]
        return self.retention[-1], self.margin[-1]

    def average(self) -> str:
        r, m = statistics.mean(self.retention), statistics.mean(self.margin)
        return f" {fmt(r, '%')} | {fmt(m, '%')} mean, {fmt(self.kept / self.given, '%')} pooled |"


# Issue 12's must-show: 3L W1A8 with the default recipe, 3 seeds, against these dev scores.
DEFAULT = "l3_w1a8_latent_lr20"
THRESHOLDS = {"stsb": 0.70, "cola": 0.15, "mrpc": 0.79, "sst2": 0.84}
# The default recipe in other data settings, each with its own rows and five-task average beside
# the plain ones: SST-2 distilled on 24,000 of its sentences instead of 8,000 (same teacher; the
# reduce stage too, so its 3L fp32 student is its own), once (the same steps as 8,000 x 3) or with
# 2 quantize epochs; STS-B distilled on its training set augmented x2 (embedding neighbours, the
# same steps; its own reduce stage too); CoLA without dropout in the quantize stage (the same
# teacher and 3L fp32 student), STS-B augmented without it; and these together. A setting is (name, {task: variant}).
SST2_24K_E1 = {"sst2": "l3_w1a8_latent_lr20_d24k"}
SST2_24K_E2 = {"sst2": "l3_w1a8_latent_lr20_d24k_e2"}
STSB_AUG = {"stsb": "l3_w1a8_fast_aug"}
COLA_NODROP = {"cola": "l3_w1a8_fast_nodrop"}
NODROP = {**COLA_NODROP, "stsb": "l3_w1a8_fast_aug_nodrop"}
NODROP_ALL = {
    **NODROP, "mrpc": "l3_w1a8_fast_nodrop", "rte": "l3_w1a8_fast_nodrop", "sst2": "l3_w1a8_latent_lr20_d24k_e2_nodrop"
}  # fmt: skip
SETTING_DATA = {  # a setting run's training data, where it is not the task's training set
    "l3_w1a8_latent_lr20_d24k": "24,000 sentences x 1 epoch",
    "l3_w1a8_latent_lr20_d24k_e2": "24,000 sentences, 2 quantize epochs",
    "l3_w1a8_fast_aug": "augmented x2, 1 epoch per stage",
}
NODROP_SUFFIX = "_nodrop"  # a variant's form without dropout in the quantize stage


def setting_data(variant: str) -> str | None:
    """A setting run's training data (None: the task's training set), with or without dropout."""
    return SETTING_DATA.get(variant.removesuffix(NODROP_SUFFIX))


def setting_label(variant: str) -> str:
    """The row label of a task run in a data setting: its data, and no dropout where it has none."""
    nodrop = "no dropout in the quantize stage" if variant.endswith(NODROP_SUFFIX) else None
    return ", ".join(part for part in (setting_data(variant), nodrop) if part)


DATA_SETTINGS = [
    ("sst2 on 24,000 sentences x 1 epoch", SST2_24K_E1),
    ("sst2 on 24,000 sentences, 2 quantize epochs", SST2_24K_E2),
    ("stsb augmented x2", STSB_AUG),
    ("stsb augmented x2, sst2 on 24,000 sentences, 2 quantize epochs", {**STSB_AUG, **SST2_24K_E2}),
    ("cola without dropout in the quantize stage", COLA_NODROP),
    (
        "cola without dropout, stsb augmented x2, sst2 on 24,000 sentences, 2 quantize epochs",
        {**COLA_NODROP, **STSB_AUG, **SST2_24K_E2},
    ),
    (
        "cola and stsb (augmented x2) without dropout, sst2 on 24,000 sentences, 2 quantize epochs",
        {**NODROP, **SST2_24K_E2},
    ),
    (
        "every task without dropout in the quantize stage, stsb augmented x2, sst2 on 24,000 sentences, "
        "2 quantize epochs",
        NODROP_ALL,
    ),
]


def verdict(task: str, r: dict) -> str:
    """The threshold cell: the task's issue-12 threshold and whether the run's score meets it."""
    goal = THRESHOLDS.get(task)
    return "–" if goal is None else f"{fmt(goal)}: {'met' if r['score'] >= goal else 'not met'}"


def render_default(table: dict) -> str:
    """The default recipe (fast_latent) per task against plain XTC, the 3L fp32 student and the
    teacher, with its threshold, retention and margin kept, and their averages."""
    lines = [
        "| task | majority | teacher 6L fp32 | 3L fp32 | 3L W1A8, plain XTC | **3L W1A8, default** | "
        "threshold | retention | margin kept |",
        "|---" * 9 + "|",
    ]
    kept = Kept()
    for task, row in table.items():
        if DEFAULT not in row:
            continue
        ret, mar = kept.add(row, DEFAULT)
        cells = " | ".join(cell(row.get(v)) for v in ("teacher", "l3_fp32", "l3_w1a8", DEFAULT))
        lines.append(
            f"| {task} | {fmt(row['baseline'])} | {cells} | {verdict(task, row[DEFAULT])} | "
            f"{fmt(ret, '%')} | {fmt(mar, '%')} |"
        )
    if kept.retention:
        lines.append(f"| **average** ({len(kept.retention)} tasks) |" + " |" * 6 + kept.average())
    lines += render_data_setting(table)
    return "\n".join(lines)


def render_data_setting(table: dict) -> list[str]:
    """Per ``DATA_SETTINGS`` entry whose every run exists: a row per task it changes (its own 3L
    fp32 student: the run's reduce stage), then the five-task average with those rows in place of
    the tasks' default ones. A row already shown by an earlier setting is not repeated."""
    lines, shown = [], set()
    for setting, variants in DATA_SETTINGS:
        if any(variant not in table[task] for task, variant in variants.items()):
            continue
        kept = Kept()
        for task, row in table.items():
            variant = variants.get(task, DEFAULT)
            ret, mar = kept.add(row, variant)
            if variant == DEFAULT or (task, variant) in shown:
                continue
            shown.add((task, variant))
            r = row[variant]
            lines.append(
                f"| {task}, {setting_label(variant)} | {fmt(row['baseline'])} | {cell(row.get('teacher'))} | "
                f"{fmt(r['reduce_score'])} (its own) | – | {cell(r)} | {verdict(task, r)} | {fmt(ret, '%')} | "
                f"{fmt(mar, '%')} |"
            )
        lines.append(f"| **average** ({len(kept.retention)} tasks; {setting}) |" + " |" * 6 + kept.average())
    return lines


def render_setting(table: dict, variants: dict[str, str]) -> str:
    """A setting's five tasks on their own, each from its runs here: the teacher, the 3L fp32
    student the run started from (its reduce stage), the run, its threshold, retention and margin
    kept, and their averages. Empty until every task has its run and its teacher."""
    if any(v not in table[t] or "teacher" not in table[t] for t, v in variants.items()):
        return ""
    lines = [
        "| task | data | majority | teacher 6L fp32 | 3L fp32 | **3L W1A8** | threshold | retention | margin kept |",
        "|---" * 9 + "|",
    ]
    kept = Kept()
    for task in (t for t in TASKS if t in variants):
        row, r = table[task], table[task][variants[task]]
        ret, mar = kept.add(row, variants[task])
        data = setting_data(variants[task]) or "its training set"
        lines.append(
            f"| {task} | {data} | {fmt(row['baseline'])} | {cell(row['teacher'])} | {fmt(r['reduce_score'])} | "
            f"{cell(r)} | {verdict(task, r)} | {fmt(ret, '%')} | {fmt(mar, '%')} |"
        )
    lines.append(f"| **average** ({len(kept.retention)} tasks) |" + " |" * 6 + kept.average())
    return "\n".join(lines)


def render(table: dict) -> str:
    """The main table (teacher and the 3L students per task, retention and margin kept of 3L W1A8)
    and the diagnosis table (every other variant that ran, against plain 3L W1A8 on its task)."""
    lines = [
        "| task | majority | "
        + " | ".join(LABELS[v] for v in MAIN)
        + " | W1A8 retention | W1A8 margin kept |",
        "|---" * (len(MAIN) + 4) + "|",
    ]
    kept = Kept()
    for task, row in table.items():
        ret, mar = kept.add(row, "l3_w1a8")
        cells = " | ".join(cell(row.get(v)) for v in MAIN)
        lines.append(f"| {task} | {fmt(row['baseline'])} | {cells} | {fmt(ret, '%')} | {fmt(mar, '%')} |")
    if kept.retention:
        lines.append(
            f"| **average** ({len(kept.retention)} tasks) |" + " |" * (len(MAIN) + 1) + kept.average()
        )
    diag = [
        f"| {task} | {LABELS[v]} | {cell(row[v])} | {100 * (row[v]['score'] - row['l3_w1a8']['score']):+.1f} |"
        for task, row in table.items()
        for v in VARIANTS
        if v not in MAIN and v in row and "l3_w1a8" in row
    ]
    if diag:
        lines += [
            "",
            "Diagnosis variants (everything else as the plain run):",
            "",
            "| task | variant | score | vs 3L W1A8 |",
            "|---|---|---|---|",
            *diag,
        ]
    return "\n".join(lines)


def table_rows(text: str) -> set[str]:
    """The first two cells of every table row in ``text``: what names a row."""
    return {" | ".join(line.split(" | ")[:2]) for line in text.splitlines() if line.startswith("| ")}


def update_keeping_rows(name: str, heading: str, body: str) -> None:
    """``update_section``, unless the section holds a table row ``body`` lacks (a run that is
    neither in ``OUT`` nor in ``RECORDS``, such as the runs before records were kept): then the
    section is left as it is, and what is missing is printed."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text()
    old = text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else ""
    lost = sorted(table_rows(old) - table_rows(body))
    if lost:
        print(
            f"[quality] section {name} left as it is: {len(lost)} of its rows have no run here, e.g. {lost[0]}"
        )
        return
    update_section(name, heading, body)


def update_benchmarks_md(body: str) -> None:
    update_keeping_rows("quality", "Quality (GLUE dev)", body)


# The recipe screen's table: plain W1A8 and every recipe / mixed-precision / data variant, per task.
# The screen's variants limited to some tasks (the other task-limited ones are the main table's
# MRPC diagnoses).
SCREEN_LIMITED = ["l3_w1a8_fast_aug_e2", "l3_w1a8_fast_r6", "l3_w1a8_fast_gt"]
SCREEN = list(
    dict.fromkeys(
        [
            "teacher",
            "l3_fp32",
            "l3_w1a8",
            *(v for v in VARIANTS if v.startswith("l3_w1a8_") and VARIANT_TASKS.get(v) is None),
            *(variant for _, variants in DATA_SETTINGS for variant in variants.values()),
            *SCREEN_LIMITED,
            "l3_w2a8",
            "l3_w2a8_ref",
            "l3_w2a8_latent_lr20",
        ]
    )
)


def render_screen(
    table: dict,
    variants: list[str] = SCREEN,
    against: str = "l3_w1a8",
    against_label: str = "3L W1A8",
    tasks: tuple[str, ...] = tuple(TASKS),
) -> str:
    """A row per task of ``tasks`` and variant that ran, with its difference to ``against`` (``against_label``)."""
    lines = [
        f"| task | variant | dev score | right after quantization | vs {against_label} | of the teacher | packed file | encoder signs changed | row scales vs start |",
        "|---" * 9 + "|",
    ]  # fmt: skip
    for task, row in table.items():
        if task not in tasks:
            continue
        plain, teacher = row.get(against), row.get("teacher")
        for v in variants:
            r = row.get(v)
            if r is None:
                continue
            low_bit = v.startswith(("l3_w1a8_", "l3_w2a8", "l3_w4a8", "l3_w8a8"))
            delta = f"{100 * (r['score'] - plain['score']):+.1f}" if plain is not None and low_bit else ""
            kept = "" if teacher is None else fmt(r["score"] / teacher["score"], "%")
            size = "" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e6:.2f} MB"
            moves = r["moves"]
            signs = "" if moves is None else fmt(moves["signs_changed"], "%")
            drift = "" if moves is None else "{:.2f}x (max {:.2f}x)".format(*moves["scale_drift"])
            lines.append(
                f"| {task} | {LABELS[v]} | {seeds_score(r)} ({r['wall_time_s'] / 60:.0f} min) | "
                f"{fmt(r['score_at_start'])} | {delta} | {kept} | {size} | {signs} | {drift} |"
            )
    return "\n".join(lines)


# The fifth screen (2026-12-01, a new machine: the teacher and 3L fp32 student rebuilt, the default
# re-run beside the new variants): multi-step distillation from the W2A8 student, and 6 reduce epochs.
FIFTH = [
    "teacher", "l3_fp32", "l3_w8a8", DEFAULT, "l3_w2a8_latent_lr20", "l3_w1a8_fast_r6", "l3_w1a8_fast_from_w2",
    "l3_w1a8_fast_ms", "l3_w1a8_fast_from_w8",
]  # fmt: skip

# The sixth screen (2026-12-01): where CoLA's low-bit loss sits (the bit-width ladder of the same
# quantize stage, 8, 4, 2, 1 bit, and the default with one role kept at 8 bits), and the levers not yet
# measured on CoLA with fast latent weights (the latent lr, two-stage distillation, 6 quantize epochs
# with seeds).
SIXTH = [
    "teacher", "l3_fp32", "l3_w8a8", "l3_w4a8", "l3_w2a8_latent_lr20", DEFAULT, "l3_w1a8_fast_qk8",
    "l3_w1a8_fast_vo8", "l3_w1a8_fast_ffn8", "l3_w1a8_fast_emb8", "l3_w1a8_latent_lr10", "l3_w1a8_latent_lr40",
    "l3_w1a8_fast_two_stage", "l3_w1a8_latent_lr20_e6", "l3_w1a8_fast_transfer",
]  # fmt: skip

# The seventh screen (2026-12-01, a new machine: the teachers and 3L fp32 students rebuilt): the lr of
# the weights that are not binary (LayerNorms, biases, position embeddings, head), and multi-step
# distillation from the W8A8 student.
SEVENTH = [
    "teacher", "l3_fp32", "l3_w8a8", DEFAULT, "l3_w1a8_latent_lr20_e6", "l3_w1a8_fast_rest3e4",
    "l3_w1a8_fast_rest1e3", "l3_w1a8_fast_ms_w8",
]  # fmt: skip

# The eighth screen (2026-12-01): oscillation dampening of the binary latent weights (recipe.latent_pull).
EIGHTH = [
    "teacher", "l3_fp32", "l3_w8a8", DEFAULT, "l3_w1a8_latent_lr20_e6", "l3_w1a8_fast_pull3e3",
    "l3_w1a8_fast_pull1e2",
]  # fmt: skip

# The ninth screen (2026-12-01): the loss's balance, BiBERT's direction-matching distillation; and
# STS-B's augmented recipe (73.8 +- 0.9 on the earlier machines) on the AVX2 machine.
NINTH = [
    "teacher", "l3_fp32", "l3_w8a8", DEFAULT, "l3_w1a8_latent_lr20_e6", "l3_w1a8_fast_dmd", "l3_w1a8_fast_dmd_qkv",
    "l3_w1a8_fast_aug",
]  # fmt: skip
# The tenth screen (2026-12-01): the binary student underfits; what regularizes or slows its
# training: the quantize stage without dropout, and BiBERT's and BiT's batch of 16.
TENTH = [
    "teacher", "l3_fp32", "l3_w8a8", DEFAULT, "l3_w1a8_latent_lr20_e6", "l3_w1a8_fast_nodrop", "l3_w1a8_fast_nodrop_e6",
    "l3_w1a8_fast_b16", "l3_w1a8_fast_aug", "l3_w1a8_fast_aug_nodrop", "l3_w1a8_latent_lr20_d24k_e2",
    "l3_w1a8_latent_lr20_d24k_e2_nodrop",
]  # fmt: skip


def render_seeds(table: dict, variants: list[str], tasks: tuple[str, ...]) -> str:
    """Each seed's score (and right after quantization) of the variants that ran more than one."""
    lines = []
    for task, row in table.items():
        if task not in tasks:
            continue
        for v in variants:
            runs = row.get(v, {}).get("runs", [])
            if len(runs) > 1:
                seeds = ", ".join(
                    f"{fmt(r['score'])} (seed {r['seed']}, @0 {fmt(r['score_at_start'])})" for r in runs
                )
                lines.append(f"- {task}, {LABELS[v]}: {seeds}")
    return "\n".join(lines)


def update_cola_screen(
    table: dict,
    name: str,
    title: str,
    intro: str,
    variants: list[str],
    tasks: tuple[str, ...] = ("cola", "stsb"),
) -> None:
    """A CoLA screen's section: ``intro``, the command that runs its ``variants`` with 3 seeds, its
    table against the default and each seed's score, for the ``tasks`` it ran (the later runs of
    another task stay out of it)."""
    command = (
        f"python bench/quality.py --tasks cola --variants {' '.join(variants)} --seeds 42 1 2 --threads 1"
    )
    body = f"{intro} Run with `{command}`.\n\n" + render_screen(
        table, variants, DEFAULT, "the default", tasks
    )
    update_keeping_rows(
        name, title, body + ("\n\n" + seeds if (seeds := render_seeds(table, variants, tasks)) else "")
    )


def render_curves(table: dict) -> str:
    """Dev score after each quantize epoch of the long runs (reference budget, 6 epochs) and of the
    lr screen, whose high-lr runs score low until the lr has decayed."""
    lines = []
    for task, row in table.items():
        for v in (v for v in SCREEN if v == "l3_w1a8" or v.endswith(("_ref", "_e6")) or "_lr" in v):
            if v not in row:
                continue
            for r in row[v]["runs"][:1]:
                scores = ", ".join(fmt(x) for x in r["dev_by_epoch"])
                if scores:  # runs recorded before the per-epoch log have none
                    lines.append(f"- {task}, {LABELS[v]} (seed {r['seed']}), dev after each epoch: {scores}")
        for run_dir in sorted((OUT / task).glob("*_ref*")):  # stopped before the end: no results.json
            v = run_dir.name.split("@")[0]
            if v in LABELS and not (run_dir / "results.json").is_file():
                scores = ", ".join(fmt(x) for x in dev_by_epoch(run_dir, sys.maxsize))
                if scores:
                    lines.append(
                        f"- {task}, {LABELS[v]} ({run_dir.name}), stopped unfinished; dev after each epoch: {scores}"
                    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[SEED], help="quantize-stage seeds")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    glue_dir = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    os.environ["GLUE_DIR"] = glue_dir
    if not args.report_only:
        for task in args.tasks:
            for variant in args.variants:
                for seed in args.seeds:
                    run_one(task, variant, args.threads, seed)
    table = collect(glue_dir)
    print(json.dumps(table, indent=2))
    body = (
        "Scores are the GLUE task score in percent (CoLA MCC; MRPC mean of F1 and accuracy; RTE and "
        "SST-2 accuracy; STS-B mean of Pearson and Spearman) of the best-on-dev checkpoint, with wall "
        "time of the run on this 2-core CPU. *Retention* = student / teacher; *margin kept* = "
        "(student − majority) / (teacher − majority); its average is given as the mean of the tasks' "
        "ratios and *pooled* (Σ student − majority over Σ teacher − majority, in points), which a "
        "near-chance teacher (a tiny denominator) cannot inflate. SST-2 trains on 8,000 random training "
        "examples. Augmented variants train the distillation stages (reduce, quantize) on the "
        "training set plus unlabelled new versions of it (`augment=embedding_nn`: words replaced with "
        "p=0.4 by one of their 15 nearest neighbours in the teacher's embeddings); their wall times "
        "include their own reduce stage (the other 3L students reuse the fp32 run's). Produced by `python bench/quality.py` (settings in that file).\n\n"
        + render(table)
    )
    if all(table[t].get(v) for t in TASKS for v in MAIN):  # never overwrite the table with a partial one
        update_benchmarks_md(body)
    else:
        print("[quality] the main table needs every task's MAIN runs here: its section is left as it is")
    update_keeping_rows(
        "quality_default",
        "Quality: the default recipe (recipe=fast_latent), 3L W1A8",
        "3L W1A8 students of the MiniLM teacher with the default recipe (`recipe=fast_latent`: the binary "
        "latent weights at lr 2e-3, the rest at quantize.lr 1e-4; 3 quantize epochs), mean ± std over "
        "`quantize.seed` 42, 1, 2 from the same cached teacher and 3L fp32 student per task, beside plain XTC "
        "(`recipe=xtc`). Thresholds: issue 12. Scores, retention and margin kept as in the table above; "
        "`@0` is the dev score right after binarization. Run with `python bench/quality.py --variants "
        "teacher l3_fp32 l3_w1a8 l3_w1a8_latent_lr20 --seeds 42 1 2 --threads 1`.\n\n"
        + render_default(table),
    )
    if now := render_setting(table, NODROP_ALL):
        update_keeping_rows(
            "quality_default_now",
            "Quality: the default recipe since the tenth screen (no dropout), 3L W1A8",
            "3L W1A8 students of the MiniLM teacher with the default recipe as it is now "
            "(`recipe=fast_latent`: the binary latent weights at lr 2e-3, the rest at 1e-4, no dropout in "
            "the quantize stage), every number from runs on one machine (the AVX2 machine of the seventh "
            "screen; its teachers rebuilt there), mean ± std over `quantize.seed` 42, 1, 2. STS-B trains on "
            "its training set augmented x2 and SST-2 on 24,000 of its sentences with 2 quantize epochs "
            "(each with its own 3L fp32 student), as the table above found best. Thresholds: issue 12. Run "
            "with `python bench/quality.py --variants teacher l3_fp32 --threads 1`, then `--tasks mrpc "
            "cola rte --variants l3_w1a8_fast_nodrop`, `--tasks stsb --variants l3_w1a8_fast_aug_nodrop` "
            "and `--tasks sst2 --variants l3_w1a8_latent_lr20_d24k_e2_nodrop`, each with `--seeds 42 1 2 "
            "--threads 1`.\n\n" + now,
        )
    update_keeping_rows(
        "quality_recipes",
        "Quality: 1-bit recipes (issue 12 screen)",
        "3L W1A8 students of the MiniLM teacher, quantize stage only varied (same cached teacher and 3L fp32 "
        "student per task; `quantize.seed` for seeds). *Right after quantization*: the dev score of the "
        "binarized fp32 student before any quantize step. Settings and overrides: `bench/quality.py`; run "
        "with `python bench/quality.py --tasks stsb --variants l3_w1a8 l3_w1a8_ramp ... --threads 1`. "
        "*Packed file*: the exported model's size (mixed precision costs bytes). *Encoder signs changed*: "
        "the share of the encoder's linear weights whose sign the quantize stage changed (seed 42's run); "
        "the binary score follows it, and the latent weights' lr sets it (AdamW moves a latent weight by "
        "about lr per step): 1e-4 -> 1.6%, 1e-3 -> 5.9%, 2e-3 -> ~10% on STS-B. *3L W1A8* is plain XTC "
        "(`recipe=xtc`, every weight at lr 1e-4); the default `recipe=fast_latent` is the row *latent "
        "weights at lr 2e-3, the rest at 1e-4*.\n\n"
        + render_screen(table)
        + ("\n\n" + curves if (curves := render_curves(table)) else ""),
    )
    update_cola_screen(
        table,
        "quality_multistep",
        "Quality: multi-step distillation (issue 12, fifth screen)",
        "3L W1A8 students of the MiniLM teacher against the default recipe, from the same cached teacher "
        "and 3L fp32 student (rebuilt on 2026-12-01, they score as before: CoLA teacher 27.4). *Multi-step*: "
        "the binary student starts from the finished 3L W2A8 student of the default recipe (seed 42's run) "
        "and distils from it, layer for layer (`recipe.start_run`, `recipe.teacher=start_run`); *from the "
        "W2A8 student*: the same start, distilled from the task's teacher. Columns as in the screen above; "
        "seeds are `quantize.seed`.",
        FIFTH,
    )
    update_cola_screen(
        table,
        "quality_roles",
        "Quality: where CoLA's low-bit loss sits, and the levers left (issue 12, sixth screen)",
        "3L students of the MiniLM teacher on CoLA, from the same cached teacher and 3L fp32 student, "
        "against the default recipe (W1A8, `recipe=fast_latent`): the same quantize stage with 8-, 4- "
        "and 2-bit weights, and the default with one role's weights kept at 8 bits (symmetric, one scale "
        "per row; `quant.weight_by_target`), the rest binary. A role's gain over the default is what "
        "binarizing it costs. Mixed-precision rows are diagnoses and trade-offs, not 1-bit students. Then "
        "the 1-bit levers not yet measured on CoLA: the latent weights' lr (1e-3, 4e-3; the default 2e-3) "
        "and two-stage distillation (`distill=two_stage`), twice the quantize budget (6 epochs), and a "
        "transfer set of natural text (`augment=transfer`: SST-2's training sentences, unlabelled). "
        "Columns as in the screens above; seeds are `quantize.seed`.",
        SIXTH,
    )
    update_cola_screen(
        table,
        "quality_rest_lr",
        "Quality: the lr of the weights that stay full precision, and multi-step from W8A8 (issue 12, seventh screen)",
        "3L students of the MiniLM teacher, from the same cached teacher and 3L fp32 student per task "
        "(rebuilt on a new machine), against the default recipe (W1A8, `recipe=fast_latent`: the binary "
        "latent weights at lr 2e-3, every other weight at `quantize.lr` 1e-4). *The rest at 3e-4 / 1e-3*: "
        "`quantize.lr` raised for the weights that stay full precision (LayerNorms, biases, position "
        "embeddings, head), the latent weights still at 2e-3 (STS-B too: `--tasks stsb --variants "
        "l3_w1a8_fast_rest3e4`). *Multi-step from W8A8*: the binary student starts from the finished 3L "
        "W8A8 student and distils from it, layer for layer (`recipe.start_run`, `recipe.teacher=start_run`). "
        "Columns as in the screens above; seeds are `quantize.seed`.",
        SEVENTH,
    )
    update_cola_screen(
        table,
        "quality_pull",
        "Quality: oscillation dampening of the binary latent weights (issue 12, eighth screen)",
        "3L students of the MiniLM teacher on CoLA, from the same cached teacher and 3L fp32 student, "
        "against the default recipe (W1A8, `recipe=fast_latent`). *Pulled p of the way*: after every "
        "quantize step each binary latent weight moves the fraction p toward its binary value, its row's "
        "mean|w| times its sign (`recipe.latent_pull=p`; signs and scales kept, so the forward is "
        "unchanged): a decoupled form of Nagel et al.'s (2022) oscillation dampening. At the fast latent "
        "lr Adam moves every latent weight by about the lr each step, ~5% of a row's mean|w|; with the "
        "pull a sign flips only on a gradient that persists, and only while the lr exceeds p x mean|w| "
        "(the signs freeze as the lr decays). The STS-B rows are the default and 6 quantize epochs, all on "
        "the AVX2 machine of the seventh screen, whose STS-B teacher rebuilt to 84.5 (`--tasks stsb --variants l3_w1a8_latent_lr20 "
        "l3_w1a8_latent_lr20_e6`). Columns as in the screens above; seeds are `quantize.seed`.",
        EIGHTH,
    )
    update_cola_screen(
        table,
        "quality_dmd",
        "Quality: direction-matching distillation (issue 12, ninth screen)",
        "3L students of the MiniLM teacher, from the same cached teacher and 3L fp32 student per task, "
        "against the default recipe (W1A8, `recipe=fast_latent`), on the AVX2 machine of the seventh "
        "screen. *Direction matching* (`recipe.direction_matching=all`; BiBERT, Qin et al. 2022): in the "
        "quantize stage the attention-score MSE becomes the normalised distance || S/||S|| - T/||T|| || "
        "between the student's and the teacher's query, key and value similarity matrices (x.x^T per "
        "head), and the hidden states' MSE the same distance between the hidden states; the logits loss "
        "is unchanged. *Of the q/k/v similarity* (`recipe.direction_matching=attention`): the first only, "
        "the hidden MSE kept. STS-B too: `--tasks stsb --variants l3_w1a8_latent_lr20 l3_w1a8_fast_dmd "
        "l3_w1a8_fast_dmd_qkv l3_w1a8_fast_aug` (*augmented x2*: the STS-B recipe of the third screen, "
        "its own reduce stage, re-run on this machine). Columns as in the screens above; seeds are `quantize.seed`.",
        NINTH,
    )
    update_cola_screen(
        table,
        "quality_dropout",
        "Quality: dropout and batch size of the binary student (issue 12, tenth screen)",
        "3L students of the MiniLM teacher, from the same cached teacher and 3L fp32 student per task, "
        "against the default recipe (W1A8, `recipe=fast_latent`), on the AVX2 machine of the seventh "
        "screen. *No dropout*: the quantize stage trains the student with every dropout off "
        "(`recipe.dropout=0`, new; the reduce stage keeps MiniLM's 0.1). *Batch 16*: BiBERT's and BiT's "
        "batch, twice the optimizer steps in the same epochs (`data.batch_size=16`, the same teacher, its "
        "own reduce stage at batch 16). STS-B too: `--tasks stsb --variants l3_w1a8_latent_lr20 "
        "l3_w1a8_fast_nodrop l3_w1a8_fast_aug l3_w1a8_fast_aug_nodrop` (*augmented x2*: STS-B's recipe of the third screen, "
        "its own reduce stage). MRPC and SST-2 (their teachers rebuilt on this machine): `--tasks mrpc "
        "sst2 --variants teacher l3_fp32 l3_w1a8_latent_lr20 l3_w1a8_fast_nodrop "
        "l3_w1a8_latent_lr20_d24k_e2 l3_w1a8_latent_lr20_d24k_e2_nodrop` (SST-2's recipe: 24,000 "
        "sentences, 2 quantize epochs, its own reduce stage). RTE (its teacher rebuilt here too): `--tasks "
        "rte --variants teacher l3_fp32 l3_w1a8_latent_lr20 l3_w1a8_fast_nodrop`. Since this screen `recipe=fast_latent`, the "
        "default, trains without dropout (the *no dropout* rows); the rows labelled the default are its "
        "form until then, with dropout. Columns as in the screens above; seeds are `quantize.seed`.",
        TENTH,
        ("cola", "stsb", "mrpc", "rte", "sst2"),
    )


if __name__ == "__main__":
    main()

"""The trained fp32 student the no-training probes start from (``binary_start.py``,
``ptq_activations.py``): an HF folder given by ``--model-dir``, by default the 3-layer fp32 student
of the quality benchmark's ``<task>/l3_fp32`` run, with its task's dev data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from xtc_lightning.export.evaluate import dev_data  # noqa: E402
from xtc_lightning.tasks import GlueTask, get_task  # noqa: E402


def student_arguments(description: str, task: str) -> argparse.Namespace:
    """``--task`` (default ``task``), ``--model-dir``, ``--threads``; sets torch's threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--task", default=task)
    ap.add_argument("--model-dir", help="an HF folder; default: the quality run's 3L fp32 student")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def load_student(task_name: str, model_dir: str | None) -> tuple[str, GlueTask, object, torch.nn.Module]:
    """(the model folder, the task, its dev data (max length 128, batches of 64), the model in eval
    mode with eager attention). The GLUE copy: ``GLUE_DIR``, else ``../shared/data/glue``."""
    if model_dir is None:
        results = REPO / "bench" / "out" / "quality" / task_name / "l3_fp32" / "results.json"
        if not results.is_file():
            raise SystemExit(f"no --model-dir and no quality run at {results}: run bench/quality.py first")
        model_dir = json.loads(results.read_text())["stages"]["reduce"]["model_dir"]  # in the cache: absolute
    glue_dir = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    task = get_task(task_name)
    dm = dev_data(task, AutoTokenizer.from_pretrained(model_dir), glue_dir, max_length=128, batch_size=64)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    return model_dir, task, dm, model

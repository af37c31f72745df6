"""Deployment formats of a W1A8 MiniLM-3L: export sizes, ONNX Runtime agreement and speed beside our runtime.

The models are ``inference_speed.py``'s (all-MiniLM-L6-v2 + a seeded 2-label head; the 3-layer
student with binary row weights and per-token int8 activations, untrained: predictions are
compared with each other, not scored). From its packed file (scales and other tensors fp16,
the export default) this script writes every export format and reports:

    sizes       the packed file, the transformers folder's ``model.safetensors`` (``export/hf``),
                ``model.onnx``, the dequantized fp32 copy, the fp32 teacher file; file / bound
    agreement   ONNX Runtime (CPU) and ``from_pretrained`` of the folder against ``load_packed``
                on the whole SST-2 dev set (872 sentences, batches of 32 padded to their longest):
                same predictions and max |logit difference|
    speed       side by side in one process (``inference_speed.time_models``: rotating order,
                median per round, paired ratios): fp32 6L teacher, PyTorch dynamic int8 (sdpa),
                our runtime (padding skipped / padded), ONNX Runtime, on padded SST-2 batches

    .venv/bin/python bench/deploy.py --rounds 5 --threads 2

Prints JSON, writes ``bench/out/deploy.json`` and the "deploy" section of BENCHMARKS.md
(``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from benchmarks_md import update_section  # bench/ is on sys.path when run as a script
from inference_speed import build_models, make_batch, sst2_sentences, time_models
from transformers.modeling_outputs import SequenceClassifierOutput

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xtc_lightning.export import export_hf, export_packed, load_packed  # noqa: E402
from xtc_lightning.export.hf_packed import WEIGHTS_NAME, export_hf_packed  # noqa: E402
from xtc_lightning.export.onnx_export import export_onnx, onnx_logits, onnx_session  # noqa: E402
from xtc_lightning.models import minilm_path  # noqa: E402


class OnnxClassifier:
    """An ONNX Runtime session called like the torch models (``model(**batch).logits``)."""

    def __init__(self, path: Path, threads: int):
        self.session = onnx_session(path, threads=threads)

    def __call__(self, **batch) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=onnx_logits(self.session, batch))


def export_all(packed32: Path, workdir: Path) -> tuple[dict, Path, Path, Path]:
    """Every export format of the student: (sizes, packed fp16 file, transformers folder, onnx file)."""
    from transformers import AutoTokenizer

    model = load_packed(packed32)
    packed = workdir / "model.safetensors"
    quant = packed_quant(packed32)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    teacher_bytes = (Path(minilm_path()) / "model.safetensors").stat().st_size
    report = export_packed(
        model, packed, quant_cfg=quant, task="sst2", tokenizer=tokenizer, teacher_bytes=teacher_bytes
    )
    folder = export_hf_packed(packed, workdir / "hf")
    onnx_path = export_onnx(packed, workdir / "model.onnx")
    plain = export_hf(model, workdir / "hf-dequantized")
    hf_bytes = (folder / WEIGHTS_NAME).stat().st_size
    sizes = {
        "teacher_fp32_6L_file": teacher_bytes,
        "packed_file": report.file_bytes,
        "bound_bytes": round(report.bound_bytes),
        "packed_file_over_bound": report.file_bytes / report.bound_bytes,
        "hf_folder_weights": hf_bytes,
        "hf_folder_weights_over_bound": hf_bytes / report.bound_bytes,
        "onnx_file": onnx_path.stat().st_size,
        "hf_dequantized_weights": (plain / WEIGHTS_NAME).stat().st_size,
    }
    return sizes, packed, folder, onnx_path


def packed_quant(path: Path) -> dict:
    from xtc_lightning.export import packed_metadata

    return packed_metadata(path)["quant"]


@torch.inference_mode()
def agreement(reference, others: dict, tokenizer, sentences: list[str], batch: int = 32) -> dict:
    ref, outs = [], {name: [] for name in others}
    for i in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        x = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        ref.append(reference(**x).logits)
        for name, model in others.items():
            outs[name].append(model(**x).logits)
    ref_t = torch.cat(ref)
    result = {"examples": len(ref_t), "reference_max_abs_logit": ref_t.abs().max().item()}
    for name, chunks in outs.items():
        out = torch.cat(chunks)
        result[name] = {
            "same_predictions": int((out.argmax(-1) == ref_t.argmax(-1)).sum()),
            "max_abs_logit_diff": (out - ref_t).abs().max().item(),
        }
    return result


def report(result: dict, command: str) -> str:
    s, a = result["sizes"], result["agreement"]
    mb = 2**20
    lines = [
        f"Command: `{command}` ({result['date']}, torch {result['torch']}, onnxruntime {result['onnxruntime']}, "
        f"{result['threads']} threads, load average at the start {result['load_average']}). The W1A8 MiniLM-3L "
        "student of the inference benchmark (untrained head), exported with the defaults (fp16 scales and "
        "other tensors).",
        "",
        "| format | bytes | MiB | vs bound |",
        "|---|---:|---:|---:|",
        f"| packed file `export/model.safetensors` | {s['packed_file']:,} | {s['packed_file'] / mb:.2f} | "
        f"{s['packed_file_over_bound']:.4f} |",
        f"| transformers folder `export/hf/model.safetensors` | {s['hf_folder_weights']:,} | "
        f"{s['hf_folder_weights'] / mb:.2f} | {s['hf_folder_weights_over_bound']:.4f} |",
        f"| ONNX `export/model.onnx` (int8 codes: 1 byte per weight) | {s['onnx_file']:,} | {s['onnx_file'] / mb:.2f} | "
        f"{s['onnx_file'] / s['bound_bytes']:.2f} |",
        f"| dequantized copy `export/hf-dequantized/` (fp32) | {s['hf_dequantized_weights']:,} | "
        f"{s['hf_dequantized_weights'] / mb:.2f} | {s['hf_dequantized_weights'] / s['bound_bytes']:.2f} |",
        f"| fp32 6L teacher | {s['teacher_fp32_6L_file']:,} | {s['teacher_fp32_6L_file'] / mb:.2f} | "
        f"{s['teacher_fp32_6L_file'] / s['bound_bytes']:.2f} |",
        "",
        f"Agreement with `load_packed` on SST-2 dev ({a['examples']} sentences, batches of 32): ONNX Runtime "
        f"{a['onnxruntime']['same_predictions']}/{a['examples']} same predictions, max |logit diff| "
        f"{a['onnxruntime']['max_abs_logit_diff']:.2e}; `from_pretrained(export/hf)` "
        f"{a['from_pretrained']['same_predictions']}/{a['examples']}, max |logit diff| "
        f"{a['from_pretrained']['max_abs_logit_diff']:.1e} (logits up to {a['reference_max_abs_logit']:.2f}). "
        "ONNX sums the integer products exactly (MatMulInteger) where the reference rounds fp32 products, "
        "so it equals the int8 runtime's arithmetic, not the reference's last bits.",
        "",
    ]
    for key, t in result["timing"].items():
        lines += [
            f"**{key}**",
            "",
            "| model | median latency | sequences/s | speed-up vs fp32 6L teacher | vs dynamic int8 3L (sdpa) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in t.items():
            lines.append(
                f"| {name} | {r['median_s'] * 1000:.1f} ms | {r['throughput_seq_per_s']:.1f} | "
                f"{r['speedup_vs_teacher']:.2f}x | {r['speedup_vs_dynint8']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models, tokenizer = build_models(workdir)
        sizes, packed, folder, onnx_path = export_all(workdir / "w1a8.safetensors", workdir)
        ort_model = OnnxClassifier(onnx_path, args.threads)
        reference = load_packed(packed)
        hf_model = AutoModelForSequenceClassification.from_pretrained(folder)
        sentences = sst2_sentences()
        agree = agreement(
            reference, {"onnxruntime": ort_model, "from_pretrained": hf_model}, tokenizer, sentences
        )
        timed = {
            "teacher_fp32_6L": models["teacher_fp32_6L"],
            "dynint8_3L_sdpa": models["dynint8_3L_sdpa"],
            "runtime_w1a8_3L": models["runtime_w1a8_3L"],
            "runtime_w1a8_3L_padded": models["runtime_w1a8_3L_padded"],
            "onnxruntime_w1a8_3L": ort_model,
        }
        timing = {}
        for batch, calls in ((32, 1), (1, 5)):
            x = make_batch(tokenizer, sentences, batch, 128)
            key = f"batch {batch} x seq 128, padded SST-2 sentences"
            timing[key] = time_models(timed, x, args.rounds, calls, warmup=2)
            for r in timing[key].values():
                r.pop("rounds_s")
    result = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "load_average": [round(v, 2) for v in load],
        "sizes": sizes,
        "agreement": agree,
        "timing": timing,
    }
    print(json.dumps(result, indent=2))
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        command = f"python bench/deploy.py --rounds {args.rounds} --threads {args.threads}"
        update_section(
            "deploy", "Deployment formats: sizes, ONNX Runtime agreement and speed", report(result, command)
        )


if __name__ == "__main__":
    main()

"""Export a run's final model as a packed file, a transformers folder, and its dev score (``xtc-export``).

``export_model`` does the work for a model at hand: the pipeline's export stage passes its
in-memory best student (``stages.ExportStage``). ``export_run`` (``xtc export RUN_DIR``) first
rebuilds that model from a finished run folder, then calls the same ``export_model``.
From ``<run>/results.json`` and ``<run>/config_resolved.yaml``: the quantize stage's
student is rebuilt as in the pipeline (the reduce stage's model folder, or the teacher's
when no layer was dropped; ``apply_quantization`` with the run's ``quant``; the selected weights,
``quantize/weights.safetensors``, or the best checkpoint's ``student.*`` state (loaded with
``weights_only=True``) in run folders from before that file). A run whose last stage is the
teacher or the reduce stage exports that stage's fp32 model folder. Written into
``<run>/export/``::

    model.safetensors    the packed file (export_packed)
    model.tokenizer/     its tokenizer
    hf/                  the transformers folder: packed weights, ``quantization_config``, tokenizer
                         and model card (``hf_packed.py``, ``card.py``); ``from_pretrained`` after
                         ``import xtc_lightning``
    model.onnx           only with ``onnx``: the ONNX Runtime model (``onnx_export.py``), with its
                         agreement with the packed model on dev in export.json (``onnx``)
    hf-dequantized/      only with ``hf_dequantized``: plain HF folder, dequantized fp32 weights,
                         no activation quantization (``hf.py``), for tools that cannot import us
    export.json          what export_run returns (paths, size report, dev score)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from xtc_lightning.errors import UserError, entry_point
from xtc_lightning.export.card import model_card
from xtc_lightning.export.evaluate import evaluate_packed
from xtc_lightning.export.hf import export_hf
from xtc_lightning.export.hf_packed import WEIGHTS_NAME, export_hf_packed
from xtc_lightning.export.packed import export_packed, tokenizer_dir
from xtc_lightning.export.size import SizeReport
from xtc_lightning.finite import check_finite_weights
from xtc_lightning.quant import QuantConfig, apply_quantization, set_quantization_enabled, set_weight_form
from xtc_lightning.results import RESULTS_FILE, read_record, write_record
from xtc_lightning.resume import CONFIG_FILE
from xtc_lightning.slim import load_weights
from xtc_lightning.tasks import get_task

EXPORT_DIR = "export"
PACKED_NAME = "model.safetensors"
STUDENT_PREFIX = "student."


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """``results.json`` and the resolved config (``config_resolved.yaml``, plain values) of a run folder."""
    from omegaconf import OmegaConf

    results_path, config_path = run_dir / RESULTS_FILE, run_dir / CONFIG_FILE
    for p in (results_path, config_path):
        if not p.is_file():
            raise UserError(f"{run_dir} is not a finished run folder: {p.name} is missing")
    results = read_record(results_path, run_dir)
    if not isinstance(results.get("stages"), dict) or not results["stages"]:
        raise UserError(f"{results_path}: no stages recorded")
    return results, OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)


def _model_dir(results: dict, stage: str, path: Path) -> str:
    model_dir = results["stages"].get(stage, {}).get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise UserError(f"{path}: the {stage} stage's model folder {model_dir!r} is gone (cache cleaned?)")
    return model_dir


def quantize_base(results: dict, run_dir: Path) -> str:
    """The model folder the quantize stage started from (the reduce stage's, else the teacher's):
    the rebuilt student's architecture and the exported tokenizer."""
    return _model_dir(results, "reduce" if "reduce" in results["stages"] else "teacher", run_dir)


def quantize_weights(run_dir: Path, results: dict) -> tuple[dict, str]:
    """The quantize stage's selected student state and its file, read in ``run_dir``:
    ``weights.safetensors`` (see ``slim``), or in run folders written before it the best
    full-state checkpoint's ``student.*``."""
    stage = results["stages"]["quantize"]
    if stage.get("weights"):
        path = Path(stage["weights"])
        if not path.is_file():
            raise UserError(f"{run_dir}: the quantize stage's weights {str(path)!r} are missing")
        try:
            return load_weights(path), str(path)
        except Exception as err:  # not a safetensors file
            raise UserError(f"{path}: cannot load the weights ({type(err).__name__})") from None
    checkpoints = stage.get("checkpoints") or {}
    recorded = checkpoints.get("best") or checkpoints.get("last")
    path = Path(recorded) if recorded else None
    if not path or not path.is_file():
        raise UserError(f"{run_dir}: the quantize stage's checkpoint {str(path)!r} is missing")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or an object weights_only refuses
        raise UserError(f"{path}: cannot load the checkpoint ({type(err).__name__})") from None
    state = ckpt.get("state_dict", {})
    return {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}, str(
        path
    )


def rebuild_final_model(
    run_dir: Path, results: dict, config: dict
) -> tuple[nn.Module, QuantConfig, str, str]:
    """(model in eval mode, its quant config, the folder it was built from, the weights' source);
    ``config`` the run's resolved config (``read_run``)."""
    from xtc_lightning.config import ModelConfig
    from xtc_lightning.models import load_classifier

    task = get_task(results["task"])
    model = ModelConfig.from_dict(config["model"])
    final = results.get("final_stage") or list(results["stages"])[-1]
    if final != "quantize":
        base = _model_dir(results, final, run_dir)
        return load_classifier(model, task, name_or_path=base).eval(), QuantConfig(), base, base
    base = quantize_base(results, run_dir)
    quant = QuantConfig.from_dict(config["quant"])
    student = load_classifier(model, task, name_or_path=base)
    apply_quantization(student, quant)
    state, ckpt_path = quantize_weights(run_dir, results)
    load_student_weights(student, state, ckpt_path)
    return final_form(student, quant), quant, base, str(ckpt_path)


def load_student_weights(student: nn.Module, state: dict, source: str) -> None:
    """Load a quantize stage's selected ``state`` (from ``source``) into a rebuilt ``student``; it
    must fit exactly (names and shapes), else one ``UserError`` naming the first misfits."""
    own = student.state_dict()
    missing = sorted(set(own) - set(state))[:3]
    extra = sorted(set(state) - set(own))[:3]
    shapes = sorted(k for k in own if k in state and own[k].shape != state[k].shape)[:3]
    if missing or extra or shapes:
        raise UserError(
            f"{source}: does not fit the rebuilt student (missing {missing}, unexpected {extra}, "
            f"other shapes {shapes})"
        )
    student.load_state_dict(state, strict=True)


def final_form(student: nn.Module, quant: QuantConfig) -> nn.Module:
    """The quantized student as it is evaluated and exported: quantization on, every weight in its
    configured (final) form, eval mode. The same for a rebuilt student and the pipeline's own."""
    set_weight_form(student, quant)
    set_quantization_enabled(student, True)
    return student.cpu().eval()


def export_run(
    run_dir: str | Path,
    *,
    other_dtype: str = "float16",
    glue_dir: str | Path | None = None,
    hf: bool = True,
    hf_dequantized: bool = False,
    onnx: bool = False,
    evaluate: bool = True,
) -> dict:
    """Export a run's final model into ``<run>/export/``; returns (and writes as export.json) a summary.

    ``hf``: write ``hf/`` (packed weights, loads with ``from_pretrained``); ``hf_dequantized``:
    also write ``hf-dequantized/`` (fp32, no activation quantization); ``onnx``: also write
    ``model.onnx`` (an unsupported model is refused before anything is written).

    The dev evaluation of the packed file reads ``glue_dir`` (default: the run's ``data.dir``), or
    the run's ``data.hub_dataset`` when neither is set, as the run did; it is skipped (with the
    reason in ``dev.skipped``) when that folder is not on this machine.
    """
    run_dir = Path(run_dir).resolve()
    results, config = read_run(run_dir)
    model, quant, base, source = rebuild_final_model(run_dir, results, config)
    return export_model(
        model,
        quant,
        base,
        source,
        run_dir,
        results,
        config,
        other_dtype=other_dtype,
        glue_dir=glue_dir,
        hf=hf,
        hf_dequantized=hf_dequantized,
        onnx=onnx,
        evaluate=evaluate,
    )


def export_model(
    model: nn.Module,
    quant: QuantConfig,
    base: str,
    source: str,
    run_dir: Path,
    results: dict,
    config: dict,
    *,
    other_dtype: str = "float16",
    glue_dir: str | Path | None = None,
    hf: bool = True,
    hf_dequantized: bool = False,
    onnx: bool = False,
    evaluate: bool = True,
) -> dict:
    """``export_run``'s body for a model already at hand (the pipeline's best student in memory,
    or the one ``rebuild_final_model`` read back): ``model`` in its final form (``final_form``),
    ``base`` the folder of its tokenizer, ``source`` where its weights are recorded, ``results``
    and ``config`` the run's ``results.json`` and resolved config (plain values, as
    ``config_resolved.yaml`` holds it: ``RunConfig.resolved`` in the pipeline)."""
    from transformers import AutoTokenizer

    check_finite_weights(model, f"{source} (before exporting it)")
    if onnx:
        from xtc_lightning.export.onnx_export import check_supported

        check_supported(model, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    teacher_dir = results["stages"].get("teacher", {}).get("model_dir")
    teacher_file = Path(teacher_dir or "") / "model.safetensors"
    teacher_bytes = teacher_file.stat().st_size if teacher_dir and teacher_file.is_file() else None
    out_dir = run_dir / EXPORT_DIR
    packed_path = out_dir / PACKED_NAME
    size = export_packed(
        model,
        packed_path,
        quant_cfg=quant,
        task=results["task"],
        tokenizer=tokenizer,
        other_dtype=other_dtype,
        max_length=int(config["data"]["max_length"]),
        eval_batch_size=int(config["data"]["eval_batch_size"]),
        extra_meta={"run_dir": str(run_dir), "stage": results.get("final_stage"), "source": str(source)},
        teacher_bytes=teacher_bytes,
    )
    summary = {
        "packed": str(packed_path),
        "tokenizer": str(tokenizer_dir(packed_path)),
        "hf": None,
        "onnx": None,
        "hf_dequantized": (
            str(export_hf(model, out_dir / "hf-dequantized", tokenizer)) if hf_dequantized else None
        ),
        "other_dtype": other_dtype,
        "stage": results.get("final_stage"),
        "source": str(source),
        "size": size.as_dict(),
        "dev": None,
    }
    data_dir = glue_dir if glue_dir is not None else config["data"].get("dir")
    if evaluate:
        if not data_dir or Path(data_dir).is_dir():  # no folder: the run's hub dataset
            dev = evaluate_packed(packed_path, data_dir or None, hub_dataset=config["data"]["hub_dataset"])
            summary["dev"] = {
                "splits": dev["splits"],
                "score": dev["score"],
                "run_score": results.get("score"),
                "score_difference": None if results.get("score") is None else dev["score"] - results["score"],
            }
        else:
            summary["dev"] = {"skipped": f"the run's GLUE folder is not here (data.dir={data_dir!r})"}
    if onnx:
        from xtc_lightning.export.onnx_export import export_onnx, onnx_agreement

        onnx_path = export_onnx(packed_path, out_dir / "model.onnx")
        summary["onnx"] = {"path": str(onnx_path), "file_bytes": onnx_path.stat().st_size}
        if "score" in (summary["dev"] or {}):
            summary["onnx"]["dev"] = onnx_agreement(packed_path, onnx_path, data_dir)
    if hf:
        card = model_card(results, config, _overrides(run_dir), summary)
        folder = export_hf_packed(packed_path, out_dir / "hf", card=card)
        summary["hf"] = str(folder)
        summary["hf_file_bytes"] = (folder / WEIGHTS_NAME).stat().st_size
    write_record(out_dir / "export.json", summary, run_dir)
    return summary


def _overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (Hydra's ``.hydra/overrides.yaml``), [] if not recorded."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xtc-export", description="Export a finished run's final model as a packed low-bit file."
    )
    parser.add_argument("run_dir", help="a run folder (holding results.json and config_resolved.yaml)")
    parser.add_argument(
        "--other-dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="width of scales and non-quantized tensors (float32: bit-exact with the trained model)",
    )
    parser.add_argument("--data-dir", default=None, help="GLUE folder for the dev check (default: the run's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers folder hf/")
    parser.add_argument(
        "--hf-dequantized",
        action="store_true",
        help="also write hf-dequantized/: fp32 weights, no activation quantization, no xtc import needed",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx (ONNX Runtime; needs the onnx extra)"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the dev evaluation of the packed file")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    summary = export_run(
        args.run_dir,
        other_dtype=args.other_dtype,
        glue_dir=args.data_dir,
        hf=not args.no_hf,
        hf_dequantized=args.hf_dequantized,
        onnx=args.onnx,
        evaluate=not args.no_eval,
    )
    print(SizeReport.from_dict(summary["size"]).text())
    print(f"packed: {summary['packed']}")
    dev = summary["dev"] or {}
    if "score" in dev:
        run = "-" if dev["run_score"] is None else f"{100 * dev['run_score']:.2f}"
        print(f"dev score of the packed file: {100 * dev['score']:.2f} (run: {run})")
    elif "skipped" in dev:
        print(f"dev evaluation skipped: {dev['skipped']}")
    if summary["onnx"]:
        print(f"onnx: {summary['onnx']['path']}")
        agree = summary["onnx"].get("dev")
        if agree:
            same = (
                ""
                if agree["same_predictions"] is None
                else f"{agree['same_predictions']}/{agree['examples']} "
            )
            print(
                f"onnx vs packed on dev: {same}same predictions, max |logit diff| {agree['max_abs_logit_diff']:.2e}"
            )


if __name__ == "__main__":
    main()

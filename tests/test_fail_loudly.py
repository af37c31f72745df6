"""Issue 13's regressions: a diverged, misconfigured or concurrent run fails in one ``error:`` line
(exit 2) instead of finishing with a normal-looking result, and leaves nothing misleading behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_train
from xtc_lightning.errors import UserError
from xtc_lightning.slim import WEIGHTS_NAME, load_weights


def one_error(proc, pattern: str) -> str:
    """The run failed with exit code 2 and exactly one ``error:`` line matching ``pattern``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def tiny_args(tiny_bert_dir, *extra: str) -> list[str]:
    return [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "data.max_train_examples=64",
        "data.max_length=32", "trainer.max_epochs=1", *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- 1. non-finite values


def test_diverging_stage_stops_with_the_stage_step_and_losses(tmp_path, glue_dir, tiny_bert_dir):
    proc = run_train(
        tiny_args(tiny_bert_dir, "quant=binary", "quantize.lr=1e6", "recipe.latent_lr=1e6"),
        tmp_path,
        glue_dir,
    )
    one_error(proc, r"quantize: the loss went non-finite at step \d+ \(epoch 0\): .*train/loss=nan")
    (run,) = (tmp_path / "runs").glob("*/*")
    assert (run / "teacher" / "result.json").is_file()  # the teacher was fine and is kept
    assert not (run / "results.json").exists() and not (run / "quantize" / "result.json").exists()
    assert not list((run / "quantize").glob("checkpoints/*.ckpt"))  # the NaN weights were never saved


def test_nan_label_is_a_data_error_with_file_and_line(tmp_path, glue_dir):
    from xtc_lightning.data import read_local_split
    from xtc_lightning.tasks import get_task

    folder = tmp_path / "STS-B"
    folder.mkdir()
    lines = (glue_dir / "STS-B" / "train.tsv").read_text().splitlines()[:6]
    fields = lines[3].split("\t")
    fields[-1] = "nan"
    lines[3] = "\t".join(fields)
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train.tsv:4: bad label 'nan' \(accepted: a finite number\)"):
        read_local_split(get_task("stsb"), tmp_path, "train")


def test_non_finite_weights_are_never_cached_or_exported(tmp_path):
    from conftest import tiny_classifier
    from xtc_lightning.cache import publish_to_cache
    from xtc_lightning.results import StageResult

    model = tiny_classifier("bert", num_layers=1)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    cache = tmp_path / "cache" / "teachers" / "rte-x"
    with pytest.raises(
        UserError,
        match=r"teacher \(before caching it\): non-finite weights \(NaN/inf\) in 'classifier.weight'",
    ):
        publish_to_cache(cache, StageResult("teacher", metrics_best={}, score_best=0.5), model, None)
    assert not cache.parent.exists() or not any(cache.parent.iterdir())


def test_results_json_refuses_nan(tmp_path):
    from xtc_lightning.results import write_json_atomic

    with pytest.raises(UserError, match=r"'stages.quantize.score_best' is not finite"):
        write_json_atomic(tmp_path / "results.json", {"stages": {"quantize": {"score_best": float("nan")}}})
    assert not list(tmp_path.iterdir())


def _packed(tmp_path: Path) -> Path:
    from test_export import CONFIGS, tiny_model
    from xtc_lightning.export import export_packed

    path = tmp_path / "model.safetensors"
    export_packed(tiny_model(CONFIGS["w1a8"]), path, quant_cfg=CONFIGS["w1a8"], task="rte")
    return path


def test_packed_writer_refuses_non_finite_tensors(tmp_path):
    from test_export import CONFIGS, tiny_model
    from xtc_lightning.export import export_packed

    model = tiny_model(CONFIGS["w1a8"])
    with torch.no_grad():
        model.classifier.bias[0] = float("inf")
    with pytest.raises(UserError, match=r"classifier.bias: non-finite values \(NaN/inf\) cannot be stored"):
        export_packed(model, tmp_path / "m.safetensors", quant_cfg=CONFIGS["w1a8"], task="rte")
    assert not list(tmp_path.iterdir())


def test_packed_reader_refuses_non_finite_scales_even_with_a_valid_checksum(tmp_path):
    from test_export import rewrite_packed
    from xtc_lightning.export import load_packed

    name = "bert.encoder.layer.0.attention.self.query.weight:scale"

    def nan_scale(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][0] = float("nan")

    bad = rewrite_packed(_packed(tmp_path), tmp_path / "nan.safetensors", edit_tensors=nan_scale, resign=True)
    with pytest.raises(
        UserError,
        match=r"'bert.encoder.layer.0.attention.self.query.weight' has non-finite scales \(NaN/inf\)",
    ):
        load_packed(bad)


# ----------------------------------------------------------------------------- 2. config checked first

BAD_CONFIGS = [
    (["student.layers=[0,99]"], r"student 'teacher': student layers=\[0, 99\] has invalid index 99: expected integers from 0 to 1"),
    (["student.layers=[]"], r"student layers=\[\] is empty"),
    (["student.layers=[1,1]"], r"student layers=\[1, 1\] must be strictly increasing"),
    (["student.num_layers=0"], r"student num_layers=0 is invalid: expected an integer from 1 to 2"),
    (["student=l6"], r"student 'l6': .* has 6 entries but the teacher has only 2 layers"),
    (["optim.lr=0"], r"optim.lr=0 is not accepted: expected a number > 0"),
    (["optim.lr=-1e-3"], r"optim.lr=-0.001 is not accepted"),
    (["quantize.lr=0"], r"quantize.lr=0 is not accepted: expected a number > 0"),
    (["quantize.warmup_epochs=-1"], r"quantize.warmup_epochs=-1 is not accepted: expected a number >= 0"),
    (["optim.warmup_epochs=x"], r"optim.warmup_epochs='x' is not accepted: expected a number >= 0"),
    (["data.batch_size=0"], r"data.batch_size=0 is not accepted: expected an integer >= 1"),
    (["data.max_length=0"], r"data.max_length=0 is not accepted: expected an integer >= 1"),
    (["data.max_length=-5"], r"data.max_length=-5 is not accepted"),
    (["+unknown_key=1"], r"unknown config key 'unknown_key' \(added with \+\?\); top-level keys are: augment, checkpoint"),
    (["+data.batchsize=8"], r"unknown config key 'data.batchsize'; data has: batch_size"),
    (["progress=fancy"], r"progress='fancy' is not accepted; choose one of: auto, bar, plain"),
    # two-stage distillation: each distilling stage's own budget, at startup, not when the stage starts
    (["distill=two_stage", "student.num_layers=1", "reduce.max_epochs=1"], r"^distill 'two_stage': intermediate_fraction=0.5 of reduce.max_epochs=1 gives 1 intermediate epoch\(s\); both stages need at least one epoch$"),
    (["distill=two_stage", "quantize.max_epochs=1"], r"^distill 'two_stage': intermediate_fraction=0.5 of quantize.max_epochs=1 gives"),
    (["distill=logits_only", "recipe.direction_matching=all"], r"^recipe.direction_matching=all changes the attention and hidden loss, but distill=logits_only weights it 0: use distill=xtc or set recipe.direction_matching=none$"),
    (["distill.weights.attention=0", "recipe.direction_matching=attention"], r"^recipe.direction_matching=attention changes the attention loss, but distill=xtc weights it 0"),
    (["distill=two_stage", "quantize.max_epochs=-1"], r"^distill 'two_stage': two-stage distillation needs quantize.max_epochs >= 2, got -1$"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[b[0][0] for b in BAD_CONFIGS])
def test_bad_config_values_are_refused_by_run_config(tmp_path, tiny_bert_dir, overrides, message):
    from conftest import compose_job_config
    from xtc_lightning.config import run_config

    cfg, _ = compose_job_config(
        ["task=rte", f"model.name_or_path={tiny_bert_dir}", *overrides], tmp_path / "run"
    )
    with pytest.raises(UserError, match=message) as err:
        run_config(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("preset", ["quickstart", "xtc_l6_w1a8"])
def test_presets_and_defaults_pass_run_config(tmp_path, tiny_bert12_dir, preset):
    from conftest import compose_job_config
    from xtc_lightning.config import run_config

    for overrides in ([], [f"experiment={preset}", f"model.name_or_path={tiny_bert12_dir}"]):
        cfg, _ = compose_job_config(overrides, tmp_path / "run")
        run_config(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["distill=two_stage", "reduce.max_epochs=1"],  # the student keeps every layer: no reduce stage
        ["distill=two_stage", "quant=fp32", "quantize.max_epochs=1"],  # nothing to quantize
        ["distill=two_stage", "student.num_layers=1", "stage=teacher", "reduce.max_epochs=1"],  # stops before
    ],
)
def test_two_stage_budget_of_a_stage_that_does_not_run_is_not_refused(tmp_path, tiny_bert_dir, overrides):
    from conftest import compose_job_config
    from xtc_lightning.config import run_config

    cfg, _ = compose_job_config(
        ["task=rte", f"model.name_or_path={tiny_bert_dir}", *overrides], tmp_path / "run"
    )
    assert run_config(cfg).distill.intermediate_fraction == 0.5


def test_every_bad_value_is_its_own_error_line(tmp_path, tiny_bert_dir):
    """Bad values in different groups are all reported, one ``error:`` line each, before any work."""
    proc = run_train([*tiny_args(tiny_bert_dir), "data.batch_size=0", "distill.temperature=0"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: data.batch_size=0 is not accepted: expected an integer >= 1",
        "error: distill 'xtc': temperature=0 is invalid: expected a number > 0",
    ]
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("runs/*/*"))


def test_bad_student_is_refused_before_the_teacher_trains(tmp_path, glue_dir, tiny_bert_dir):
    proc = run_train(tiny_args(tiny_bert_dir, "student.layers=[0,99]"), tmp_path, glue_dir)
    one_error(proc, r"invalid index 99: expected integers from 0 to 1 \(the teacher has 2 layers")
    assert not list(tmp_path.glob("runs/*/*/teacher")) and not (tmp_path / "cache" / "teachers").exists()


# ----------------------------------------------------------------------------- 3. deterministic stages


def test_quantize_is_bit_identical_after_fresh_and_cached_teacher_and_reduce(
    tmp_path, glue_dir, tiny_bert_dir
):
    from conftest import compose_job_config
    from xtc_lightning import pipeline

    overrides = [
        *tiny_args(tiny_bert_dir, "student.num_layers=1", "quant=binary", "stage=quantize"),
        f"data.dir={glue_dir}", f"paths.root_dir={tmp_path}", "num_threads=1", "progress=plain",
        "checkpoint.every_n_train_steps=null",
    ]  # fmt: skip
    states = []
    for name in ("fresh", "cached"):
        cfg, _ = compose_job_config(overrides, tmp_path / name)
        results = pipeline.run(cfg)
        assert bool(results["stages"]["teacher"].get("cached")) == (name == "cached")
        assert bool(results["stages"]["reduce"].get("cached")) == (name == "cached")
        # the finished stage keeps its selected weights only (slim.py)
        states.append(load_weights(tmp_path / name / "quantize" / WEIGHTS_NAME))
    fresh, cached = states
    assert fresh.keys() == cached.keys() and len(fresh) > 10
    different = [k for k in fresh if not torch.equal(fresh[k], cached[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------------------- 4 and 7. the run folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, glue_dir, tiny_bert_dir) -> tuple[Path, list[str]]:
    """A finished tiny teacher-only run in a known folder, and its arguments."""
    root = tmp_path_factory.mktemp("teacher_run")
    args = [*tiny_args(tiny_bert_dir, "stage=teacher"), f"hydra.run.dir={root / 'run'}"]
    proc = run_train(args, root, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", args


def test_refused_continuation_leaves_the_folder_byte_for_byte(tmp_path, glue_dir, teacher_run):
    run, args = teacher_run
    before = snapshot(run)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "results.json"} <= set(before)
    proc = run_train([*args, "data.max_length=48"], run.parent, glue_dir)
    one_error(proc, r"was started with another config: data.max_length=32->48")
    assert snapshot(run) == before


def test_refused_fresh_run_leaves_no_folder(tmp_path, glue_dir, tiny_bert_dir):
    for i, (bad, message) in enumerate(
        (
            ("optim.lr=0", "optim.lr=0 is not accepted"),
            ("task=qnli", "QNLI/train.tsv not found"),
        )
    ):
        run = tmp_path / f"run{i}"
        proc = run_train([*tiny_args(tiny_bert_dir), bad, f"hydra.run.dir={run}"], tmp_path, glue_dir)
        one_error(proc, message)
        assert not run.exists()
    proc = run_train([*tiny_args(tiny_bert_dir), "data.max_length=0"], tmp_path, glue_dir)
    one_error(proc, "data.max_length=0 is not accepted")
    assert not list(tmp_path.glob("runs/*/*"))


def test_a_second_process_on_a_run_folder_is_refused(tmp_path, glue_dir, teacher_run):
    import fcntl

    run, args = teacher_run
    before = snapshot(run)
    with open(run / ".lock") as held:  # as the first process holds it while it runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_train(args, run.parent, glue_dir)
    one_error(proc, rf"run folder {re.escape(str(run))} is in use by another running process")
    assert snapshot(run) == before
    # the holder is gone (the kernel dropped its lock): the folder is usable again
    proc = run_train(args, run.parent, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- 5. one line, not a traceback


@pytest.mark.parametrize(
    "content",
    [
        "sentence1\tsentence2\tlabel\nA man.\tA person.\tentailment\n".encode("utf-16"),
        bytes(range(256)) * 4,
    ],
    ids=["utf16", "binary"],
)
def test_non_utf8_tsv_is_named_as_not_utf8_text(tmp_path, content):
    from xtc_lightning.data import read_local_split
    from xtc_lightning.tasks import get_task

    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_bytes(content)
    with pytest.raises(UserError, match=r"RTE/train.tsv: not UTF-8 text \(.* at byte \d+\)"):
        read_local_split(get_task("rte"), tmp_path, "train")


def test_utf16_tsv_run_fails_in_one_line(tmp_path, glue_dir, tiny_bert_dir):
    data = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", data / "RTE")
    train = data / "RTE" / "train.tsv"
    train.write_bytes(train.read_text().encode("utf-16"))
    proc = run_train([*tiny_args(tiny_bert_dir), f"data.dir={data}"], tmp_path, None)
    one_error(proc, rf"{re.escape(str(train))}: not UTF-8 text")


def _model_cfg(path: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"name_or_path": str(path), "trust_remote_code": False})


def test_truncated_model_safetensors_is_one_line(tmp_path, tiny_bert_dir):
    from xtc_lightning.models import load_classifier
    from xtc_lightning.tasks import get_task

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    data = (model / "model.safetensors").read_bytes()
    for cut in (4, 1000, len(data) // 2):
        (model / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(
            UserError, match=r"safetensors weights are corrupt or truncated|cannot load the model"
        ):
            load_classifier(_model_cfg(model), get_task("rte"))


def test_pickle_only_model_folder_is_refused_in_one_line(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file

    from xtc_lightning.models import load_classifier
    from xtc_lightning.tasks import get_task

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(
        UserError,
        match=r"holds only pickle weights \(pytorch_model.bin\); only safetensors weights are loaded",
    ):
        load_classifier(_model_cfg(model), get_task("rte"))


def test_model_types_without_padding_or_classifier_head_are_refused(tmp_path, tiny_bert_dir):
    from transformers import GPT2Config, ViTConfig

    from conftest import compose_job_config
    from xtc_lightning.config import run_config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(tmp_path / "gpt2")
    ViTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    for name, message in (
        ("gpt2", r"model '.*gpt2' \('gpt2'\) has no padding token \(pad_token_id\)"),
        ("vit", r"model '.*vit' is a 'vit' model, which has no sequence-classification head"),
    ):
        cfg, _ = compose_job_config([f"model.name_or_path={tmp_path / name}"], tmp_path / "run")
        with pytest.raises(UserError, match=message):
            run_config(cfg)


def test_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
    from xtc_lightning import runfolder

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(runfolder.os, "access", lambda path, mode: False)  # root ignores chmod
    with pytest.raises(
        UserError, match=rf"run folder {re.escape(str(run))} is not writable: Permission denied"
    ):
        runfolder.lock_run_folder(run)


def test_checkpoint_cut_short_never_remains_under_its_final_name(tmp_path):
    from types import SimpleNamespace

    from xtc_lightning.callbacks import LastCheckpoint

    def full_disk(path, weights_only):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        save_checkpoint=full_disk,
        is_global_zero=True,
        global_step=3,
    )
    callback = LastCheckpoint(tmp_path, every_n_train_steps=None)
    (tmp_path / "last.ckpt").write_bytes(b"the previous complete checkpoint")
    with pytest.raises(OSError, match="No space left"):
        callback.on_train_epoch_end(trainer, None)
    assert (tmp_path / "last.ckpt").read_bytes() == b"the previous complete checkpoint"


# ----------------------------------------------------------------------------- 8. typos


def test_typo_in_a_key_is_one_line_with_the_nearest_key(tmp_path):
    proc = run_train(["tsak=sst2"], tmp_path)
    one_error(proc, r"unknown config key 'tsak' in 'tsak=sst2'; did you mean 'task'\?")
    assert not (tmp_path / "runs").exists()


def test_override_keys_check_passes_hydra_grammar_and_names_nested_typos():
    from xtc_lightning.cli import check_override_keys

    check_override_keys(["-m", "task=rte,mrpc", "optim.lr=1e-3", "hydra.run.dir=x", "hydra/launcher=slurm",
                         "+foo=1", "~data.dir", "trainer.max_epochs=1", "experiment=null"])  # fmt: skip
    with pytest.raises(
        UserError,
        match=r"unknown config key 'data.batchsize' in 'data.batchsize=8'; did you mean 'data.batch_size'\?",
    ):
        check_override_keys(["data.batchsize=8"])


# ----------------------------------------------------------------------------- 9. checksum is not authentication


def _edit_json(meta: dict, key: str, edit) -> None:
    value = json.loads(meta[key])
    edit(value)
    meta[key] = json.dumps(value, separators=(",", ":"), sort_keys=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update(task=json.dumps("mnli")),
            r"impossible metadata: task 'mnli' has 3 label\(s\) .*the stored classifier has 2",
        ),
        (
            lambda m: m.update(task=json.dumps("nosuchtask")),
            r"impossible metadata: unknown task 'nosuchtask'",
        ),
        (
            lambda m: _edit_json(m, "quant", lambda q: q["activation"].update(bits=16)),
            r"impossible metadata: quant.activation.bits=16 is not supported: accepted 4 or 8",
        ),
        (
            lambda m: _edit_json(m, "quant", lambda q: q["activation"].update(bits=4)),
            r"impossible metadata: module '.*' is stored as .*symmetric 8b.*, not as the file's quant config says",
        ),
    ],
    ids=["task-labels", "unknown-task", "activation-bits-16", "activation-bits-disagree"],
)
def test_re_signed_impossible_metadata_is_refused(tmp_path, edit, message):
    from test_export import rewrite_packed
    from xtc_lightning.export import load_packed

    bad = rewrite_packed(_packed(tmp_path), tmp_path / "edited.safetensors", edit_meta=edit, resign=True)
    with pytest.raises(UserError, match=message) as err:
        load_packed(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_export_refuses_a_classifier_whose_label_count_differs_from_the_task(tmp_path):
    from test_export import CONFIGS, tiny_model
    from xtc_lightning.export import export_packed

    with pytest.raises(UserError, match=r"cannot export a 3-label classifier as task 'rte' \(2 label\(s\)\)"):
        export_packed(
            tiny_model(CONFIGS["w1a8"], num_labels=3),
            tmp_path / "m.safetensors",
            quant_cfg=CONFIGS["w1a8"],
            task="rte",
        )


def test_readme_bad_input_table_is_asserted():
    """Every message of the README's "Bad input" table is asserted by a test (regex escapes aside)."""
    from conftest import REPO

    section = (REPO / "README.md").read_text().split("\n### Bad input\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    sources = "".join(
        (REPO / "tests" / name).read_text()
        for name in ("test_fail_loudly.py", "test_train_teacher.py", "test_export.py")
    ).replace("\\", "")
    messages = [row.split(" | ")[1].strip(" |`") for row in rows]
    assert len(messages) >= 25
    missing = [m for m in messages if m not in sources]
    assert not missing, missing

"""logger=wandb: one offline wandb run per pipeline run, read back from the files wandb wrote."""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

from conftest import run_train

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type, data) records


def wandb_records(path: Path) -> list[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of a split one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "a/b" metric names come as nested keys


def read_offline_run(run_dir: Path) -> dict:
    """id, config, summary, history keys and exit code of the one offline wandb run in ``run_dir``."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"config": {}, "summary": {}, "history": set(), "exit_code": None, "file": run_file}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"] = record.run.run_id, record.run.run_group
        elif kind == "config":
            out["config"].update({item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({item_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            out["history"].update(item_key(i) for i in record.history.item)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


ARGS = [
    "task=rte", "student.num_layers=1", "quant=binary", "stage=quantize", "data.max_train_examples=32",
    "data.max_length=64", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger=wandb",
]  # fmt: skip


def test_one_offline_wandb_run_holds_config_stage_metrics_and_the_final_score(
    tmp_path, glue_dir, tiny_bert_dir
):
    run_dir = tmp_path / "runs" / "rte-l1-w1a8" / "job-7"
    args = [*ARGS, f"model.name_or_path={tiny_bert_dir}", f"hydra.run.dir={run_dir}"]
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    run = read_offline_run(run_dir)
    assert run["id"] == "rte-l1-w1a8-job-7" and run["group"] == "rte-teacher-w1a8" and run["exit_code"] == 0
    # the resolved config as a plain dict, the stages' metrics under their prefixes
    assert run["config"]["task"] == {"name": "rte"} and run["config"]["optim"]["lr"] == 5e-5
    assert run["config"]["trainer"]["max_epochs"] == 1 and run["config"]["logger"]["wandb"]["offline"] is True
    for stage in ("teacher", "reduce", "quantize"):
        assert {f"{stage}-train/loss", f"{stage}-val/score"} <= run["history"]
        assert run["summary"][f"{stage}/score"] == results["stages"][stage]["score_best"]
    assert run["summary"]["score"] == results["score"] and run["summary"]["final_stage"] == "quantize"

    # the same run folder again (a resumed run): the same wandb run id, the summary again
    proc = run_train(args, tmp_path, glue_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == "run-rte-l1-w1a8-job-7.wandb" for f in files)


def test_wandb_run_is_finished_when_the_pipeline_fails(tmp_path, glue_dir, tiny_bert_dir):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"model.name_or_path={tiny_bert_dir}", f"hydra.run.dir={run_dir}"]
    proc = run_train([*args, f"teacher.checkpoint={tmp_path / 'missing'}"], tmp_path, glue_dir)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    run = read_offline_run(run_dir)
    assert run["exit_code"] == 1 and run["config"]["task"] == {"name": "rte"}


def test_wandb_run_id_prefers_the_config_then_the_sweep_agent_then_the_run_folder(monkeypatch):
    from xtc_lightning.loggers import wandb_id

    folder = Path("/x/runs/rte-l3-w1a8/slurm-42")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    assert wandb_id(None, folder) == "rte-l3-w1a8-slurm-42"
    assert wandb_id(None, Path("/x/runs/a b/multirun-1/3")) == "multirun-1-3"
    monkeypatch.setenv("WANDB_RUN_ID", "agent7")  # set by `wandb agent` for each run it starts
    assert wandb_id(None, folder) == "agent7"
    assert wandb_id("mine", folder) == "mine"

"""The GLUE data module on the real offline files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from xtc_lightning.data import GlueDataModule, load_tokenized, read_local_split, subsample, tokenize
from xtc_lightning.errors import UserError
from xtc_lightning.tasks import TASKS, get_task

# Official GLUE sizes of the splits in the offline copy.
OFFICIAL_SIZES = {
    ("sst2", "train"): 67349,
    ("sst2", "dev"): 872,
    ("cola", "train"): 8551,
    ("cola", "dev"): 1043,
    ("mrpc", "train"): 3668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2490,
    ("rte", "dev"): 277,
    ("stsb", "train"): 5749,
    ("stsb", "dev"): 1500,
    ("qnli", "dev"): 5463,
}


@pytest.mark.parametrize(("task", "split"), sorted(OFFICIAL_SIZES))
def test_split_sizes_and_labels(glue_dir, task, split):
    t = get_task(task)
    ex = read_local_split(t, glue_dir, split)
    assert len(ex) == OFFICIAL_SIZES[(task, split)]
    assert all(len(texts) == len(t.text_columns) for texts in ex.texts)
    assert all(text.strip() for texts in ex.texts for text in texts)
    if t.is_regression:
        assert all(isinstance(y, float) for y in ex.labels)
        assert min(ex.labels) == 0.0 and max(ex.labels) == 5.0
    else:
        assert set(ex.labels) == set(range(t.num_labels))


def test_file_quirks(glue_dir):
    # MRPC: the header's BOM must not hide the 'Quality' column; first dev row from the file.
    mrpc = read_local_split(get_task("mrpc"), glue_dir, "dev")
    assert mrpc.labels[0] == 1
    assert mrpc.texts[0][0].startswith("He said the foodservice pie business")
    # CoLA has no header: the first row is data.
    cola = read_local_split(get_task("cola"), glue_dir, "dev")
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.",)
    # QNLI rows that start with a quote stay one row each (no CSV quote merging).
    qnli = read_local_split(get_task("qnli"), glue_dir, "dev")
    quoted = [t for t in qnli.texts if t[1].startswith('"')]
    assert len(quoted) >= 5
    assert qnli.labels.count(0) + qnli.labels.count(1) == 5463
    # labels are the hub's ids: RTE/QNLI entailment = 0
    rte = read_local_split(get_task("rte"), glue_dir, "dev")
    raw = (glue_dir / "RTE" / "dev.tsv").read_text().splitlines()[1].split("\t")[-1]
    assert rte.labels[0] == (0 if raw == "entailment" else 1)


def test_subsample_is_reproducible_and_keeps_order(glue_dir):
    ex = read_local_split(get_task("rte"), glue_dir, "train")
    a, b = subsample(ex, 100, seed=1), subsample(ex, 100, seed=1)
    c = subsample(ex, 100, seed=2)
    assert a.texts == b.texts and a.texts != c.texts
    positions = [ex.texts.index(t) for t in a.texts]
    assert positions == sorted(positions)
    assert a.source_hash != ex.source_hash
    with pytest.raises(UserError, match="max_train_examples=0"):
        subsample(ex, 0, seed=1)


def test_bad_files_fail_in_one_line(tmp_path):
    sst = tmp_path / "SST-2"
    sst.mkdir()
    task = get_task("sst2")
    with pytest.raises(UserError, match="split file .*train.tsv not found"):
        read_local_split(task, tmp_path, "train")
    (sst / "train.tsv").write_text("text\tlabel\nfine movie\t1\n")
    with pytest.raises(UserError, match=r"missing column\(s\) \['sentence'\]"):
        read_local_split(task, tmp_path, "train")
    (sst / "train.tsv").write_text("sentence\tlabel\nfine movie\t7\n")
    with pytest.raises(UserError, match=r"train.tsv:2: bad label '7'"):
        read_local_split(task, tmp_path, "train")
    (sst / "train.tsv").write_text("sentence\tlabel\nfine movie\n")
    with pytest.raises(UserError, match=r"train.tsv:2: expected 2 tab-separated columns, found 1"):
        read_local_split(task, tmp_path, "train")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


def test_tokenization_cache_is_reused_and_keyed(glue_dir, tokenizer, tmp_path, monkeypatch):
    ex = read_local_split(get_task("rte"), glue_dir, "dev")
    first = load_tokenized(ex, tokenizer, 64, tmp_path, "rte-dev")
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("xtc_lightning.data.tokenize", no_tokenizing)
    again = load_tokenized(ex, tokenizer, 64, tmp_path, "rte-dev")
    assert np.array_equal(first.input_ids, again.input_ids)
    monkeypatch.undo()
    load_tokenized(ex, tokenizer, 32, tmp_path, "rte-dev")  # another max length: another entry
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert max(first.length(i) for i in range(len(first))) == 64


def test_tokenizing_in_chunks_gives_the_same_arrays(glue_dir, tokenizer, monkeypatch):
    ex = subsample(read_local_split(get_task("mrpc"), glue_dir, "train"), 50, 0)
    whole = tokenize(ex, tokenizer, 64)
    monkeypatch.setattr("xtc_lightning.data.TOKENIZE_CHUNK", 7)
    chunked = tokenize(ex, tokenizer, 64)
    assert set(whole) == set(chunked) == {"input_ids", "token_type_ids", "offsets", "labels", "index"}
    for name, array in whole.items():
        assert np.array_equal(array, chunked[name]) and array.dtype == chunked[name].dtype, name
    assert len(whole["offsets"]) == 51 and whole["offsets"][-1] == len(whole["input_ids"])


def test_datamodule_batches(glue_dir, tokenizer, tmp_path):
    dm = GlueDataModule(
        get_task("mrpc"),
        tokenizer,
        glue_dir=str(glue_dir),
        hub_dataset="nyu-mll/glue",
        max_length=128,
        batch_size=8,
        eval_batch_size=16,
        max_train_examples=40,
        num_workers=0,
        cache_dir=str(tmp_path),
        seed=0,
    )
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.dev_sets["dev"]) == 408
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    # dynamic padding: the batch is as long as its longest sequence, no longer
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    # dev batches cover every row exactly once, whatever the order
    seen = torch.cat([b["index"] for b in dm.val_dataloader()[0]])
    assert sorted(seen.tolist()) == list(range(408))


def test_stsb_labels_are_floats(glue_dir, tokenizer, tmp_path):
    dm = GlueDataModule(
        get_task("stsb"),
        tokenizer,
        glue_dir=str(glue_dir),
        hub_dataset="nyu-mll/glue",
        max_length=64,
        batch_size=4,
        eval_batch_size=4,
        max_train_examples=8,
        num_workers=0,
        cache_dir=None,
        seed=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32


def test_mnli_has_two_dev_splits():
    assert TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert TASKS["mnli"].hub_split("dev_mismatched") == "validation_mismatched"


def test_missing_data_folder(tokenizer):
    dm = GlueDataModule(
        get_task("rte"),
        tokenizer,
        glue_dir="/nonexistent/glue",
        hub_dataset="nyu-mll/glue",
        max_length=64,
        batch_size=4,
        eval_batch_size=4,
        max_train_examples=None,
        num_workers=0,
        cache_dir=None,
        seed=0,
    )
    with pytest.raises(UserError, match="data.dir '/nonexistent/glue' is not a folder"):
        dm.setup("fit")


def test_local_file_paths_have_no_surprises(glue_dir):
    assert Path(glue_dir, "QNLI", "train.tsv").exists() is False  # the copy has QNLI dev only

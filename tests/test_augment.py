"""Data augmentation: real neighbours, the MLM's predictions, determinism, the cache, pairs, dev sets."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_job_config
from xtc_lightning import pipeline
from xtc_lightning.augment import (
    AugmentConfig,
    EmbeddingNeighbours,
    MaskedLMCandidates,
    augment_examples,
    is_candidate_token,
    match_case,
    new_versions,
    parse_sentence,
    read_new_examples,
    transfer_examples,
)
from xtc_lightning.data import Examples, GlueDataModule, read_local_split, subsample
from xtc_lightning.errors import UserError
from xtc_lightning.tasks import get_task


def config(**overrides) -> AugmentConfig:
    settings = {"method": "embedding_nn", "factor": 4, "p": 0.4, "top_k": 15, "seed": 0, "tasks": None}
    return AugmentConfig.from_dict({**settings, **overrides})


@pytest.fixture(scope="module")
def minilm_source(minilm_dir):
    """Candidates from the real MiniLM input embeddings (what the default teacher gives)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_dir)
    return EmbeddingNeighbours(
        model.get_input_embeddings().weight, AutoTokenizer.from_pretrained(minilm_dir), 15
    )


def neighbours(source, word: str) -> list[str]:
    (sentence,) = [parse_sentence(word, source.vocab)]
    (row,) = source.candidates([sentence])[0].tolist()
    return [source.vocab.tokens[i] for i in row]


def test_embedding_neighbours_are_real_neighbours(minilm_source):
    good, movie, said = (neighbours(minilm_source, w) for w in ("good", "movie", "said"))
    assert {"great", "nice"} <= set(good) and "bad" in good
    assert "film" in movie and "films" in movie
    assert "told" in said
    for word, found in (("good", good), ("movie", movie), ("said", said)):
        assert len(found) == 15 and len(set(found)) == 15 and word not in found
        assert all(is_candidate_token(t) for t in found)  # whole words: no ##pieces, [unused], stop words
    # the table is the cosine ranking over the allowed vocabulary, recomputed here from the matrix
    unit = torch.nn.functional.normalize(minilm_source.embeddings.float(), dim=1)
    i = minilm_source.vocab.word_id("good")
    sims = unit @ unit[i]
    sims[~minilm_source.vocab.allowed] = -2
    sims[i] = -2
    assert [minilm_source.vocab.tokens[j] for j in sims.topk(15).indices] == good


def test_which_words_are_replaced_and_how(minilm_source):
    vocab = minilm_source.vocab
    sentence = parse_sentence('The Movie, "unbelievably" said. it 3D', vocab)
    # 'The', 'it' stop words; 'unbelievably' = un ##bel ##ie ##va ##bly (multi-piece: kept); '3D' not letters
    assert [(s.position, s.prefix, s.core, s.suffix) for s in sentence.slots] == [
        (1, "", "Movie", ","),
        (3, "", "said", "."),
    ]
    assert vocab.tokenizer.tokenize("unbelievably") == ["un", "##bel", "##ie", "##va", "##bly"]
    assert (match_case("great", "Good"), match_case("uk", "USA"), match_case("film", "movie")) == (
        "Great",
        "UK",
        "film",
    )
    cands = minilm_source.candidates([sentence])
    (version,) = new_versions([sentence], cands, vocab.tokens, 1, 1.0, np.random.default_rng(0))
    words = version[0].split()
    assert words[0] == "The" and words[2] == '"unbelievably"' and words[4:] == ["it", "3D"]
    assert (
        words[1][0].isupper()
        and words[1].endswith(",")
        and words[1][:-1].lower() in neighbours(minilm_source, "movie")
    )
    assert words[3].endswith(".") and words[3][:-1] in neighbours(minilm_source, "said")


def test_deterministic_under_a_seed(glue_dir, minilm_source, tmp_path):
    task = get_task("cola")
    originals = subsample(read_local_split(task, glue_dir, "train"), 40, 0)
    a = augment_examples(task, originals, config(seed=1), minilm_source, tmp_path / "a")
    b = augment_examples(task, originals, config(seed=1), minilm_source, tmp_path / "b")
    c = augment_examples(task, originals, config(seed=2), minilm_source, tmp_path / "c")
    assert a.path.read_bytes() == b.path.read_bytes() and a.examples.texts == b.examples.texts
    assert a.examples.texts != c.examples.texts
    assert a.originals == 40 and 0.8 * 40 * 4 < a.added <= 40 * 4  # few duplicates are dropped
    assert a.examples.texts[:40] == originals.texts and a.examples.labels[:40] == originals.labels
    assert a.examples.labels[40:] == [-100] * a.added  # new examples carry no gold label


def test_cache_is_reused_and_invalidated(glue_dir, minilm_source, tmp_path, caplog):
    task = get_task("rte")
    (tmp_path / "RTE").mkdir()
    source_file = tmp_path / "RTE" / "train.tsv"
    lines = (glue_dir / "RTE" / "train.tsv").read_text().split("\n")[:21]
    source_file.write_text("\n".join(lines) + "\n")
    originals = read_local_split(task, tmp_path, "train")
    cache = tmp_path / "cache"
    first = augment_examples(task, originals, config(), minilm_source, cache)
    assert not first.cached and first.path.parent == cache / "augmented"
    mtime = first.path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xtc_lightning"):
        again = augment_examples(task, originals, config(), minilm_source, cache)
    assert again.cached and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert again.examples.texts == first.examples.texts
    assert not [r for r in caplog.records if "augment rte" in r.getMessage()]  # nothing generated
    # any input change -> another file: p, factor, top_k, and the source file's content
    others = {
        augment_examples(task, originals, config(p=0.5), minilm_source, cache).path,
        augment_examples(task, originals, config(factor=2), minilm_source, cache).path,
    }
    fields = lines[1].split("\t")
    fields[1] += " Indeed."  # one row of the source file edited
    source_file.write_text("\n".join([lines[0], "\t".join(fields), *lines[2:]]) + "\n")
    changed = read_local_split(task, tmp_path, "train")
    assert changed.texts[1:] == originals.texts[1:] and changed.texts[0] != originals.texts[0]
    others.add(augment_examples(task, changed, config(), minilm_source, cache).path)
    assert len(others) == 3 and first.path not in others
    assert len(list((cache / "augmented").iterdir())) == 4  # no temporary file left behind


def test_pairs_keep_their_structure_and_shared_words_change_together(glue_dir, minilm_source, tmp_path):
    task = get_task("mrpc")
    originals = subsample(read_local_split(task, glue_dir, "train"), 30, 0)
    result = augment_examples(task, originals, config(factor=6, p=0.5), minilm_source, tmp_path)
    sources, texts = read_new_examples(result.path, originals)
    assert len(texts) == result.added > 100 and texts == result.examples.texts[30:]
    shared_changes = 0
    for src, new in zip(sources, texts, strict=True):
        old = originals.texts[src]
        assert len(new) == 2 and new != tuple(" ".join(t.split()) for t in old)
        replaced: dict[str, set[str]] = {}  # original word -> what it became, over both sentences
        for old_side, new_side in zip(old, new, strict=True):
            old_words, new_words = old_side.split(), new_side.split()
            assert len(old_words) == len(new_words)  # a word is replaced by one word
            for o, n in zip(old_words, new_words, strict=True):
                replaced.setdefault(o.lower(), set()).add(n.lower())
        for word, became in replaced.items():
            assert len(became) == 1, (word, became)  # every occurrence, in both sentences, alike
            in_both = all(word in (w.lower() for w in side.split()) for side in old)
            shared_changes += in_both and became != {word}
    assert shared_changes > 20
    assert len(set(zip(sources, texts, strict=True))) == len(texts)  # no duplicate version


def test_no_augmented_example_reaches_a_dev_set(glue_dir, minilm_source, tmp_path):
    task = get_task("rte")

    def datamodule():
        return GlueDataModule(
            task, minilm_source.vocab.tokenizer, glue_dir=str(glue_dir), hub_dataset="", max_length=64,
            batch_size=8, eval_batch_size=8, max_train_examples=16, num_workers=0,
            cache_dir=str(tmp_path / "tok"), seed=0,
        )  # fmt: skip

    dm = datamodule()
    dm.setup("fit")
    fingerprint = dm.train_fingerprint
    result = augment_examples(task, dm.train_examples, config(), minilm_source, tmp_path)
    dm.use_train_examples(result.examples)
    assert len(dm.train_set) == 16 + result.added and dm.train_fingerprint != fingerprint
    assert (dm.train_set.labels[16:] == -100).all() and (dm.train_set.labels[:16] >= 0).all()
    fresh = datamodule()
    fresh.setup("validate")
    assert len(dm.dev_sets["dev"]) == len(fresh.dev_sets["dev"]) == 277
    for name in ("input_ids", "offsets", "labels"):
        assert np.array_equal(getattr(dm.dev_sets["dev"], name), getattr(fresh.dev_sets["dev"], name))


def test_mlm_candidates_are_the_masked_lms_top_whole_words(tiny_mlm_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    source = MaskedLMCandidates.load(str(tiny_mlm_dir), top_k=5)
    sentence = parse_sentence("the movie was good .", source.vocab)
    cands = source.candidates([sentence])[0]
    assert [s.core for s in sentence.slots] == ["movie", "good"] and cands.shape == (2, 5)
    # independently: TinyBERT's input through the tokenizer's own pair encoding
    tokenizer = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    for slot, row in zip(sentence.slots, cands.tolist(), strict=True):
        masked = "the movie was good .".replace(slot.core, tokenizer.mask_token)
        enc = tokenizer(masked, "the movie was good .", return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, enc["input_ids"][0].tolist().index(tokenizer.mask_token_id)]
        allowed = torch.tensor([is_candidate_token(t) for t in tokenizer.convert_ids_to_tokens(range(30522))])
        allowed[tokenizer.all_special_ids] = False
        allowed[slot.token_id] = False
        logits[~allowed] = -math.inf
        assert row == logits.topk(5).indices.tolist()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "glove"}, r"augment.method='glove' is invalid"),
        ({"factor": 0}, r"augment.factor=0 is invalid"),
        ({"p": 1.5}, r"augment.p=1.5 is invalid"),
        ({"top_k": 0}, r"augment.top_k=0 is invalid"),
        ({"tasks": ["rte", "sst3"]}, r"augment.tasks=\['rte', 'sst3'\] is invalid"),
        ({"mlm_model": "bert-base-uncased"}, r"unknown keys \['mlm_model'\]"),
    ],
)
def test_bad_settings_fail_in_one_line(change, message):
    with pytest.raises(UserError, match=message):
        config(**change)


def test_a_masked_lm_that_cannot_load_fails_before_any_work(tmp_path, glue_dir, tiny_bert_dir):
    args = [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", f"data.dir={glue_dir}",
        f"paths.root_dir={tmp_path}", "augment=mlm", f"augment.mlm_model={tmp_path / 'no_such_mlm'}",
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"cannot load the masked LM augment.mlm_model='.*no_such_mlm'"):
        pipeline.run(compose_job_config(args, tmp_path / "run")[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_paper_presets_augment_only_the_small_tasks(tmp_path):
    cfg, choices = compose_job_config(["experiment=xtc_l6_w1a8"], tmp_path)
    from omegaconf import OmegaConf

    aug = AugmentConfig.from_dict(OmegaConf.to_container(cfg.augment, resolve=True))
    assert choices["augment"] == "mlm" and aug.mlm_model == "bert-base-uncased" and aug.factor == 20
    assert [
        t for t in ("cola", "mrpc", "rte", "stsb", "sst2", "mnli", "qqp", "qnli") if aug.applies_to(t)
    ] == [
        "cola",
        "mrpc",
        "rte",
        "stsb",
    ]
    cfg, choices = compose_job_config([], tmp_path)
    assert choices["augment"] == "none" and not AugmentConfig.from_dict(dict(cfg.augment)).applies_to("rte")


def test_distillation_trains_on_the_augmented_set_without_labels(tmp_path, glue_dir, tiny_bert_dir):
    """STS-B (regression: NaN labels) with the ground-truth loss on: only the originals have labels."""
    args = [
        "task=stsb", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "quant=binary",
        f"data.dir={glue_dir}", f"paths.root_dir={tmp_path}", "data.max_train_examples=64",
        "data.max_length=64", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2",
        "distill.weights.ground_truth=1.0",
    ]  # fmt: skip
    augmented = [*args, "augment=embedding_nn", "augment.factor=2"]
    results = pipeline.run(compose_job_config([*augmented, "stage=quantize"], tmp_path / "run1")[0])
    aug, stages = results["augment"], results["stages"]
    assert aug["original_examples"] == 64 and 100 < aug["new_examples"] <= 128 and not aug["cached"]
    n = 64 + aug["new_examples"]
    assert (
        aug["train_examples"]
        == stages["reduce"]["train_examples"]
        == stages["quantize"]["train_examples"]
        == n
    )
    assert results["data"] == {
        "train_examples": 64,
        "dev_examples": 1500,
        "dev_scored": {"dev": 128},  # trainer.limit_val_batches=2 batches of 64
    }  # the dev set as it is
    _, texts = read_new_examples(Path(aug["cache"]), read_local_split(get_task("stsb"), glue_dir, "train"))
    assert len(texts) == aug["new_examples"]
    # the teacher trained on the originals (2 batches of 32), the distillation stages on everything
    assert stages["teacher"]["steps"] == 2
    assert stages["reduce"]["steps"] == math.ceil(n / 32)
    assert stages["quantize"]["steps"] == math.ceil(n / 32)
    # the ground-truth loss skipped the unlabelled (NaN) rows: finite in every logged step
    metrics = (tmp_path / "run1" / "logs" / "reduce" / "metrics.csv").read_text().split("\n")
    header = metrics[0].split(",")
    column = header.index("train/ground_truth_loss")
    values = [float(row.split(",")[column]) for row in metrics[1:] if row and row.split(",")[column]]
    assert len(values) == math.ceil(n / 32) and all(math.isfinite(v) and v > 0 for v in values)

    # again: the augmented set and the reduced student (keyed by it) come from the cache
    again = pipeline.run(compose_job_config([*augmented, "stage=reduce"], tmp_path / "run2")[0])
    assert again["augment"]["cached"] and again["augment"]["cache"] == aug["cache"]
    assert again["stages"]["reduce"]["cached"]
    # without augmentation the reduce stage's key differs: a new student is trained
    plain = pipeline.run(compose_job_config([*args, "stage=reduce"], tmp_path / "run3")[0])
    assert plain["augment"] is None and not plain["stages"]["reduce"]["cached"]
    assert plain["stages"]["reduce"]["train_examples"] == 64
    assert json.loads((tmp_path / "run3" / "results.json").read_text())["augment"] is None


def transfer(**overrides) -> AugmentConfig:
    return AugmentConfig.from_dict(
        {"method": "transfer", "source": "sst2", "factor": 2, "seed": 0, "tasks": None, **overrides}
    )


def test_transfer_draws_the_sources_unseen_texts_without_labels(glue_dir):
    cola = subsample(read_local_split(get_task("cola"), glue_dir, "train"), 300, 0)
    sst2 = read_local_split(get_task("sst2"), glue_dir, "train")
    a = transfer_examples(cola, sst2, transfer(seed=1), regression=False)
    assert len(a) == 300 + 600 and a.texts[:300] == cola.texts and a.labels[:300] == cola.labels
    new = a.texts[300:]
    assert a.labels[300:] == [-100] * 600  # the teacher alone teaches them
    assert len(set(new)) == 600 and set(new) <= set(sst2.texts) and not set(new) & set(cola.texts)
    assert transfer_examples(cola, sst2, transfer(seed=1), regression=False).texts == a.texts
    assert transfer_examples(cola, sst2, transfer(seed=2), regression=False).texts[300:] != new
    # keyed by the draw: the tokenized set and the reduced student cached for it
    assert a.source_hash == f"{cola.source_hash}|transfer:sst2:{sst2.source_hash}:2:1"
    # a source with fewer new texts than factor x the examples gives all of them, once
    pairs = Examples([("a", "b"), ("c", "d")], [1.0, 2.0], "h")
    source = Examples([("a", "b"), ("e", "f"), ("e", "f"), ("g", "h")], [0.0] * 4, "s")
    b = transfer_examples(pairs, source, transfer(source="mrpc", factor=5), regression=True)
    assert b.texts == [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]
    assert b.labels[:2] == [1.0, 2.0] and all(math.isnan(x) for x in b.labels[2:])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["augment.source=sst3"], r"augment.source='sst3' is invalid: expected a task name"),
        (["augment.source=cola"], r"augment.source=cola: the task's own training set"),
        (["augment.source=mrpc"], r"augment.source=mrpc: its examples are a pair, cola's are a sentence"),
        (["+augment.p=0.4"], r"augment 'transfer': unknown keys \['p'\]"),
    ],
)
def test_a_transfer_source_that_does_not_fit_fails_before_any_work(
    tmp_path, glue_dir, tiny_bert_dir, args, message
):
    base = [
        "task=cola", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", f"data.dir={glue_dir}",
        f"paths.root_dir={tmp_path}", "augment=transfer",
    ]  # fmt: skip
    with pytest.raises(UserError, match=message):
        pipeline.run(compose_job_config([*base, *args], tmp_path / "run")[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_transfer_source_without_a_training_set_fails_before_the_teacher(tmp_path, glue_dir, tiny_bert_dir):
    """The local GLUE has QNLI's dev set only: read with the task's own data, before any stage."""
    args = [
        "task=rte", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", f"data.dir={glue_dir}",
        f"paths.root_dir={tmp_path}", "augment=transfer", "augment.source=qnli",
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"QNLI/train.tsv"):
        pipeline.run(compose_job_config(args, tmp_path / "run")[0])
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # no stage, no config written


def test_distillation_trains_on_the_transfer_set(tmp_path, glue_dir, tiny_bert_dir):
    args = [
        "task=cola", f"model.name_or_path={tiny_bert_dir}", "student.num_layers=1", "quant=binary",
        f"data.dir={glue_dir}", f"paths.root_dir={tmp_path}", "data.max_train_examples=64",
        "data.max_length=32", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
        "augment=transfer", "augment.factor=3", "stage=quantize",
    ]  # fmt: skip
    results = pipeline.run(compose_job_config(args, tmp_path / "run")[0])
    aug, stages = results["augment"], results["stages"]
    assert {k: aug[k] for k in ("method", "source", "factor", "original_examples", "new_examples")} == {
        "method": "transfer", "source": "sst2", "factor": 3, "original_examples": 64, "new_examples": 192,
    }  # fmt: skip
    assert (
        aug["train_examples"]
        == stages["reduce"]["train_examples"]
        == stages["quantize"]["train_examples"]
        == 256
    )
    assert stages["teacher"]["steps"] == 2  # the teacher trained on the 64 originals alone
    assert stages["reduce"]["steps"] == stages["quantize"]["steps"] == 8

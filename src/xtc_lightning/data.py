"""GLUE data: read a split (local ``glue_data`` folder or the hub), tokenize once, cache, batch.

Local files are read line by line, split on TAB with no quote handling (QNLI and
others have rows starting with ``"`` that a CSV reader would merge), with the
MRPC header's BOM stripped. Tokenized splits are cached on disk as ``.npz``
(no pickle) keyed by the tokenizer, the maximum length and the file content, so
a second run skips tokenization.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xtc_lightning.errors import UserError
from xtc_lightning.io import atomic_path
from xtc_lightning.tasks import GlueTask, parse_label

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
TOKENIZE_CHUNK = 20_000  # examples per tokenizer call


@dataclass
class Examples:
    """The raw rows of one split: text tuples, labels (id or float score) and row indices."""

    texts: list[tuple[str, ...]]
    labels: list[float] | list[int]
    source_hash: str  # identifies the content, for the tokenization cache

    def __len__(self) -> int:
        return len(self.labels)


def read_local_split(task: GlueTask, glue_dir: str | Path, split: str) -> Examples:
    """Read ``<glue_dir>/<task folder>/<split>.tsv``; every problem is one ``UserError`` line."""
    path = Path(glue_dir).expanduser() / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise UserError(f"{task.name}: split file {path} not found (data.dir must hold the glue_data layout)")
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:  # UTF-16 text or a binary file
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        lines = raw.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); GLUE files are UTF-8 tab-separated text"
        ) from None
    if lines and lines[-1] == "":
        lines.pop()
    if task.has_header:
        if not lines:
            raise UserError(f"{path}: empty file")
        header = lines[0].rstrip("\r").split("\t")
        wanted = [*task.text_columns, task.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; the header has {header}")
        positions = [header.index(c) for c in wanted]
        width, start = len(header), 1
    else:
        positions = [*task.text_columns, task.label_column]
        width, start = max(positions) + 1, 0
    *text_pos, label_pos = positions
    texts, labels = [], []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) < width:
            raise UserError(f"{path}:{lineno}: expected {width} tab-separated columns, found {len(fields)}")
        try:
            labels.append(parse_label(task, fields[label_pos]))
        except ValueError:
            accepted = task.label_names or "a finite number"
            raise UserError(
                f"{path}:{lineno}: bad label '{fields[label_pos]}' (accepted: {accepted})"
            ) from None
        texts.append(tuple(fields[p] for p in text_pos))
    if not texts:
        raise UserError(f"{path}: no examples")
    return Examples(texts, labels, hashlib.sha256(raw).hexdigest())


def read_hub_split(task: GlueTask, dataset: str, split: str) -> Examples:
    """Read a split from the hub dataset (e.g. ``nyu-mll/glue``) via ``datasets``."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, task.name, split=task.hub_split(split))
    except Exception as err:  # network, missing dataset, missing split: one line
        raise UserError(
            f"cannot load {dataset}/{task.name} split '{task.hub_split(split)}' from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"set data.dir or GLUE_DIR to a local glue_data folder"
        ) from None
    texts = list(zip(*(ds[c] for c in task.hub_text_columns), strict=True))
    labels = [float(x) for x in ds["label"]] if task.is_regression else [int(x) for x in ds["label"]]
    return Examples(texts, labels, f"hub:{dataset}:{ds._fingerprint}")


def subsample(examples: Examples, k: int | None, seed: int) -> Examples:
    """Keep ``k`` examples chosen reproducibly from ``seed`` (in their original order)."""
    if k is None or k >= len(examples):
        return examples
    if k <= 0:
        raise UserError(
            f"data.max_train_examples={k} leaves an empty training set (use a positive number or null)"
        )
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=k, replace=False))
    return Examples(
        [examples.texts[i] for i in keep],
        [examples.labels[i] for i in keep],
        f"{examples.source_hash}:subsample:{k}:{seed}",
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable identity of a tokenizer: its class, vocabulary and normalisation rules."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # set by the last call, not part of the tokenizer's identity
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(tokenizer.model_input_names).encode())
    return h.hexdigest()


class TokenizedSplit(Dataset):
    """Token ids of one split, stored flat (ids + offsets) so it caches to a small ``.npz``."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.input_ids = arrays["input_ids"]
        self.token_type_ids = arrays.get("token_type_ids")
        self.offsets = arrays["offsets"]
        self.labels = arrays["labels"]
        self.index = arrays["index"]  # row index in the source split (for predictions files)

    def __len__(self) -> int:
        return len(self.labels)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        item = {"input_ids": self.input_ids[a:b], "labels": self.labels[i], "index": self.index[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[a:b]
        return item


def tokenize(examples: Examples, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """Flat token ids and offsets, ``TOKENIZE_CHUNK`` examples per tokenizer call.

    One call over an augmented SST-2 (~1M examples) held ~5 GB of Python lists; chunks keep the
    memory to the arrays (the result is the same).
    """
    ids, token_types, lengths = [], [], []
    with_types = "token_type_ids" in tokenizer.model_input_names
    for start in range(0, len(examples), TOKENIZE_CHUNK):
        columns = list(zip(*examples.texts[start : start + TOKENIZE_CHUNK], strict=True))
        enc = tokenizer(*columns, truncation=True, max_length=max_length)
        lengths += [len(x) for x in enc["input_ids"]]
        ids += [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
        with_types = with_types and "token_type_ids" in enc
        if with_types:
            token_types += [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    arrays = {
        "input_ids": np.concatenate(ids),
        "offsets": np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]),
        "labels": np.asarray(
            examples.labels, dtype=np.float32 if isinstance(examples.labels[0], float) else np.int64
        ),
        "index": np.arange(len(examples), dtype=np.int64),
    }
    if with_types:
        arrays["token_type_ids"] = np.concatenate(token_types)
    return arrays


def load_tokenized(
    examples: Examples, tokenizer, max_length: int, cache_dir: str | Path | None, name: str
) -> TokenizedSplit:
    """Tokenize ``examples``, or load the cached result for the same tokenizer, length and content."""
    if cache_dir is None:
        return TokenizedSplit(tokenize(examples, tokenizer, max_length))
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{examples.source_hash}".encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return TokenizedSplit({k: f[k] for k in f.files})
    arrays = tokenize(examples, tokenizer, max_length)
    with atomic_path(path, suffix=".npz") as tmp:  # a concurrent or killed run never sees half a file
        np.savez(tmp, **arrays)
    log.info("tokenized %s (%d examples) -> %s", name, len(examples), path)
    return TokenizedSplit(arrays)


def sort_by_length(split: TokenizedSplit) -> TokenizedSplit:
    """The same split ordered by length (longest first): eval batches then pad little."""
    order = np.argsort([-split.length(i) for i in range(len(split))], kind="stable")
    ids, tts, offsets = [], [], [0]
    for i in order:
        a, b = split.offsets[i], split.offsets[i + 1]
        ids.append(split.input_ids[a:b])
        if split.token_type_ids is not None:
            tts.append(split.token_type_ids[a:b])
        offsets.append(offsets[-1] + (b - a))
    arrays = {
        "input_ids": np.concatenate(ids),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "labels": split.labels[order],
        "index": split.index[order],
    }
    if tts:
        arrays["token_type_ids"] = np.concatenate(tts)
    return TokenizedSplit(arrays)


class PadCollator:
    """Dynamic padding: pad each batch to its own longest sequence."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        n = len(items)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        has_tt = "token_type_ids" in items[0]
        token_type_ids = torch.zeros((n, longest), dtype=torch.long) if has_tt else None
        for row, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[row, :k] = torch.from_numpy(it["input_ids"].astype(np.int64))
            attention_mask[row, :k] = 1
            if has_tt:
                token_type_ids[row, :k] = torch.from_numpy(it["token_type_ids"].astype(np.int64))
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.as_tensor(np.array([it["labels"] for it in items])),
            "index": torch.as_tensor(np.array([it["index"] for it in items])),
        }
        if has_tt:
            batch["token_type_ids"] = token_type_ids
        return batch


class EpochShuffleSampler(DistributedSampler):
    """The training order: a shuffle drawn from ``seed + epoch`` alone, sharded over processes.

    As ``DistributedSampler`` (a subclass, so Lightning keeps it instead of adding its own):
    rank ``r`` of ``world`` takes every ``world``-th index of the epoch's permutation, padded by
    wrapping around. So batch ``k`` of ``world`` processes with batch size ``b`` holds exactly the
    examples of batch ``k`` of one process with batch size ``world * b``. It also resumes: a
    run restarted in the middle of an epoch continues where it stopped, ``start_batch()``
    (read when iteration begins) being the number of this epoch's batches already trained.
    """

    def __init__(self, dataset, batch_size: int, seed: int, world: int = 1, rank: int = 0, start_batch=None):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.start_batch = start_batch or (lambda: 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order += order[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        return iter(mine[self.start_batch() * self.batch_size :])


class GlueDataModule(L.LightningDataModule):
    """Train and dev splits of one GLUE task (MNLI: dev matched and mismatched)."""

    def __init__(
        self,
        task: GlueTask,
        tokenizer,
        *,
        glue_dir: str | None,
        hub_dataset: str,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        max_train_examples: int | None,
        num_workers: int,
        cache_dir: str | None,
        seed: int,
        train_examples: Examples | None = None,
    ):
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.glue_dir = glue_dir
        self.hub_dataset = hub_dataset
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_train_examples = max_train_examples
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        # The training examples: when not given, the task's train split (``max_train_examples`` of
        # it); ``use_train_examples`` replaces them (the distillation stages' augmented set).
        self.train_examples = train_examples
        self.collate = PadCollator(tokenizer.pad_token_id or 0)
        self.train_set: TokenizedSplit | None = None
        self.train_fingerprint: str | None = None  # content hash of the (subsampled) train split
        self.dev_sets: dict[str, TokenizedSplit] = {}

    def read(self, split: str, task: GlueTask | None = None) -> Examples:
        """``split`` of this task (or of ``task``: another task's sentences, ``augment=transfer``),
        from ``data.dir`` when set, else from the hub."""
        task = task or self.task
        if self.glue_dir:
            if not Path(self.glue_dir).expanduser().is_dir():
                raise UserError(f"data.dir '{self.glue_dir}' is not a folder (expected the glue_data layout)")
            return read_local_split(task, self.glue_dir, split)
        return read_hub_split(task, self.hub_dataset, split)

    def _tokenized(self, examples: Examples, split: str) -> TokenizedSplit:
        return load_tokenized(
            examples, self.tokenizer, self.max_length, self.cache_dir, f"{self.task.name}-{split}"
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            if self.train_examples is None:
                self.train_examples = subsample(self.read("train"), self.max_train_examples, self.seed)
            self.train_fingerprint = self.train_examples.source_hash
            self.train_set = self._tokenized(self.train_examples, "train")
        for split in self.task.dev_splits:
            if split not in self.dev_sets:
                self.dev_sets[split] = sort_by_length(self._tokenized(self.read(split), split))

    def use_train_examples(self, examples: Examples) -> None:
        """Train on ``examples`` from now on (as given: not subsampled); the dev sets stay as they are."""
        self.train_examples, self.train_set = examples, None
        self.setup("fit")

    def train_dataloader(self) -> DataLoader:
        """``data.batch_size`` examples per process and step (the global batch is that x processes)."""
        trainer = self.trainer
        sampler = EpochShuffleSampler(
            self.train_set,
            self.batch_size,
            self.seed,
            world=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            # Lightning's own count of this epoch's batches already fetched (> 0 only on a resume)
            start_batch=(lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            if trainer
            else None,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: no global RNG draw
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                self.dev_sets[split],
                batch_size=self.eval_batch_size,
                shuffle=False,
                collate_fn=self.collate,
                num_workers=self.num_workers,
            )
            for split in self.task.dev_splits
        ]

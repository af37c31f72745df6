"""Data augmentation for the distillation stages (TinyBERT's recipe, which XTC uses on small tasks).

Every training example gets up to ``factor`` new versions in which each replaceable word is
replaced, with probability ``p``, by one of ``top_k`` candidates drawn uniformly:

* ``embedding_nn`` (offline): the word's nearest neighbours in the teacher's own input-embedding
  space (cosine similarity over the vocabulary). The neighbours of every vocabulary id that
  occurs are computed once, as one ``[vocab, top_k]`` table, by chunked matrix products.
* ``mlm``: a masked language model's top predictions at the word's position; the model sees the
  masked sentence followed by the original one (TinyBERT's input), in batches.

``transfer`` replaces no word: its new examples are another task's training texts (``source``,
one sentence or a pair as the task's), a transfer set in Hinton et al.'s sense: natural text the
student learns from the teacher alone. ``factor`` x the training examples are drawn (seeded,
without replacement) from the source's distinct texts that the task's own training set lacks.

Words are the whitespace-separated tokens of a sentence; punctuation around a word stays
(``said.`` -> ``told.``) and its capitalisation is kept. A word is replaceable when its core is
ASCII letters, not a stop word, and a single piece of the vocabulary (``movie`` is,
``unbelievably`` = ``un ##bel ##ie ##va ##bly`` is not). Multi-piece words (rare words, names, numbers) are kept
as they are: TinyBERT replaces them with GloVe neighbours, which we do not have offline, and an
average of piece embeddings is not a word. Candidates are whole words too (ASCII letters, no
``##`` piece, no special token, no stop word), never the word itself. This suits WordPiece
vocabularies (BERT, MiniLM); a vocabulary without such tokens is refused.

Pairs keep their structure: a new example is a new pair. Replacements are drawn per distinct
word of the whole example, so a word both sentences share is replaced by the same word in both
(the paraphrase / similarity / entailment relation the task is about stays comparable). New
versions equal to the original or to an earlier version are dropped.

Augmented examples carry no gold label (``-100``; ``NaN`` for regression): the distillation
stages learn them from the teacher only. The new examples are written once to
``<cache_dir>/augmented/<task>-<method>-<key>.tsv`` (source row, texts; atomic write), keyed by
the task, the source content, the settings and the model (a hash of its weights and tokenizer),
and read back from there by every later run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xtc_lightning.data import Examples, GlueDataModule, tokenizer_fingerprint
from xtc_lightning.errors import UserError, check_exact_keys
from xtc_lightning.io import atomic_path
from xtc_lightning.tasks import TASKS, GlueTask

log = logging.getLogger("xtc_lightning")

VERSION = "1"  # bump when the generated text changes for the same inputs
METHODS = ("none", "embedding_nn", "mlm", "transfer")
KEYS = {
    "none": ("method",),
    "embedding_nn": ("method", "factor", "p", "top_k", "seed", "tasks"),
    "mlm": ("method", "mlm_model", "factor", "p", "top_k", "seed", "tasks"),
    "transfer": ("method", "source", "factor", "seed", "tasks"),
}
# NLTK's English stop words (the alphabetic ones): never replaced, never a candidate.
NLTK_STOP_WORDS = """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
    her hers herself it its itself they them their theirs themselves what which who whom this that
    these those am is are was were be been being have has had having do does did doing a an the and
    but if or because as until while of at by for with about against between into through during
    before after above below to from up down in out on off over under again further then once here
    there when where why how all any both each few more most other some such no nor not only own same
    so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn
    hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn"""
STOP_WORDS = frozenset(NLTK_STOP_WORDS.split())
WORD = re.compile(r"([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)")  # prefix, core, suffix
CHUNK = 256  # examples per step of candidate search and generation
MLM_BATCH = 64  # masked sentences per forward pass


@dataclass(frozen=True)
class AugmentConfig:
    """The ``augment`` config group, validated (``from_dict``)."""

    method: str
    factor: int = 0
    p: float = 0.0
    top_k: int = 0
    seed: int = 0
    tasks: tuple[str, ...] | None = None
    mlm_model: str | None = None
    source: str | None = None  # transfer: the task whose training texts are drawn

    @classmethod
    def from_dict(cls, cfg: dict) -> AugmentConfig:
        method = cfg.get("method")
        if method not in METHODS:
            raise UserError(f"augment.method={method!r} is invalid; choose one of: {', '.join(METHODS)}")
        check_exact_keys(cfg, KEYS[method], f"augment '{method}'")
        if method == "none":
            return cls(method)
        factor, seed, tasks = (cfg[k] for k in ("factor", "seed", "tasks"))
        if not _is_int(factor) or factor < 1:
            raise UserError(f"augment.factor={factor!r} is invalid: expected an integer >= 1")
        if not _is_int(seed):
            raise UserError(f"augment.seed={seed!r} is invalid: expected an integer")
        if tasks is not None:
            if not isinstance(tasks, list | tuple) or not tasks or any(t not in TASKS for t in tasks):
                raise UserError(
                    f"augment.tasks={tasks!r} is invalid: expected null or a list of task names "
                    f"({', '.join(TASKS)})"
                )
            tasks = tuple(tasks)
        if method == "transfer":
            source = cfg["source"]
            if source not in TASKS:
                raise UserError(
                    f"augment.source={source!r} is invalid: expected a task name ({', '.join(TASKS)})"
                )
            return cls(method, factor, seed=seed, tasks=tasks, source=source)
        p, top_k = cfg["p"], cfg["top_k"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise UserError(f"augment.p={p!r} is invalid: expected a probability in (0, 1]")
        if not _is_int(top_k) or top_k < 1:
            raise UserError(f"augment.top_k={top_k!r} is invalid: expected an integer >= 1")
        mlm_model = cfg.get("mlm_model")
        if method == "mlm" and (not isinstance(mlm_model, str) or not mlm_model):
            raise UserError(f"augment.mlm_model={mlm_model!r} is invalid: expected a hub id or a folder")
        return cls(method, factor, float(p), top_k, seed, tasks, mlm_model)

    def applies_to(self, task: str) -> bool:
        return self.method != "none" and (self.tasks is None or task in self.tasks)

    def check_source(self, task: GlueTask) -> None:
        """A transfer source fits ``task`` when it is another task with as many texts per example
        (a sentence, or a pair); checked at startup, with the task known."""
        if self.method != "transfer" or not self.applies_to(task.name):
            return
        source = TASKS[self.source]
        if source.name == task.name:
            raise UserError(
                f"augment.source={self.source}: the task's own training set; name another task's "
                f"(a transfer set is text the task does not have)"
            )
        if len(source.text_columns) != len(task.text_columns):
            shape = {1: "a sentence", 2: "a pair"}
            raise UserError(
                f"augment.source={self.source}: its examples are {shape[len(source.text_columns)]}, "
                f"{task.name}'s are {shape[len(task.text_columns)]}; name a task whose examples are "
                f"{shape[len(task.text_columns)]}"
            )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- words and vocabularies


def is_candidate_token(token: str) -> bool:
    """A vocabulary entry that is a whole word: ASCII letters only (no ``##`` piece), not a stop word."""
    return token.isascii() and token.isalpha() and token.lower() not in STOP_WORDS


def match_case(word: str, like: str) -> str:
    """``word`` written with the capitalisation of ``like`` (``Good`` -> ``Great``, ``USA`` -> ``UK``)."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[0].isupper():
        return word[:1].upper() + word[1:]
    return word


class Vocabulary:
    """A tokenizer's vocabulary as words: which ids may replace a word, and the id of a one-piece word."""

    def __init__(self, tokenizer, size: int):
        n = min(size, len(tokenizer))
        self.tokenizer = tokenizer
        self.tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
        special = set(tokenizer.all_special_ids)
        self.allowed = torch.zeros(size, dtype=torch.bool)
        self.allowed[:n] = torch.tensor(
            [is_candidate_token(t) and i not in special for i, t in enumerate(self.tokens)]
        )
        self._ids: dict[str, int | None] = {}

    def check(self, top_k: int) -> None:
        if int(self.allowed.sum()) <= top_k:
            raise UserError(
                f"augmentation: the vocabulary has {int(self.allowed.sum())} whole-word tokens, fewer than "
                f"augment.top_k + 1 = {top_k + 1} (it needs a WordPiece vocabulary such as BERT's)"
            )

    def word_id(self, core: str) -> int | None:
        """The vocabulary id of ``core`` if the tokenizer keeps it as one whole-word piece, else None."""
        if core not in self._ids:
            pieces = self.tokenizer.tokenize(core)
            i = self.tokenizer.convert_tokens_to_ids(pieces[0]) if len(pieces) == 1 else None
            self._ids[core] = i if i is not None and i < len(self.allowed) and self.allowed[i] else None
        return self._ids[core]


@dataclass
class Slot:
    """A replaceable word: its position in the sentence, the text around its core, its vocabulary id."""

    position: int
    prefix: str
    core: str
    suffix: str
    token_id: int


@dataclass
class Sentence:
    words: list[str]
    slots: list[Slot] = field(default_factory=list)


def parse_sentence(text: str, vocab: Vocabulary) -> Sentence:
    sentence = Sentence(text.split())
    for position, word in enumerate(sentence.words):
        m = WORD.fullmatch(word)
        if m is None or m[2].lower() in STOP_WORDS:
            continue
        token_id = vocab.word_id(m[2])
        if token_id is not None:
            sentence.slots.append(Slot(position, m[1], m[2], m[3], token_id))
    return sentence


def tensor_digest(named_tensors, extra: str = "") -> str:
    """A content hash of tensors (names, shapes, bytes): identifies the model a candidate list came from."""
    h = hashlib.sha256(extra.encode())
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- candidate sources


def nearest_neighbours(
    embeddings: torch.Tensor, ids: torch.Tensor, allowed: torch.Tensor, k: int, chunk: int = 512
) -> torch.Tensor:
    """Row ``i``: the ``k`` allowed ids most cosine-similar to ``ids[i]`` (``ids[i]`` itself excluded)."""
    unit = F.normalize(embeddings.detach().float(), dim=1)
    out = [torch.empty(0, k, dtype=torch.long)]
    for start in range(0, len(ids), chunk):
        rows = ids[start : start + chunk]
        sims = unit[rows] @ unit.T
        sims[:, ~allowed] = -math.inf
        sims[torch.arange(len(rows)), rows] = -math.inf
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


class EmbeddingNeighbours:
    """Candidates of a word: its ``top_k`` nearest whole words in an input-embedding matrix."""

    def __init__(self, embeddings: torch.Tensor, tokenizer, top_k: int):
        self.embeddings = embeddings.detach()
        self.vocab = Vocabulary(tokenizer, embeddings.shape[0])
        self.vocab.check(top_k)
        self.top_k = top_k
        self.table = torch.full((embeddings.shape[0], top_k), -1, dtype=torch.long)
        self.identity = "embedding_nn:" + tensor_digest(
            [("embeddings", self.embeddings)], tokenizer_fingerprint(tokenizer)
        )

    def candidates(self, sentences: list[Sentence]) -> list[torch.Tensor]:
        wanted = torch.tensor(
            sorted({s.token_id for sent in sentences for s in sent.slots}), dtype=torch.long
        )
        new = wanted[self.table[wanted, 0] < 0] if len(wanted) else wanted
        if len(new):
            self.table[new] = nearest_neighbours(self.embeddings, new, self.vocab.allowed, self.top_k)
        return [self.table[[s.token_id for s in sent.slots]] for sent in sentences]


class MaskedLMCandidates:
    """Candidates of a word: a masked LM's ``top_k`` whole-word predictions at its position.

    Input per replaceable word (TinyBERT): ``[CLS] sentence with the word masked [SEP] sentence
    [SEP]``, the second copy as segment B; only the masked copy when both do not fit.
    """

    def __init__(self, model, tokenizer, top_k: int, name: str):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.top_k = top_k
        vocab_size = model.get_output_embeddings().weight.shape[0]
        self.vocab = Vocabulary(tokenizer, vocab_size)
        self.vocab.check(top_k)
        self.max_length = min(model.config.max_position_embeddings, tokenizer.model_max_length)
        self.segments = "token_type_ids" in tokenizer.model_input_names
        self._pieces: dict[str, list[int]] = {}
        self.identity = f"mlm:{name}:" + tensor_digest(
            model.state_dict().items(), tokenizer_fingerprint(tokenizer)
        )

    @classmethod
    def load(cls, name: str, top_k: int) -> MaskedLMCandidates:
        from transformers import AutoModelForMaskedLM

        return cls(_load_mlm_part(AutoModelForMaskedLM, name), _load_mlm_part(None, name), top_k, name)

    def _ids(self, text: str) -> list[int]:
        if text not in self._pieces:
            self._pieces[text] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))
        return self._pieces[text]

    def _rows(self, sentence: Sentence) -> list[tuple[list[int], list[int], int] | None]:
        """One masked input per slot: (ids, token types, mask index), or None when it is cut off."""
        ids, core_at = [], []
        slots = iter(sentence.slots)
        slot = next(slots, None)
        for position, word in enumerate(sentence.words):
            if slot is not None and slot.position == position:
                ids += self._ids(slot.prefix)
                core_at.append(len(ids))
                ids += [slot.token_id, *self._ids(slot.suffix)]
                slot = next(slots, None)
            else:
                ids += self._ids(word)
        t = self.tokenizer
        rows = []
        for at in core_at:
            masked = [*ids[:at], t.mask_token_id, *ids[at + 1 :]]
            if 2 * len(ids) + 3 <= self.max_length:
                seq = [t.cls_token_id, *masked, t.sep_token_id, *ids, t.sep_token_id]
            elif at + 2 < self.max_length:
                seq = [t.cls_token_id, *masked[: self.max_length - 2], t.sep_token_id]
            else:
                rows.append(None)
                continue
            types = [0] * (len(masked) + 2) + [1] * (len(seq) - len(masked) - 2)
            rows.append((seq, types[: len(seq)], at + 1))
        return rows

    def _logits_at(self, inputs: dict, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """The MLM's logits at the masked positions only: the vocabulary projection of every other
        position is most of the work for a small model (BERT's head is ``cls``, RoBERTa's ``lm_head``)."""
        head = getattr(self.model, "cls", None) or getattr(self.model, "lm_head", None)
        if head is None:
            return self.model(**inputs).logits[rows, at]
        return head(self.model.base_model(**inputs).last_hidden_state[rows, at])

    @torch.inference_mode()
    def candidates(self, sentences: list[Sentence]) -> list[torch.Tensor]:
        result = [torch.full((len(s.slots), self.top_k), -1, dtype=torch.long) for s in sentences]
        jobs = []  # (sentence index, slot index, row, original id)
        for i, sentence in enumerate(sentences):
            for j, (slot, row) in enumerate(zip(sentence.slots, self._rows(sentence), strict=True)):
                if row is not None:
                    jobs.append((i, j, row, slot.token_id))
        jobs.sort(key=lambda job: len(job[2][0]))  # similar lengths per batch: little padding
        allowed = self.vocab.allowed.to(self.device)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(jobs), MLM_BATCH):
            batch = jobs[start : start + MLM_BATCH]
            longest = max(len(row[0]) for _, _, row, _ in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            token_types = torch.zeros_like(input_ids)
            attention = torch.zeros_like(input_ids)
            for b, (_, _, (seq, types, _), _) in enumerate(batch):
                input_ids[b, : len(seq)] = torch.tensor(seq)
                token_types[b, : len(seq)] = torch.tensor(types)
                attention[b, : len(seq)] = 1
            inputs = {"input_ids": input_ids, "attention_mask": attention}
            if self.segments:
                inputs["token_type_ids"] = token_types
            rows = torch.arange(len(batch))
            at = torch.tensor([row[2] for _, _, row, _ in batch])
            scores = self._logits_at({k: v.to(self.device) for k, v in inputs.items()}, rows, at).float()
            scores[:, ~allowed] = -math.inf
            scores[rows, torch.tensor([orig for *_, orig in batch])] = -math.inf
            top = scores.topk(self.top_k, dim=1).indices.cpu()
            for b, (i, j, _, _) in enumerate(batch):
                result[i][j] = top[b]
        return result


def _load_mlm_part(factory, name: str):
    """``factory.from_pretrained(name)`` (the tokenizer when ``factory`` is None); errors in one line."""
    from transformers import AutoTokenizer

    try:
        return (factory or AutoTokenizer).from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the masked LM augment.mlm_model='{name}': {first}") from None


def check_masked_lm(name: str) -> None:
    """Fail now, in one line, if the MLM's config or tokenizer cannot be loaded (a typo, offline hub)."""
    from transformers import AutoConfig

    _load_mlm_part(AutoConfig, name)
    _load_mlm_part(None, name)


# --------------------------------------------------------------------------- generation


def new_versions(
    sentences: list[Sentence],
    candidates: list[torch.Tensor],
    tokens: list[str],
    factor: int,
    p: float,
    rng: np.random.Generator,
) -> list[tuple[str, ...]]:
    """Up to ``factor`` distinct new versions of one example (one sentence or a pair)."""
    keys: dict[str, int] = {}
    options: list[list[int]] = []  # candidate ids per distinct word (its first occurrence's)
    occurrences = []  # (sentence index, slot, distinct word index)
    for s, (sentence, cands) in enumerate(zip(sentences, candidates, strict=True)):
        for slot, row in zip(sentence.slots, cands.tolist(), strict=True):
            if row[0] < 0:
                continue
            key = slot.core.lower()
            if key not in keys:
                keys[key] = len(options)
                options.append(row)
            occurrences.append((s, slot, keys[key]))
    if not options:
        return []
    replace = rng.random((factor, len(options))) < p
    pick = rng.integers(0, len(options[0]), size=(factor, len(options)))
    original = tuple(" ".join(s.words) for s in sentences)
    seen, out = {original}, []
    for v in range(factor):
        if not replace[v].any():
            continue
        words = [list(s.words) for s in sentences]
        for s, slot, j in occurrences:
            if replace[v, j]:
                new = match_case(tokens[options[j][pick[v, j]]], slot.core)
                words[s][slot.position] = slot.prefix + new + slot.suffix
        texts = tuple(" ".join(w) for w in words)
        if texts not in seen:
            seen.add(texts)
            out.append(texts)
    return out


def cache_key(task: GlueTask, originals: Examples, aug: AugmentConfig, identity: str) -> str:
    settings = f"{VERSION}|{task.name}|{originals.source_hash}|{aug.method}|{aug.factor}|{aug.p!r}|"
    settings += f"{aug.top_k}|{aug.seed}|{identity}|{sorted(STOP_WORDS)}"
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def generate(task: GlueTask, originals: Examples, aug: AugmentConfig, source, path: Path, bar: bool) -> None:
    """Write the new examples of ``originals`` to ``path`` (a TSV: source row, texts), atomically."""
    n = len(originals)
    words = sum(len(t.split()) for texts in originals.texts for t in texts)
    chars = sum(len(t) + 1 for texts in originals.texts for t in texts)
    log.info(
        "augment %s (%s, p=%s, top_k=%d): %d examples x up to %d -> at most %d new examples, "
        "%d words, a cache file of ~%.1f MB",
        task.name, aug.method, aug.p, aug.top_k, n, aug.factor, n * aug.factor,
        words * aug.factor, chars * aug.factor / 1e6,
    )  # fmt: skip
    rng = np.random.default_rng(aug.seed)
    tokens = source.vocab.tokens
    header = ["source", *(f"text_{c}" for c in "ab"[: len(originals.texts[0])])]
    t0, written, next_log = time.perf_counter(), 0, n // 10
    with (
        atomic_path(path) as tmp,
        open(tmp, "w") as f,
        tqdm(total=n, desc=f"augment {task.name}", unit="ex", disable=not bar) as pbar,
    ):
        f.write("\t".join(header) + "\n")
        for start in range(0, n, CHUNK):
            parsed = [
                [parse_sentence(t, source.vocab) for t in texts]
                for texts in originals.texts[start : start + CHUNK]
            ]
            flat = iter(source.candidates([s for sentences in parsed for s in sentences]))
            for offset, sentences in enumerate(parsed):
                cands = [next(flat) for _ in sentences]
                for texts in new_versions(sentences, cands, tokens, aug.factor, aug.p, rng):
                    f.write(f"{start + offset}\t" + "\t".join(texts) + "\n")
                    written += 1
            done = min(n, start + CHUNK)
            pbar.update(done - start)
            if not bar and (done >= next_log or done == n):
                rate = done / max(1e-9, time.perf_counter() - t0)
                log.info(
                    "augment %s: %d/%d examples, %d new, %.0f examples/s, ~%.0f s left",
                    task.name, done, n, written, rate, (n - done) / rate,
                )  # fmt: skip
                next_log = done + max(1, n // 10)


def read_new_examples(path: Path, originals: Examples) -> tuple[list[int], list[tuple[str, ...]]]:
    """The (source row, texts) pairs of an augmentation cache file, checked against ``originals``."""
    n_text = len(originals.texts[0])
    lines = path.read_text().split("\n")[:-1]
    sources, texts = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != n_text + 1 or not fields[0].isdigit() or int(fields[0]) >= len(originals):
            raise UserError(f"{path}:{lineno}: corrupt augmentation cache file; delete it to rebuild it")
        sources.append(int(fields[0]))
        texts.append(tuple(fields[1:]))
    return sources, texts


@dataclass
class Augmented:
    examples: Examples  # the originals (with their labels) followed by the new, unlabelled examples
    originals: int
    added: int
    path: Path
    cached: bool
    seconds: float


def augment_examples(
    task: GlueTask, originals: Examples, aug: AugmentConfig, source, cache_dir: Path, bar: bool = False
) -> Augmented:
    """``originals`` plus their new versions, from the cache file or generated (and cached) now."""
    t0 = time.perf_counter()
    key = cache_key(task, originals, aug, source.identity)
    path = Path(cache_dir) / "augmented" / f"{task.name}-{aug.method}-{key}.tsv"
    cached = path.is_file()
    if not cached:
        generate(task, originals, aug, source, path, bar)
    _, texts = read_new_examples(path, originals)
    unlabelled = float("nan") if task.is_regression else -100
    examples = Examples(
        originals.texts + texts,
        originals.labels + [unlabelled] * len(texts),
        f"{originals.source_hash}|augmented:{key}",
    )
    return Augmented(examples, len(originals), len(texts), path, cached, time.perf_counter() - t0)


def transfer_examples(
    originals: Examples, source: Examples, aug: AugmentConfig, regression: bool
) -> Examples:
    """``originals`` followed by ``aug.factor`` x as many texts of ``source``, unlabelled, drawn
    with ``aug.seed`` from its distinct texts that ``originals`` lacks (all of them when fewer)."""
    own = set(originals.texts)
    pool = list(dict.fromkeys(t for t in source.texts if t not in own))
    k = min(len(pool), aug.factor * len(originals))
    pick = np.sort(np.random.default_rng(aug.seed).choice(len(pool), size=k, replace=False))
    unlabelled = float("nan") if regression else -100
    return Examples(
        originals.texts + [pool[i] for i in pick],
        originals.labels + [unlabelled] * k,
        f"{originals.source_hash}|transfer:{aug.source}:{source.source_hash}:{aug.factor}:{aug.seed}",
    )


def augment_train_set(
    aug: AugmentConfig,
    task: GlueTask,
    datamodule: GlueDataModule,
    teacher,
    tokenizer,
    cache_dir: Path,
    bar: bool,
    transfer_source: Examples | None = None,
) -> dict | None:
    """Switch ``datamodule`` to the augmented training set (distillation stages); the results.json record.

    The neighbours of ``embedding_nn`` come from ``teacher``'s input embeddings; ``transfer`` draws
    from ``transfer_source``, the source task's train split (the pipeline reads it at startup). Returns
    None (and changes nothing) when ``aug`` does not apply to the task.
    """
    if not aug.applies_to(task.name):
        if aug.method != "none":
            log.info("augment: not for %s (augment.tasks = %s)", task.name, list(aug.tasks or ()))
        return None
    if aug.method == "transfer":
        t0 = time.perf_counter()
        if transfer_source is None:
            raise ValueError(f"augment=transfer needs {aug.source}'s train split (transfer_source)")
        originals = datamodule.train_examples
        datamodule.use_train_examples(transfer_examples(originals, transfer_source, aug, task.is_regression))
        n, added = len(datamodule.train_examples), len(datamodule.train_examples) - len(originals)
        log.info(
            "augment %s: %d examples + %d %s training texts (unlabelled) = %d for the distillation stages",
            task.name, len(originals), added, aug.source, n,
        )  # fmt: skip
        return {
            "method": aug.method,
            "source": aug.source,
            "factor": aug.factor,
            "seed": aug.seed,
            "original_examples": len(originals),
            "new_examples": added,
            "train_examples": n,
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
    if aug.method == "embedding_nn":
        source = EmbeddingNeighbours(teacher.get_input_embeddings().weight, tokenizer, aug.top_k)
    else:
        source = MaskedLMCandidates.load(aug.mlm_model, aug.top_k)
    result = augment_examples(task, datamodule.train_examples, aug, source, cache_dir, bar)
    datamodule.use_train_examples(result.examples)
    log.info(
        "augment %s: %d examples + %d new (unlabelled) = %d for the distillation stages (%s %s)",
        task.name, result.originals, result.added, len(result.examples),
        "cached" if result.cached else "written", result.path,
    )  # fmt: skip
    return {
        "method": aug.method,
        "factor": aug.factor,
        "p": aug.p,
        "top_k": aug.top_k,
        "seed": aug.seed,
        **({"mlm_model": aug.mlm_model} if aug.mlm_model else {}),
        "original_examples": result.originals,
        "new_examples": result.added,
        "train_examples": len(result.examples),
        "cache": str(result.path),
        "cached": result.cached,
        "wall_time_s": round(result.seconds, 2),
    }

"""The typed run config: built from the composed Hydra config once, at startup, every key checked.

``run_config(cfg)`` runs at the start of ``pipeline.run``, before the run folder is touched: it
reads every group of the composed ``DictConfig`` into a frozen dataclass (``RunConfig`` holds one
per group), checking each value as it goes; all the problems found raise one ``UserError`` with
one line each (``errors.Problems``).
Everything below the pipeline receives these objects, never the ``DictConfig``. A new setting is
read and checked here, next to the others, so that no value is first looked at hours into a run.
The checks read files (the teacher's ``config.json``) but never load weights or write anything.

Values are kept as given (an ``int`` learning rate stays an ``int``): the cache keys hash them
(``RunConfig.shaping``), and cached models of earlier runs must keep their keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtc_lightning.augment import AugmentConfig, check_masked_lm
from xtc_lightning.distill import DistillConfig, two_stage_split
from xtc_lightning.errors import Problems, UserError, check_exact_keys
from xtc_lightning.export.format import STORED_DTYPES
from xtc_lightning.quant import QuantConfig
from xtc_lightning.recipe import Recipe, check_start_run
from xtc_lightning.resume import RESUME_CHOICES
from xtc_lightning.tasks import GlueTask, get_task

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the configs shipped in the package (a link in a clone)
STAGES = ("teacher", "reduce", "quantize", "export")
PROGRESS = ("auto", "bar", "plain")
TRAINED_STAGES = ("teacher", "reduce", "quantize")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def default_schema(conf_dir: Path = CONF_DIR) -> dict[str, object]:
    """The keys a run config may have: ``config.yaml``'s own entries (with their sub-keys) and one
    key per config group it lists in ``defaults`` (``task``, ``model``, ...), whose content is free."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    schema: dict[str, object] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, Mapping):
            schema.update({str(group).split("/")[0]: None for group in entry})
    schema.pop("hydra", None)
    for key, value in raw.items():
        schema[key] = set(value) if isinstance(value, Mapping) else None
    return schema


def check_known_keys(cfg: Mapping, schema: Mapping[str, object] | None = None) -> None:
    """No key that nothing reads (``+unknown_key=1``, ``+data.batchsize=8``): it would be ignored."""
    schema = default_schema() if schema is None else schema
    for key in cfg:
        if key not in schema:
            raise UserError(
                f"unknown config key '{key}' (added with +?); top-level keys are: {', '.join(sorted(schema))}"
            )
        known = schema[key]
        if known is not None and isinstance(cfg[key], Mapping):
            unknown = sorted(set(cfg[key]) - known)
            if unknown:
                raise UserError(
                    f"unknown config key '{key}.{unknown[0]}'; {key} has: {', '.join(sorted(known))}"
                )


def _number(name: str, value, *, or_zero: bool = False, unit: str = "") -> None:
    """A number (not a bool) > 0, or >= 0 with ``or_zero``."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not (value >= 0 if or_zero else value > 0):
        raise UserError(
            f"{name}={value!r} is not accepted: expected a number {'>=' if or_zero else '>'} 0{unit}"
        )


def _positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        more = " or null" if allow_none else ""
        raise UserError(f"{name}={value!r} is not accepted: expected an integer >= 1{more}")


def _integer(name: str, value) -> None:
    if not _is_int(value):
        raise UserError(f"{name}={value!r} is not accepted: expected an integer")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r} is not accepted: expected true or false")


def _text(name: str, value, *, allow_none: bool = False) -> None:
    if not ((isinstance(value, str) and value) or (value is None and allow_none)):
        raise UserError(
            f"{name}={value!r} is not accepted: expected a non-empty string{' or null' if allow_none else ''}"
        )


def _group(group, name: str, keys: Sequence[str]) -> Mapping:
    """A config group with exactly ``keys``."""
    if not isinstance(group, Mapping):
        raise UserError(f"{name} must be a mapping with keys {list(keys)}, got {group!r}")
    check_exact_keys(group, keys, name)
    return group


@dataclass(frozen=True)
class ModelConfig:
    """``model``: the backbone the teacher is fine-tuned from (an HF folder or hub id;
    ``package:minilm`` is the bundled MiniLM)."""

    name_or_path: str
    trust_remote_code: bool

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        d = _group(d, "model", ("name_or_path", "trust_remote_code"))
        _text("model.name_or_path", d["name_or_path"])
        _flag("model.trust_remote_code", d["trust_remote_code"])
        return cls(d["name_or_path"], d["trust_remote_code"])

    def as_dict(self) -> dict:
        return {"name_or_path": self.name_or_path, "trust_remote_code": self.trust_remote_code}


@dataclass(frozen=True)
class StudentConfig:
    """``student``: the teacher layers the student keeps (``layers`` or ``num_layers``, or neither:
    all of them); ``select`` checks them against the teacher's depth (``student.layers_from_config``)."""

    name: str
    layers: tuple[int, ...] | None
    num_layers: int | None

    def select(self, teacher_layers: int) -> list[int]:
        from xtc_lightning.student import layers_from_config

        layers = None if self.layers is None else list(self.layers)
        return layers_from_config(
            {"name": self.name, "layers": layers, "num_layers": self.num_layers}, teacher_layers
        )


@dataclass(frozen=True)
class OptimConfig:
    """``optim``: AdamW with linear warm-up (``warmup_epochs``) and linear decay."""

    lr: float
    weight_decay: float
    warmup_epochs: float
    betas: tuple[float, float]
    eps: float

    @classmethod
    def from_dict(cls, d: Mapping) -> OptimConfig:
        d = _group(d, "optim", ("lr", "weight_decay", "warmup_epochs", "betas", "eps"))
        _number("optim.lr", d["lr"])
        _number("optim.weight_decay", d["weight_decay"], or_zero=True)
        _number("optim.warmup_epochs", d["warmup_epochs"], or_zero=True, unit=" (epochs)")
        betas = d["betas"]
        if (
            not isinstance(betas, Sequence)
            or len(betas) != 2
            or not all(not isinstance(b, bool) and isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            raise UserError(f"optim.betas={betas!r} is not accepted: expected two numbers in [0, 1)")
        _number("optim.eps", d["eps"])
        return cls(d["lr"], d["weight_decay"], d["warmup_epochs"], tuple(betas), d["eps"])

    def as_dict(self) -> dict:
        """The group as given: the cache key and the checkpoints' hyperparameters."""
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "betas": list(self.betas),
            "eps": self.eps,
        }


@dataclass(frozen=True)
class StageConfig:
    """A trained stage's budget: ``teacher``, ``reduce``, ``quantize`` (defaults: ``trainer.max_epochs``,
    ``optim.lr``). ``checkpoint``: teacher only (an already fine-tuned HF folder, only evaluated);
    ``warmup_epochs`` and ``seed``: quantize only (its own warm-up; it alone is seeded by it)."""

    max_epochs: int
    lr: float
    checkpoint: str | None = None
    warmup_epochs: float | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, stage: str, d: Mapping) -> StageConfig:
        own = {"teacher": ("checkpoint",), "reduce": (), "quantize": ("warmup_epochs", "seed")}[stage]
        d = _group(d, stage, ("max_epochs", "lr", *own))
        _integer(f"{stage}.max_epochs", d["max_epochs"])
        _number(f"{stage}.lr", d["lr"])
        if stage == "teacher":
            _text("teacher.checkpoint", d["checkpoint"], allow_none=True)
        if stage == "quantize":
            _number("quantize.warmup_epochs", d["warmup_epochs"], or_zero=True, unit=" (epochs)")
            _integer("quantize.seed", d["seed"])
        return cls(**d)

    def budget(self) -> dict:
        """``{max_epochs, lr}``: the part of the cache key this stage adds."""
        return {"max_epochs": self.max_epochs, "lr": self.lr}


@dataclass(frozen=True)
class DataConfig:
    """``data``: where GLUE comes from, lengths and batch sizes (per process)."""

    dir: str | None
    hub_dataset: str
    max_length: int
    batch_size: int
    eval_batch_size: int
    max_train_examples: int | None
    num_workers: int

    @classmethod
    def from_dict(cls, d: Mapping) -> DataConfig:
        keys = (
            "dir",
            "hub_dataset",
            "max_length",
            "batch_size",
            "eval_batch_size",
            "max_train_examples",
            "num_workers",
        )
        d = _group(d, "data", keys)
        _positive_int("data.batch_size", d["batch_size"])
        _positive_int("data.eval_batch_size", d["eval_batch_size"])
        _positive_int("data.max_length", d["max_length"])
        _text("data.dir", d["dir"], allow_none=True)
        _text("data.hub_dataset", d["hub_dataset"])
        subset = d["max_train_examples"]  # <= 0 is refused by data.py, which says why
        if not (subset is None or _is_int(subset)):
            raise UserError(
                f"data.max_train_examples={subset!r} is not accepted: expected an integer or null"
            )
        if not _is_int(d["num_workers"]) or d["num_workers"] < 0:
            raise UserError(
                f"data.num_workers={d['num_workers']!r} is not accepted: expected an integer >= 0"
            )
        return cls(**d)


@dataclass(frozen=True)
class ExportConfig:
    """``export``: the packed file's other dtype and what else is written (``export/run.py``)."""

    other_dtype: str
    hf: bool
    hf_dequantized: bool
    evaluate: bool

    @classmethod
    def from_dict(cls, d: Mapping) -> ExportConfig:
        d = _group(d, "export", ("other_dtype", "hf", "hf_dequantized", "evaluate"))
        if d["other_dtype"] not in STORED_DTYPES:
            raise UserError(
                f"export.other_dtype '{d['other_dtype']}' is not accepted; choose one of: {', '.join(STORED_DTYPES)}"
            )
        for key in ("hf", "hf_dequantized", "evaluate"):
            _flag(f"export.{key}", d[key])
        return cls(**d)


@dataclass(frozen=True)
class TrainerConfig:
    """``trainer``: ``lightning.Trainer`` arguments, passed through as given (``max_epochs`` is each
    stage's own, its default); ``precision``, ``log_every_n_steps`` (also the interval of the plain
    progress lines), ``max_epochs`` and a ddp launch are checked here."""

    arguments: Mapping
    log_every_n_steps: int

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainerConfig:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not isinstance(d, Mapping):
            raise UserError(f"trainer must be a mapping of lightning.Trainer arguments, got {d!r}")
        for key in ("precision", "log_every_n_steps", "max_epochs"):
            if key not in d:
                raise UserError(
                    f"trainer.{key} is missing: the trainer config must set it (conf/trainer/cpu.yaml)"
                )
        if d["precision"] not in PRECISIONS:
            raise UserError(
                f"trainer.precision '{d['precision']}' is not accepted; choose one of: {', '.join(PRECISIONS)}"
            )
        _positive_int("trainer.log_every_n_steps", d["log_every_n_steps"])
        _integer("trainer.max_epochs", d["max_epochs"])  # the stages' default budget
        launched_outside = any(v in os.environ for v in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))
        # an absent strategy is Lightning's default, "auto": one process
        spawns = str(d.get("strategy")).startswith("ddp") and not launched_outside
        if spawns and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise UserError(
                "a ddp trainer cannot start its processes inside a local multirun (-m); "
                "run the sweep through hydra/launcher=slurm, or one run per command"
            )
        return cls(dict(d), d["log_every_n_steps"])

    def limits(self) -> dict:
        """The settings that cut a run short (``fast_dev_run``, ``limit_*_batches``): a run with any of
        them is ``limited`` and its scores are not results (``xtc-report`` skips it)."""
        limits = {}
        for key, value in self.arguments.items():
            whole = value is None or (isinstance(value, float) and value == 1.0)  # int 1 is one batch
            if (key == "fast_dev_run" and value) or (key.startswith("limit_") and not whole):
                limits[key] = value
        return limits


@dataclass(frozen=True)
class RunConfig:
    """The whole run, checked: the top-level keys and one object per config group.

    ``loggers`` is the ``logger`` group (``hydra.utils.instantiate`` targets), ``resolved`` the whole
    config as plain values (``config_resolved.yaml``: the resume check, wandb, the model card)."""

    stage: str
    seed: int
    num_threads: int | None
    progress: str
    resume: object  # auto | True | False
    checkpoint_every_n_train_steps: int | None
    task: GlueTask
    model: ModelConfig
    student: StudentConfig
    quant: QuantConfig
    distill: DistillConfig
    recipe: Recipe
    augment: AugmentConfig
    optim: OptimConfig
    teacher: StageConfig
    reduce: StageConfig
    quantize: StageConfig
    trainer: TrainerConfig
    data: DataConfig
    export: ExportConfig
    output_dir: Path
    cache_dir: Path
    loggers: Mapping
    resolved: Mapping

    def stage_config(self, stage: str) -> StageConfig:
        return {"teacher": self.teacher, "reduce": self.reduce, "quantize": self.quantize}[stage]

    def stage_optim(self, stage: str) -> OptimConfig:
        """A trained stage's optimizer settings: ``optim``, with the quantize stage's own warm-up."""
        if stage == "quantize":
            return replace(self.optim, warmup_epochs=self.quantize.warmup_epochs)
        return self.optim

    @property
    def shaping(self) -> dict:
        """What shapes every model the run trains, as ``cache.shaping_key`` hashes it."""
        return {
            "task": self.task.name,
            "model": self.model.as_dict(),
            "data": {"max_length": self.data.max_length, "batch_size": self.data.batch_size},
            "optim": self.optim.as_dict(),
            "trainer": dict(self.trainer.arguments),
            "seed": self.seed,
        }


def _check_run_keys(c: Mapping, problems: Problems) -> None:
    """``stage``, ``progress``, ``seed``, ``resume``, ``num_threads``, ``checkpoint``: one problem each."""
    if c["stage"] not in STAGES:
        problems.add(f"unknown stage '{c['stage']}'; choose one of: {', '.join(STAGES)}")
    if c["progress"] not in PROGRESS:
        problems.add(f"progress={c['progress']!r} is not accepted; choose one of: {', '.join(PROGRESS)}")
    if not _is_int(c["seed"]):
        problems.add(f"seed={c['seed']!r} is not accepted: expected an integer")
    if c["resume"] not in RESUME_CHOICES:
        problems.add(f"resume '{c['resume']}' is not accepted; choose one of: auto, true, false")
    problems.check(_positive_int, "num_threads", c["num_threads"], allow_none=True)
    problems.check(_checkpoint_every, c["checkpoint"])


def _checkpoint_every(d) -> int | None:
    every = _group(d, "checkpoint", ("every_n_train_steps",))["every_n_train_steps"]
    if every is not None and (not _is_int(every) or every < 1):
        raise UserError(f"checkpoint.every_n_train_steps must be a positive integer or null, not {every!r}")
    return every


def model_config(model: ModelConfig, checkpoint: str | None):
    """The HF config of the model the run starts from (``teacher.checkpoint`` or ``model``), read
    from its ``config.json`` without loading weights; None when it cannot be read here (a hub id
    not in the local cache, a missing folder: reported when the model is loaded)."""
    from transformers import AutoConfig

    from xtc_lightning.models import resolve_name_or_path

    source = checkpoint or resolve_name_or_path(model.name_or_path)
    try:
        return AutoConfig.from_pretrained(
            str(source), local_files_only=True, trust_remote_code=model.trust_remote_code
        )
    except Exception:  # noqa: BLE001 -- any unreadable source is reported when it is loaded
        return None


def _check_model_type(config, name: str) -> None:
    """The model type has a sequence-classification head and a padding token (batches are padded)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise UserError(
            f"model '{name}' is a '{config.model_type}' model, which has no sequence-classification head "
            "in transformers; use an encoder such as BERT, RoBERTa or DistilBERT"
        )
    if getattr(config, "pad_token_id", None) is None:
        raise UserError(
            f"model '{name}' ('{config.model_type}') has no padding token (pad_token_id); "
            "batches are padded: use an encoder such as BERT, RoBERTa or DistilBERT"
        )


def _teacher_depth(teacher_config) -> int | None:
    """The teacher's layer count from its HF config; None when unknown (no config read here, or a
    model type without one: reported when the teacher is loaded)."""
    from xtc_lightning.models import num_layers_of

    if teacher_config is None:
        return None
    try:
        return num_layers_of(teacher_config)
    except UserError:
        return None


def _student(d: Mapping, stage: str, depth: int | None) -> StudentConfig:
    """``student``, its layers checked against the teacher's ``depth`` when a student is built (in
    a teacher-only run or at an unknown depth, still its keys and empty, duplicate, negative and
    zero-count selections)."""
    from xtc_lightning.student import layers_from_config

    layers_from_config(d, depth if stage != "teacher" and depth is not None else 10**6)
    layers = d["layers"]
    return StudentConfig(d["name"], None if layers is None else tuple(layers), d["num_layers"])


def _check_direction_matching(recipe: Recipe, distill: DistillConfig) -> None:
    changed = recipe.direction_losses
    if not any(distill.weights[loss] for loss in changed):
        raise UserError(
            f"recipe.direction_matching={recipe.direction_matching} changes the {' and '.join(changed)} "
            f"loss, but distill={distill.name} weights it 0: use distill=xtc or set "
            f"recipe.direction_matching=none"
        )


def _distilling_stages(last: str, student: Mapping, depth: int | None, quant: QuantConfig) -> list[str]:
    """The distillation stages the run reaches (``reduce`` when the student drops teacher layers,
    ``quantize`` when ``quant`` quantizes). ``reduce`` is left out at an unknown teacher ``depth``:
    the stage checks its budget when it starts."""
    from xtc_lightning.student import layers_from_config

    reached = STAGES[: STAGES.index(last) + 1]
    stages = []
    if "reduce" in reached and depth is not None and len(layers_from_config(student, depth)) < depth:
        stages.append("reduce")
    if "quantize" in reached and quant.enabled:
        stages.append("quantize")
    return stages


def _task(d) -> GlueTask:
    """``task``: one key, ``name``, a task of the task table (``tasks.TASKS``)."""
    return get_task(_group(d, "task", ("name",))["name"])


def run_config(cfg: DictConfig) -> RunConfig:
    """The composed config read into a ``RunConfig``, every value checked. Unknown keys are refused
    first; then every problem is reported, not only the first: the top-level values and each group
    are checked on their own (in a group, its first bad value), and a check that needs another
    group's value runs when that group passed; one ``UserError`` has one line per problem."""
    from xtc_lightning.models import check_model_source

    check_known_keys(cfg)  # first and alone: the groups below would name an unknown key again
    c = OmegaConf.to_container(cfg, resolve=True)
    problems = Problems()
    check = problems.check
    _check_run_keys(c, problems)
    optim = check(OptimConfig.from_dict, c["optim"])
    trainer = check(TrainerConfig.from_dict, c["trainer"])
    # the stages' budgets default to optim, trainer.max_epochs and seed (interpolations): checked
    # once those passed, so that one bad optim.lr is one line, not four
    stages: dict[str, StageConfig | None] = dict.fromkeys(TRAINED_STAGES)
    if not problems.lines:
        stages = {stage: check(StageConfig.from_dict, stage, c[stage]) for stage in TRAINED_STAGES}
    data = check(DataConfig.from_dict, c["data"])
    model = check(ModelConfig.from_dict, c["model"])
    teacher_config = None
    if model is not None and stages["teacher"] is not None:
        teacher_config = model_config(model, stages["teacher"].checkpoint)
        if teacher_config is not None:
            check(_check_model_type, teacher_config, stages["teacher"].checkpoint or model.name_or_path)
    depth = _teacher_depth(teacher_config)
    student = check(_student, c["student"], c["stage"], depth)
    task = check(_task, c["task"])
    quant = check(QuantConfig.from_dict, c["quant"])
    recipe = None
    if quant is not None and stages["quantize"] is not None:
        recipe = check(Recipe.from_dict, c["recipe"], quant, stages["quantize"].max_epochs)
    if recipe is not None and recipe.start_run is not None and None not in (task, student):
        layers = None if depth is None else student.select(depth)
        check(check_start_run, recipe.start_run, task.name, layers)
    distill = check(DistillConfig.from_dict, c["distill"])
    if recipe is not None and distill is not None and recipe.direction_losses:
        check(_check_direction_matching, recipe, distill)
    if (
        distill is not None
        and distill.intermediate_fraction
        and None not in (student, quant, *stages.values())
    ):
        for stage in _distilling_stages(c["stage"], c["student"], depth, quant):
            check(two_stage_split, distill, stages[stage].max_epochs, f"{stage}.max_epochs")
    if model is not None:
        check(check_model_source, model.name_or_path)
    augment = check(AugmentConfig.from_dict, c["augment"])
    builds_student = c["stage"] != "teacher" and task is not None
    if builds_student and augment is not None and augment.method == "mlm" and augment.applies_to(task.name):
        check(check_masked_lm, augment.mlm_model)  # now, not after an hour of teacher training
    if builds_student and augment is not None:
        check(augment.check_source, task)
    export = check(ExportConfig.from_dict, c["export"])
    problems.raise_all()
    return RunConfig(
        stage=c["stage"],
        seed=c["seed"],
        num_threads=c["num_threads"],
        progress=c["progress"],
        resume=c["resume"],
        checkpoint_every_n_train_steps=c["checkpoint"]["every_n_train_steps"],
        task=task,
        model=model,
        student=student,
        quant=quant,
        distill=distill,
        recipe=recipe,
        augment=augment,
        optim=optim,
        teacher=stages["teacher"],
        reduce=stages["reduce"],
        quantize=stages["quantize"],
        trainer=trainer,
        data=data,
        export=export,
        output_dir=Path(c["paths"]["output_dir"]).resolve(),
        cache_dir=Path(c["paths"]["cache_dir"]).resolve(),
        loggers=c.get("logger") or {},  # no logger group (~logger, logger=[]): no loggers
        resolved=c,
    )


def stage_seed(seed: int, stage: str) -> int:
    """The seed a stage starts from: a hash of the run's ``seed`` and the stage name, in [0, 2**31).

    Every stage re-seeds at its start, so its result depends on its inputs only, never on what ran
    before it in the process (a teacher trained here or taken from the cache draws differently)."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

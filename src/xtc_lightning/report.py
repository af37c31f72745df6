"""Paper-style results from run folders: a markdown table and a score-vs-size plot (``xtc-report``).

Every ``results.json`` under the given folders (searched recursively, e.g. a sweep's
output) is one run; runs marked ``limited`` (debug, ``trainer.limit_*``: a score over part of
dev) are left out unless asked for. A run gives two points: its final stage (the student) and its teacher
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

Figures (``plot_score_vs_size``): dev score vs size, the GLUE average per configuration and
one small panel per task; PNG, or vector PDF/SVG.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from xtc_lightning.errors import UserError, entry_point
from xtc_lightning.io import atomic_path, write_text_atomic
from xtc_lightning.results import read_json, read_record
from xtc_lightning.tasks import TASKS

TASK_ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")


def task_title(name: str) -> str:
    """The GLUE title of a task (``tasks.GlueTask.title``); an unknown name as it is."""
    return TASKS[name].title if name in TASKS else name


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
        export = read_json(run_dir / "export" / "export.json")
    try:
        return int(export["size"]["file_bytes"])
    except (TypeError, KeyError):
        return None


def points_of_run(results_path: Path, results: dict | None = None) -> list[Point]:
    """The student point (when the run went past the teacher) and the teacher point of one run."""
    results = read_record(results_path, results_path.parent) if results is None else results
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


def collect(
    roots: list[str | Path], include_limited: bool = False
) -> tuple[list[Point], list[str], list[str]]:
    """All points under ``roots`` (each teacher once), the runs skipped as unreadable, and the
    limited runs (``results.json`` ``limited``: debug, ``limit_*``) left out unless ``include_limited``."""
    points: dict[tuple, Point] = {}
    skipped, limited = [], []
    for path in find_results(roots):
        try:
            results = read_record(path, path.parent)
            if results.get("limited") and not include_limited:
                limited.append(str(path.parent))
                continue
            run_points = points_of_run(path, results)
        except (
            OSError,
            ValueError,
            UserError,
            KeyError,
            TypeError,
            AttributeError,
        ) as err:  # half-written or foreign
            skipped.append(f"{path}: {type(err).__name__}: {err}")
            continue
        for p in run_points:
            key = (p.task, p.run_dir, p.teacher)
            if key not in points or p.score > points[key].score:
                points[key] = p
    if not points:
        only = f" ({len(limited)} limited runs left out: --include-limited adds them)" if limited else ""
        raise UserError(f"no readable results.json under {', '.join(map(str, roots))}{only}")
    return sorted(points.values(), key=lambda p: (p.sort_key, p.task)), skipped, limited


def task_order(points: list[Point]) -> list[str]:
    """The tasks present, in the GLUE paper's order (unknown names last, sorted)."""
    tasks = [t for t in TASK_ORDER if any(p.task == t for p in points)]
    return tasks + sorted({p.task for p in points} - set(tasks))


@dataclass(frozen=True)
class Row:
    """One configuration (table row, figure colour): its best score per task and its size."""

    label: str
    weight_bits: int
    activation_bits: int
    best: dict  # task -> best dev score (fraction)
    size_bytes: float
    size_exact: bool
    runs: int

    @property
    def average(self) -> float:
        return sum(self.best.values()) / len(self.best)


def rows_of(points: list[Point]) -> list[Row]:
    """The configurations, teacher first then by layers and bits: best score per task (a sweep's
    or seeds' best run), size = the largest packed file of the row, else the largest theoretical."""
    members: dict[str, list[Point]] = {}
    for p in sorted(points, key=lambda p: p.sort_key):
        members.setdefault(p.row, []).append(p)
    rows = []
    for label, ps in members.items():
        exact = [p for p in ps if p.size_exact]
        best = {t: max(p.score for p in ps if p.task == t) for t in task_order(ps)}
        rows.append(
            Row(label, ps[0].weight_bits, ps[0].activation_bits, best,
                max(p.size_bytes for p in (exact or ps)), bool(exact), len(ps))
        )  # fmt: skip
    return rows


def results_table(points: list[Point]) -> str:
    """The markdown table (see the module docstring)."""
    tasks = task_order(points)
    header = [
        "configuration",
        "W/A bits",
        *(task_title(t) for t in tasks),
        "avg",
        "size (MB)",
        "runs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    incomplete = False
    for row in rows_of(points):
        mark = "*" if len(row.best) < len(tasks) else ""
        incomplete |= bool(mark)
        cells = [
            row.label,
            f"{row.weight_bits}/{row.activation_bits}",
            *(f"{100 * row.best[t]:.1f}" if t in row.best else "-" for t in tasks),
            f"{100 * row.average:.1f}{mark}",
            f"{'' if row.size_exact else '~'}{row.size_bytes / MB:.2f}",
            str(row.runs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Dev scores x100 (best run per cell); size: packed file, or ~ theoretical (bits x params / 8).",
    ]
    if incomplete:
        notes.append("\\* average over the tasks this row has.")
    return "\n".join(lines + notes) + "\n"


# One marker per weight bit-width (the fp32 teacher shares fp32's), one colour per configuration.
BIT_MARKERS = {32: "o", 16: "h", 8: "s", 4: "D", 3: "p", 2: "^", 1: "v"}
FIGURE_FORMATS = ("png", "pdf", "svg")
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "pdf.fonttype": 42, "svg.fonttype": "none",
    "axes.spines.top": False, "axes.spines.right": False,
}  # fmt: skip


def _style_axis(ax, ylabel: bool = True) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1 2 5 10 20 50 100 ... MB
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model size (MB)")
    if ylabel:
        ax.set_ylabel("dev score")
    ax.grid(True, which="major", alpha=0.3, linewidth=0.5)


def _legend(fig, rows: list[Row], colour: dict, partial: bool, ncol: int) -> None:
    """Below the axes: one entry per configuration (its colour and bit-width marker)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], linestyle="", marker=BIT_MARKERS.get(r.weight_bits, "X"), markersize=6,
               color=colour[r.label], label=f"{r.label} (W{r.weight_bits}A{r.activation_bits})")
        for r in rows
    ]  # fmt: skip
    if partial:
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor="none",
                              color="grey", label="hollow: average over fewer tasks"))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=min(ncol, len(handles)), frameon=False)


def _save(fig, path: Path, fmt: str) -> Path:
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=300)
    return path


def figure_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt``, else the file's extension; one of FIGURE_FORMATS."""
    fmt = (fmt or Path(path).suffix.lstrip(".") or "png").lower()
    if fmt not in FIGURE_FORMATS:
        raise UserError(f"figure format '{fmt}' is not accepted; choose one of: {', '.join(FIGURE_FORMATS)}")
    return fmt


def plot_score_vs_size(points: list[Point], path: str | Path, fmt: str | None = None) -> list[Path]:
    """Two figures of dev score (x100) vs model size (log x), one marker per weight bit-width and
    one colour per configuration, named in a legend (no labels on the points):

    - ``path``: the GLUE average, one point per configuration (its average over its tasks;
      hollow when it lacks some of the report's tasks);
    - ``<stem>_tasks.<ext>``: one small panel per task, one point per configuration.

    ``fmt`` (png, pdf, svg; default: the extension of ``path``) picks the file type; PDF and SVG
    are vector files with embedded, editable text. Returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = figure_format(path, fmt)
    path = Path(path) if Path(path).suffix else Path(path).with_suffix(f".{fmt}")
    tasks, rows = task_order(points), rows_of(points)
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    colour = {r.label: palette(i % palette.N) for i, r in enumerate(rows)}
    partial = any(len(r.best) < len(tasks) for r in rows)
    written = []
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 3.6), layout="constrained")
        for r in rows:
            full = len(r.best) == len(tasks)
            ax.scatter(r.size_bytes / MB, 100 * r.average, s=40, marker=BIT_MARKERS.get(r.weight_bits, "X"),
                       facecolors=colour[r.label] if full else "none", edgecolors=colour[r.label],
                       linewidths=1.2, zorder=3)  # fmt: skip
        _style_axis(ax)
        ax.set_ylabel("GLUE dev score (average)" if len(tasks) > 1 else f"{task_title(tasks[0])} dev score")
        _legend(fig, rows, colour, partial, ncol=2)
        written.append(_save(fig, path, fmt))
        plt.close(fig)

        ncols = min(3, len(tasks))
        nrows = -(-len(tasks) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.1 * nrows + 0.6),
                                 layout="constrained", squeeze=False, sharex=True)  # fmt: skip
        for i, task in enumerate(tasks):
            ax = axes[i // ncols][i % ncols]
            for r in rows:
                sel = [p for p in points if p.row == r.label and p.task == task]
                if not sel:
                    continue
                best = max(sel, key=lambda p: p.score)
                ax.scatter(best.size_bytes / MB, 100 * best.score, s=30, color=colour[r.label],
                           marker=BIT_MARKERS.get(r.weight_bits, "X"), zorder=3)  # fmt: skip
            _style_axis(ax, ylabel=i % ncols == 0)
            if i + ncols < len(tasks):  # a panel below carries the x axis
                ax.set_xlabel("")
            else:
                ax.tick_params(labelbottom=True)
            ax.set_title(task_title(task))
        for j in range(len(tasks), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        _legend(fig, rows, colour, partial=False, ncol=ncols)
        written.append(_save(fig, path.with_name(f"{path.stem}_tasks{path.suffix}"), fmt))
        plt.close(fig)
    return written


def write_report(
    roots: list[str | Path],
    markdown: str | Path,
    plot: str | Path,
    include_limited: bool = False,
    fmt: str | None = None,
) -> dict:
    """Collect the runs under ``roots``; write the table and the two figures (``plot`` and
    ``<plot stem>_tasks``, see ``plot_score_vs_size``). Returns paths, counts, skipped and limited runs."""
    fmt = figure_format(plot, fmt)  # a bad format fails before anything is read or written
    points, skipped, limited = collect(roots, include_limited)
    table = results_table(points)
    if skipped:
        table += f"\nSkipped {len(skipped)} unreadable results.json.\n"
    if limited:
        table += f"\nLeft out {len(limited)} limited runs (debug, limit_*: --include-limited adds them).\n"
    markdown = Path(markdown)
    write_text_atomic(markdown, table)
    plots = plot_score_vs_size(points, plot, fmt)
    return {
        "markdown": str(markdown),
        "plots": [str(p) for p in plots],
        "points": len(points),
        "skipped": skipped,
        "limited": limited,
        "table": table,
    }


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xtc-report", description="Paper-style table and score-vs-size figures from run folders."
    )
    parser.add_argument("roots", nargs="+", help="run folders or folders holding them (searched recursively)")
    parser.add_argument("--out", default=None, help="markdown file (default: <first root>/report.md)")
    parser.add_argument(
        "--plot",
        default=None,
        help="figure file, its extension the format (default: next to --out, report.<format>); "
        "the per-task figure is written beside it as <name>_tasks.<format>",
    )
    parser.add_argument(
        "--format",
        default=None,
        choices=FIGURE_FORMATS,
        help="figure format (default: --plot's extension, else png)",
    )
    parser.add_argument(
        "--include-limited",
        action="store_true",
        help="also report limited runs (debug=..., trainer.limit_*: their scores cover part of dev)",
    )
    args = parser.parse_args(argv)
    first = Path(args.roots[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "report.md"
    plot = Path(args.plot) if args.plot else out.with_suffix(f".{args.format or 'png'}")
    result = write_report(args.roots, out, plot, args.include_limited, args.format)
    print(result["table"], end="")
    for line in result["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {result['markdown']} and {' and '.join(result['plots'])}")


if __name__ == "__main__":
    main()

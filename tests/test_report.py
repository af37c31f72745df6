"""The results report: table rows from synthetic run folders, and the score-vs-size plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xtc_lightning.errors import UserError
from xtc_lightning.report import collect, main, results_table, write_report

TEACHER_PARAMS = 22_713_986


def teacher_stage(task: str, score: float) -> dict:
    return {
        "score_best": score,
        "num_layers": 6,
        "params": {"total": TEACHER_PARAMS},
        "bits": {"weights": 32, "activations": 32},
        "model_dir": f"/cache/teachers/{task}-abc/model",
    }


def write_run(
    folder: Path,
    task: str,
    teacher: float,
    score: float | None = None,
    bits=(1, 8, "w1a8"),
    export=None,
    limited: bool = False,
    layers: int = 3,
) -> Path:
    """A results.json as pipeline.run writes it (only the keys the report reads, plus a few others)."""
    stages = {"teacher": teacher_stage(task, teacher)}
    if score is not None:
        w, a, name = bits
        stages["reduce"] = {"score_best": 0.5, "num_layers": 3, "params": {"total": 17_000_000}}
        stages["quantize"] = {
            "score_best": score,
            "num_layers": layers,
            "params": {"total": 17_400_000},
            "bits": {"weights": w, "activations": a, "name": name},
            # the quantized linears and embeddings at w bits, the rest (LayerNorm, biases, head) fp32
            "params_by_bits": {str(w): 16_000_000 * layers // 3, "32": 400_000}
            if w != 32
            else {"32": 16_400_000 * layers // 3},
        }
    results = {"task": task, "stages": stages, "final_stage": list(stages)[-1], "score": score or teacher}
    results["limited"] = limited
    if export is not None:
        results["export"] = {"size": {"file_bytes": export}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_run(root / "rte-l3-w1a8" / "lr1", "rte", 0.70, 0.62)
    write_run(root / "rte-l3-w1a8" / "lr2", "rte", 0.70, 0.64, export=2_956_000)
    mrpc = write_run(root / "mrpc-l3-w1a8", "mrpc", 0.85, 0.80)
    (mrpc / "export").mkdir()  # exported by xtc-export, not yet merged into results.json
    (mrpc / "export" / "export.json").write_text(json.dumps({"size": {"file_bytes": 2_950_000}}))
    write_run(root / "rte-l3-w2a8", "rte", 0.70, 0.63, bits=(2, 8, "w2a8"))
    write_run(root / "rte-teacher", "rte", 0.70)  # the same cached teacher: counted once
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{")  # a run still writing
    return root


def test_table_rows(sweep):
    points, skipped, _ = collect([sweep])
    assert len(points) == 6 and len(skipped) == 1 and "broken" in skipped[0]
    lines = results_table(points).splitlines()
    assert lines[:5] == [
        "| configuration | W/A bits | MRPC | RTE | avg | size (MB) | runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| teacher 6L | 32/32 | 85.0 | 70.0 | 77.5 | ~90.86 | 2 |",
        "| 3L w2a8 | 2/8 | - | 63.0 | 63.0* | ~5.60 | 1 |",
        "| 3L w1a8 | 1/8 | 80.0 | 64.0 | 72.0 | 2.96 | 3 |",
    ]
    assert "\\* average over the tasks this row has." in lines


def test_theoretical_size_when_nothing_is_exported(tmp_path):
    write_run(tmp_path / "a", "sst2", 0.9, 0.85)
    points, _, _ = collect([tmp_path])
    row = [line for line in results_table(points).splitlines() if line.startswith("| 3L w1a8")]
    assert row == ["| 3L w1a8 | 1/8 | 85.0 | 85.0 | ~3.60 | 1 |"]  # (16e6 x 1 + 4e5 x 32) / 8 bytes


def test_report_files_and_cli(sweep, capsys):
    result = write_report([sweep], sweep / "out" / "table.md", sweep / "out" / "plot.png")
    assert Path(result["markdown"]).read_text() == result["table"]
    assert "Skipped 1 unreadable results.json." in result["table"]
    assert result["plots"] == [str(sweep / "out" / "plot.png"), str(sweep / "out" / "plot_tasks.png")]
    png = (sweep / "out" / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    main([str(sweep)])
    captured = capsys.readouterr()
    assert "| 3L w1a8 | 1/8 | 80.0 | 64.0 | 72.0 | 2.96 | 3 |" in captured.out
    assert (sweep / "report.md").is_file() and (sweep / "report.png").is_file()
    assert "skipped" in captured.err and "broken" in captured.err
    assert not [p for p in (sweep / "out").iterdir() if p.name.startswith(".")]


def test_no_runs_is_one_error_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no readable results.json"):
        collect([tmp_path])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("missing: no such folder")


def test_limited_runs_are_left_out_unless_asked(tmp_path, capsys):
    write_run(tmp_path / "real", "rte", 0.70, 0.62)
    write_run(tmp_path / "debug" / "a", "rte", 0.70, 0.99, limited=True)  # a score over 64 dev rows
    points, _, limited = collect([tmp_path])
    assert [p.score for p in points if not p.teacher] == [0.62] and limited == [str(tmp_path / "debug" / "a")]
    points, _, limited = collect([tmp_path], include_limited=True)
    assert sorted(p.score for p in points if not p.teacher) == [0.62, 0.99] and limited == []
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 3L w1a8 | 1/8 | 62.0 |" in out
    assert "Left out 1 limited runs (debug, limit_*: --include-limited adds them)." in out
    main([str(tmp_path), "--include-limited"])
    assert "| 3L w1a8 | 1/8 | 99.0 |" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"\(1 limited runs left out: --include-limited adds them\)"):
        collect([tmp_path / "debug"])


CONFIGS = [(6, (8, 8, "w8a8")), (6, (2, 8, "w2a8")), (6, (1, 8, "w1a8")), (3, (32, 32, "fp32")),
           (3, (2, 8, "w2a8")), (3, (1, 8, "w1a8"))]  # fmt: skip


@pytest.fixture
def grid(tmp_path) -> Path:
    """5 tasks x 6 student configurations (+ teachers): ~35 points, as in the issue's report."""
    root = tmp_path / "grid"
    teachers = {"cola": 0.55, "sst2": 0.91, "mrpc": 0.86, "stsb": 0.87, "rte": 0.68}
    for t, (task, teacher) in enumerate(teachers.items()):
        for c, (layers, bits) in enumerate(CONFIGS):
            if task == "cola" and bits[2] == "w1a8" and layers == 3:
                continue  # one configuration lacks a task: its average is partial
            score = teacher * (1 - 0.02 * c) - 0.01 * t
            write_run(root / f"{task}-{layers}-{bits[2]}", task, teacher, score, bits=bits, layers=layers)
    return root


def test_figures_png_pdf_svg(grid, tmp_path):
    """Both figures in every format; the PNG is what the README shows (look at it when changing this)."""
    from xtc_lightning.report import plot_score_vs_size

    points, _, _ = collect([grid])
    assert len(points) == 5 + 29
    png, tasks_png = plot_score_vs_size(points, tmp_path / "fig" / "report.png")
    assert tasks_png == tmp_path / "fig" / "report_tasks.png"
    for path in (png, tasks_png):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pdf, tasks_pdf = plot_score_vs_size(points, tmp_path / "fig" / "report.pdf")
    assert pdf.read_bytes().startswith(b"%PDF") and tasks_pdf.name == "report_tasks.pdf"
    (svg, _) = plot_score_vs_size(points, tmp_path / "fig" / "figure", fmt="svg")
    assert svg.name == "figure.svg"
    text = svg.read_text()
    # vector, text kept as text: the legend names every configuration with its bit-widths
    assert text.lstrip().startswith("<?xml") and "<path" in text
    for label in ("teacher 6L (W32A32)", "6L w8a8 (W8A8)", "3L w1a8 (W1A8)", "average over fewer tasks"):
        assert label in text, label
    assert not [p for p in (tmp_path / "fig").iterdir() if p.name.startswith(".")]


def test_report_format_option_and_bad_format(grid, tmp_path, capsys):
    main([str(grid), "--out", str(tmp_path / "r.md"), "--format", "pdf"])
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF") and (tmp_path / "r_tasks.pdf").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([str(grid), "--plot", str(tmp_path / "r.jpg")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: figure format 'jpg' is not accepted; choose one of: png, pdf, svg"
    )

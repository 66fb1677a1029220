"""Figures and a human-readable report from a run directory's ``results.json``, and the
side-by-side comparison of a sweep's points.

``render_report(run_dir)`` only reads saved results, so ``jaxsens report RUN_DIR``
re-renders without recomputing anything; ``render_sweep_report(sweep_dir)`` likewise
compares the points of a ``jaxsens sweep`` from their ``results.json`` files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from matplotlib.figure import Figure

from .analyses import KINDS, summary_row
from .io import atomic_write_bytes, atomic_write_text, write_json
from .plotting import figure_png

__all__ = ["render_report", "summary_table", "render_sweep_report", "sweep_points",
           "write_sweep_manifest", "SweepPoint", "SWEEP_MANIFEST"]

SWEEP_MANIFEST = "sweep.json"
"""The file in a sweep directory that lists its points and their swept values."""


def _num(v, fmt="{:.4g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def summary_table(results: dict) -> str:
    """A compact terminal table: one block per run of analyses of the same kind, each
    under its kind's own column names (the noise analyses: site, ε, sampled, predicted,
    bound, accuracy at each analysis's headline level).

    Args:
      results: the contents of a run's ``results.json``.

    Returns:
      The table's lines joined with newlines; analyses of kinds this version does not
      know are left out.
    """
    out: list[str] = []
    previous = None
    for a in results.get("analyses", []):
        kind = KINDS.get(a["kind"])
        if kind is None:
            continue
        if kind.columns != previous:
            if out:
                out.append("")
            out.append(summary_row("analysis", *kind.columns))
            previous = kind.columns
        out += kind.summary(a)
    return "\n".join(out)


def render_report(run_dir: str | Path, *, figures: bool = True, report: bool = True) -> str:
    """Write figures and ``report.md`` for ``run_dir``; return the terminal summary.

    Reads only ``results.json``, so it re-renders a finished run without recomputing
    anything; an analysis of a kind this version does not know gets a placeholder section.

    Args:
      run_dir: a finished run directory (one holding ``results.json``).
      figures: write each analysis's figures under ``run_dir/figures``.
      report: write ``run_dir/report.md`` (atomically).

    Returns:
      The terminal summary, :func:`summary_table` of the results.

    Raises:
      ValueError: ``run_dir`` has no ``results.json``.
    """
    run_dir = Path(run_dir)
    res_file = run_dir / "results.json"
    if not res_file.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a finished jaxsens run (no results.json)")
    results = json.loads(res_file.read_text())
    clean = results.get("clean_test_accuracy")
    parts = [f"# {results.get('name', 'experiment')}", ""]
    if results.get("description"):
        parts += [results["description"].strip(), ""]
    d, m = results.get("data", {}), results.get("model", {})
    parts += [
        f"- data: {d.get('name')} ({d.get('n_train')} train / {d.get('n_test')} test, input "
        f"{tuple(d.get('input_shape', []))})",
        f"- model: {m.get('kind')} widths {m.get('widths')} activation {m.get('activation')}",
        f"- clean test accuracy: {_num(clean, '{:.4f}')}",
        f"- seed: {results.get('seed')}",
        "",
        "Three answers side by side: **sampled** (Monte Carlo mean of ‖ΔF‖ with its standard "
        "error), **predicted** (exact E‖Jη‖ of the linearized network) and **bound** "
        "(certified Lipschitz bound; for Gaussian laws a bound on the rms); for input noise "
        "also **moments** (analytic Gaussian-input moments, Bibi et al. 2018).",
        "",
    ]
    for a in results.get("analyses", []):
        kind = KINDS.get(a["kind"])
        if kind is None:  # written by a jaxsens that had this kind
            parts += [f"## {a['name']}", "", f"(kind {a['kind']!r} is unknown to this "
                      f"version of jaxsens: {len(a['records'])} records, not rendered)", ""]
            continue
        figs = kind.figures(run_dir, a) if figures else []
        parts.append(kind.markdown(a, figs))
    if report:
        atomic_write_text(run_dir / "report.md", "\n".join(parts))
    return summary_table(results)


# ------------------------------------------------------------------------ sweep comparison


class SweepPoint(NamedTuple):
    """One point of a sweep, as :func:`sweep_points` finds it.

    Attributes:
      name: the name of its run directory inside the sweep directory.
      run_dir: its run directory (which may not exist yet, or hold an unfinished run).
      values: the swept fields and their values as given to ``--grid``, e.g.
        ``{"model.activation": "relu"}``.
    """

    name: str
    run_dir: Path
    values: dict[str, str]


def write_sweep_manifest(sweep_dir: str | Path, points: Sequence[tuple[str, Mapping[str, str]]],
                         *, config: str | None = None, overrides: Sequence[str] = ()) -> None:
    """Write (or extend) ``sweep_dir/sweep.json``, the list of a sweep's points.

    A manifest already there keeps its points, in order; the new points follow and a
    point listed again gets its new values. The file (written atomically) is::

      {"config": "noise_propagation", "overrides": ["train.epochs=3"],
       "grid": {"model.activation": ["relu", "tanh"]},
       "points": [{"dir": "model.activation=relu", "values": {"model.activation": "relu"}},
                  {"dir": "model.activation=tanh", "values": {"model.activation": "tanh"}}]}

    ``grid`` lists every swept field with its values in order of first appearance.

    Args:
      sweep_dir: the sweep directory (the parent of the points' run directories).
      points: ``(directory name, {field: value})`` per point, values as given to ``--grid``.
      config: the config file or built-in experiment the sweep ran.
      overrides: the ``--set`` overrides applied to every point.

    Raises:
      ValueError: an existing ``sweep.json`` is not a sweep manifest.
    """
    sweep_dir = Path(sweep_dir)
    merged: dict[str, dict[str, str]] = {}
    if (sweep_dir / SWEEP_MANIFEST).exists():
        merged = {p.name: p.values for p in _read_manifest(sweep_dir)}
    for name, values in points:
        merged[name] = {str(k): str(v) for k, v in values.items()}
    grid: dict[str, list[str]] = {}
    for values in merged.values():
        for k, v in values.items():
            if v not in grid.setdefault(k, []):
                grid[k].append(v)
    write_json(sweep_dir / SWEEP_MANIFEST, {
        "config": config, "overrides": list(overrides), "grid": grid,
        "points": [{"dir": name, "values": values} for name, values in merged.items()],
    })


def _read_manifest(sweep_dir: Path) -> list[SweepPoint]:
    path = sweep_dir / SWEEP_MANIFEST
    bad = f"{str(path)!r} is not a jaxsens sweep manifest"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = (str(err).splitlines() or [""])[0]
        raise ValueError(f"{bad} ({type(err).__name__}: {detail})") from None
    entries = manifest.get("points") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{bad} (no list of points)")
    out = []
    for e in entries:
        name = e.get("dir") if isinstance(e, dict) else None
        values = e.get("values") if isinstance(e, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or \
                not isinstance(values, dict):
            raise ValueError(f"{bad} (a point without a directory name or values: {e!r})")
        out.append(SweepPoint(name, sweep_dir / name, {str(k): str(v)
                                                        for k, v in values.items()}))
    return out


def _values_from_name(name: str) -> dict[str, str]:
    """``"a.b=1__c=x"`` → ``{"a.b": "1", "c": "x"}`` (how ``jaxsens sweep`` names points)."""
    parts = [p.split("=", 1) for p in name.split("__")]
    if all(len(p) == 2 and p[0] for p in parts):
        return {k: v for k, v in parts}
    return {"point": name}


def sweep_points(sweep_dir: str | Path) -> list[SweepPoint]:
    """The points of a sweep directory written by ``jaxsens sweep``.

    They come from its ``sweep.json`` (:func:`write_sweep_manifest`), in sweep order, so a
    point that failed or never ran is still listed. Without a manifest (a sweep of an
    older jaxsens) every subdirectory holding a run (``config.yaml`` or ``results.json``)
    is a point, its swept values read from its name (``key=value__key=value``).

    Args:
      sweep_dir: the sweep directory.

    Returns:
      One :class:`SweepPoint` per point.

    Raises:
      ValueError: ``sweep_dir`` is not a sweep directory (no ``sweep.json`` and no run
        directories in it), or its ``sweep.json`` is not a sweep manifest.
    """
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SWEEP_MANIFEST).is_file():
        return _read_manifest(sweep_dir)
    runs = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and (
        (d / "results.json").is_file() or (d / "config.yaml").is_file())
    ) if sweep_dir.is_dir() else []
    if not runs:
        raise ValueError(f"{str(sweep_dir)!r} is not a jaxsens sweep directory (no "
                         f"{SWEEP_MANIFEST} and no run directories in it)")
    return [SweepPoint(d.name, d, _values_from_name(d.name)) for d in runs]


def _summary_layout() -> tuple[int, list[int]]:
    """Where :func:`summary_row` puts its cells: the first cell's start and every width.

    Read off the function itself: the first cell is left-aligned and cut to its width, the
    others are right-aligned, each after one space (a longer one pushes the rest right).
    """
    probe = summary_row("", "#" * 200, *(["#"] * 32))
    start = end = probe.index("#")
    while end < len(probe) and probe[end] == "#":
        end += 1
    widths = [end - start]
    for i in range(end, len(probe)):
        if probe[i] == "#":
            widths.append(i - end)
            end = i + 1
    return start, widths


_LAYOUT = _summary_layout()


def _summary_cells(line: str) -> list[str]:
    """The cells of one :func:`summary_row` line (the analysis name left out)."""
    start, widths = _LAYOUT
    cells = [line[start:start + widths[0]].strip()]
    end = start + widths[0]
    for width in widths[1:]:
        if end >= len(line):
            break
        stop = end + 1 + width
        while stop < len(line) and line[stop] != " ":
            stop += 1
        cells.append(line[end + 1:stop].strip())
        end = stop
    return cells


class _Column(NamedTuple):
    """One comparison column: an analysis's summary row (its key and level) across points."""

    analysis: str
    key: str
    level_name: str
    level: str
    quantities: tuple[str, ...]

    @property
    def header(self) -> str:
        level = f" {self.level_name}={self.level}" if self.level_name and self.level else ""
        return f"{self.analysis}: {self.key}{level} — {' / '.join(self.quantities)}"


def _headlines(results: dict) -> dict[_Column, list[str]]:
    """Each known analysis's summary rows (its headline numbers) by column."""
    out: dict[_Column, list[str]] = {}
    for a in results.get("analyses", []):
        kind = KINDS.get(a.get("kind"))
        if kind is None:
            continue
        columns = kind.columns[:len(_LAYOUT[1])]
        for line in kind.summary(a):
            cells = _summary_cells(line)
            cells += [""] * (len(columns) - len(cells))
            col = _Column(a["name"], cells[0], columns[1] if len(columns) > 1 else "",
                          cells[1] if len(cells) > 1 else "", tuple(columns[2:]))
            out[col] = cells[2:len(columns)]
    return out


class _Row(NamedTuple):
    point: SweepPoint
    status: str
    results: dict | None


def _load_point(point: SweepPoint) -> _Row:
    res_file = point.run_dir / "results.json"
    if not point.run_dir.is_dir():
        return _Row(point, "missing: not run", None)
    if not res_file.is_file():
        return _Row(point, "missing: unfinished or failed (no results.json)", None)
    try:
        results = json.loads(res_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return _Row(point, "missing: unreadable results.json", None)
    if not isinstance(results, dict):
        return _Row(point, "missing: unreadable results.json", None)
    return _Row(point, "ok", results)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


_QUANTITY = {  # what a summary column measures, for the comparison figure's axes
    "sampled": "sampled E‖F(x+η) − F(x)‖",
    "SRE mean": "squared relative error of the mean",
    "total var": "total output variance",
    "success": "attack success rate",
    "‖W‖_F": "Frobenius norm ‖W‖_F",
}


def _comparison_figure(rows: list[_Row], keys: list[str],
                       cells: list[dict[_Column, list[str]]], columns: list[_Column]) -> Figure:
    """Each analysis's first headline quantity (and the clean accuracy) vs the first swept
    field; one line per summary row (site) and combination of the other swept fields."""
    xkey = keys[0] if keys else "point"
    raw = [r.point.values.get(xkey, r.point.name) if keys else r.point.name for r in rows]
    numeric = all(not math.isnan(_float(v)) for v in raw)
    categories = list(dict.fromkeys(raw))
    xs = [_float(v) if numeric else float(categories.index(v)) for v in raw]
    others = [", ".join(f"{k}={r.point.values.get(k, '–')}" for k in keys[1:]) for r in rows]
    analyses = list(dict.fromkeys(c.analysis for c in columns
                                  if any(not math.isnan(_float(p.get(c, [""])[0]))
                                         for p in cells)))
    fig = Figure(figsize=(7.6, 2.9 * (1 + len(analyses))), layout="constrained")
    axes = fig.subplots(1 + len(analyses), 1, squeeze=False)[:, 0]

    def draw(ax, label: str, ys: list[float]) -> None:
        for combo in dict.fromkeys(others):
            pts = sorted((x, y) for x, y, o in zip(xs, ys, others, strict=True) if o == combo)
            name = f"{label}, {combo}" if combo else label
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)

    def finish(ax, ylabel: str, title: str) -> None:
        if numeric:
            pos = [x for x in xs if x > 0]
            if len(pos) == len(xs) and max(pos) / min(pos) >= 10:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(categories)), categories, rotation=20)
        ax.set_xlabel(xkey)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7)

    acc = [math.nan if r.results is None or r.results.get("clean_test_accuracy") is None
           else float(r.results["clean_test_accuracy"]) for r in rows]
    draw(axes[0], "clean", acc)
    finish(axes[0], "clean test accuracy", f"clean test accuracy vs {xkey}")
    for ax, name in zip(axes[1:], analyses, strict=True):
        mine = [c for c in columns if c.analysis == name]
        for c in mine:
            level = f" ({c.level_name}={c.level})" if c.level_name and c.level else ""
            draw(ax, f"{c.key}{level}", [_float(p.get(c, [""])[0]) for p in cells])
        quantity = mine[0].quantities[0] if mine[0].quantities else "value"
        finish(ax, _QUANTITY.get(quantity, quantity), f"{name}: {quantity} vs {xkey}")
    return fig


def _gap(results: dict | None) -> float | None:
    """The last epoch's training accuracy minus the clean test accuracy (None if unknown)."""
    if results is None:
        return None
    train = (results.get("final_train") or {}).get("train_accuracy")
    test = results.get("clean_test_accuracy")
    if train is None or test is None:
        return None
    return float(train) - float(test)


def render_sweep_report(sweep_dir: str | Path, *, figure: bool = True) -> str:
    """Compare the points of a sweep side by side: ``comparison.md`` and ``comparison.png``.

    One table row per point (:func:`sweep_points`): its swept values, its status, the
    clean test accuracy, the generalization gap (last-epoch training accuracy minus test
    accuracy) and, per analysis and summary row (a site, an example ...), the
    headline numbers of that analysis's kind as its terminal summary shows them (the noise
    analyses: sampled / predicted / bound / accuracy at each analysis's headline level). A
    point that
    failed, is unfinished or never ran is listed as missing, with dashes. The figure plots
    each analysis's first headline quantity and the clean accuracy against the first swept
    field, one line per site (and combination of the other swept fields). Reads only the
    points' ``results.json`` files; every file is written atomically.

    Args:
      sweep_dir: a sweep directory (from ``jaxsens sweep``).
      figure: also write ``comparison.png`` (when at least one point has finished).

    Returns:
      The comparison table (markdown).

    Raises:
      ValueError: ``sweep_dir`` is not a sweep directory or its ``sweep.json`` is not a
        sweep manifest (see :func:`sweep_points`).
    """
    sweep_dir = Path(sweep_dir)
    rows = [_load_point(p) for p in sweep_points(sweep_dir)]
    keys = list(dict.fromkeys(k for r in rows for k in r.point.values))
    cells = [_headlines(r.results) if r.results is not None else {} for r in rows]
    columns = list(dict.fromkeys(c for p in cells for c in p))
    header = [*keys, "status", "clean test accuracy", "train − test",
              *(c.header for c in columns)]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    for row, found in zip(rows, cells, strict=True):
        acc = None if row.results is None else row.results.get("clean_test_accuracy")
        values = [row.point.values.get(k, "–") for k in keys]
        numbers = [" / ".join(found[c]) if c in found else "–" for c in columns]
        lines.append("| " + " | ".join(_cell(v) for v in
                                       [*values, row.status, _num(acc, "{:.4f}"),
                                        _num(_gap(row.results), "{:+.4f}"), *numbers])
                     + " |")
    table = "\n".join(lines)
    done = [r for r in rows if r.results is not None]
    name = next((r.results.get("name") for r in done if r.results), None) or sweep_dir.name
    missing = len(rows) - len(done)
    parts = [
        f"# Sweep comparison: {name}", "",
        f"{len(rows)} points under `{sweep_dir}`, swept over {', '.join(keys) or '–'}"
        + (f"; {missing} missing (failed, unfinished or not run)" if missing else "") + ".",
        "Each analysis column holds the headline numbers of its kind, as in the point's "
        "terminal summary (noise analyses: sampled E‖ΔF‖ / predicted / bound / accuracy "
        "under noise, at the level named in the column). *train − test* is the "
        "generalization gap: the last epoch's training accuracy (averaged over its steps, "
        "clean inputs) minus the clean test accuracy.", "", table, "",
    ]
    if figure and done:
        fig = _comparison_figure(rows, keys, cells, columns)
        atomic_write_bytes(sweep_dir / "comparison.png", figure_png(fig))
        parts += ["![comparison](comparison.png)", ""]
    parts += ["Point reports: " + ", ".join(f"[{r.point.name}]({r.point.name}/report.md)"
                                            for r in done), ""] if done else []
    atomic_write_text(sweep_dir / "comparison.md", "\n".join(parts))
    return table

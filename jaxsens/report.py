"""Figures and a human-readable report from a run directory's ``results.json``.

``render_report(run_dir)`` only reads saved results, so ``jaxsens report RUN_DIR``
re-renders without recomputing anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .analyses import KINDS, summary_row
from .io import atomic_write_text

__all__ = ["render_report", "summary_table"]


def _num(v, fmt="{:.4g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def summary_table(results: dict) -> str:
    """A compact terminal table: one block per run of analyses of the same kind, each
    under its kind's own column names (the noise analyses: site, ε, sampled, predicted,
    bound, accuracy at the level nearest 5%).

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

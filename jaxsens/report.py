"""Figures and a human-readable report from a run directory's ``results.json``.

``render_report(run_dir)`` only reads saved results, so ``jaxsens report RUN_DIR``
re-renders without recomputing anything.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

from .io import atomic_write_bytes, atomic_write_text

__all__ = ["render_report", "summary_table"]


def _num(v, fmt="{:.4g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _by(records, *keys):
    out = defaultdict(list)
    for r in records:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _rows(records):
    """{(site, level): {estimator: record}} preserving site order."""
    table: dict = {}
    for r in records:
        table.setdefault((r["site"], r["level"]), {})[r["estimator"]] = r
    return table


def _sites(records):
    seen = []
    for r in records:
        if r["site"] not in seen:
            seen.append(r["site"])
    return seen


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figures(run_dir: Path, analysis: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = analysis["records"]
    sites = _sites(recs)
    table = _rows(recs)
    levels = sorted({r["level"] for r in recs})
    name = analysis["name"]
    made = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, s in enumerate(sites):
        c = colors[i % len(colors)]
        lv = [lv for lv in levels if (s, lv) in table]
        smp = [table[(s, lv)].get("sampled") for lv in lv]
        if all(smp):
            ax.plot(lv, [r["mean"] for r in smp], "o-", color=c, label=f"{s} sampled")
            if all("q05" in r and "q95" in r for r in smp):
                ax.fill_between(lv, [r["q05"] for r in smp], [r["q95"] for r in smp],
                                color=c, alpha=0.15, linewidth=0)
        lin = [table[(s, lv)].get("linearized") for lv in lv]
        if all(lin):
            ax.plot(lv, [r["mean"] for r in lin], "--", color=c, label=f"{s} predicted")
        bnd = [table[(s, lv)].get("bound") for lv in lv]
        if all(bnd):
            ax.plot(lv, [r["upper"] for r in bnd], ":", color=c, alpha=0.7, label=f"{s} bound")
    if any(lv > 0 for lv in levels):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("noise level ε")
    ax.set_ylabel("E‖F(x+η) − F(x)‖ (band: 5–95% of draws)")
    ax.set_title(f"{name}: output deviation vs noise level")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    path = run_dir / "figures" / f"{name}_deviation.png"
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)
    made.append(path.name)

    factors = []
    for s in sites:
        lin = [r for r in recs if r["site"] == s and r["estimator"] == "linearized"]
        if lin and lin[0].get("factor") is not None:
            factors.append((s, lin[0]["factor"]))
    if factors:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.bar([s for s, _ in factors], [f for _, f in factors], color=colors[0])
        ax.set_ylabel("‖h‖·‖J‖_F/√n")
        ax.set_title(f"{name}: per-site sensitivity factor (rms deviation per unit ε)")
        ax.tick_params(axis="x", rotation=30)
        path = run_dir / "figures" / f"{name}_factor.png"
        atomic_write_bytes(path, _figure_bytes(fig))
        plt.close(fig)
        made.append(path.name)

    acc = [(s, [(lv, table[(s, lv)]["sampled"].get("accuracy")) for lv in levels
                if (s, lv) in table and "sampled" in table[(s, lv)]]) for s in sites]
    if any(v is not None for _, pts in acc for _, v in pts):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (s, pts) in enumerate(acc):
            pts = [(lv, v) for lv, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                        color=colors[i % len(colors)], label=s)
        ax.set_xlabel("noise level ε")
        ax.set_ylabel("accuracy under noise")
        ax.set_title(f"{name}: accuracy vs noise level")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = run_dir / "figures" / f"{name}_accuracy.png"
        atomic_write_bytes(path, _figure_bytes(fig))
        plt.close(fig)
        made.append(path.name)
    return made


_SRE_COLUMNS = [
    ("sre_mean", "mean (two-stage)"),
    ("sre_mean_layerwise", "mean (layerwise)"),
    ("sre_var", "variance (exact, general mean)"),
    ("sre_var_layerwise", "variance (layerwise)"),
    ("sre_var_zero_mean", "variance (zero-mean formula)"),
]


def _tightness_figure(run_dir: Path, analysis: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(analysis["records"], key=lambda r: r["level"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in _SRE_COLUMNS:
        vals = [r.get(key) for r in recs]
        if all(v is not None for v in vals):
            ax.plot([r["level"] for r in recs], vals, "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input noise σ")
    ax.set_ylabel("symmetric relative error vs Monte Carlo")
    ax.set_title(f"{analysis['name']}: analytic moments vs Monte Carlo")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path = run_dir / "figures" / f"{analysis['name']}_tightness.png"
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)
    return [path.name]


def _tightness_markdown(analysis: dict, figures: list[str]) -> str:
    recs = sorted(analysis["records"], key=lambda r: r["level"])
    cols = [(k, lab) for k, lab in _SRE_COLUMNS if all(k in r for r in recs)]
    lines = [f"## {analysis['name']} (analytic Gaussian-input moments vs Monte Carlo)", "",
             "Symmetric relative error 2|a−b|/(|a|+|b|) per logit, averaged over examples and "
             f"logits ({recs[0]['num_samples'] if recs else 0} Monte Carlo draws per example). "
             "The zero-mean (CVPR 2018) variance formula applied at the actual, non-zero mean "
             "is kept only to show how far off it is.", "",
             "| σ | " + " | ".join(lab for _, lab in cols) + " | MC/analytic mean | "
             "MC/analytic variance |",
             "|---|" + "---|" * (len(cols) + 2)]
    for r in recs:
        lines.append(f"| {r['level']:g} | " + " | ".join(_num(r[k], "{:.3g}") for k, _ in cols)
                     + f" | {_num(r.get('ratio_mean'), '{:.4f}')} | "
                     f"{_num(r.get('ratio_var'), '{:.4f}')} |")
    lines += ["", *[f"![{f}](figures/{f})" for f in figures], ""]
    return "\n".join(lines)


def _picture(flat, shape):
    import numpy as np

    arr = np.asarray(flat, dtype=np.float64).reshape(shape)
    if arr.ndim == 3:
        arr = arr.sum(-1)
    if arr.ndim == 1:
        side = int(round(len(arr) ** 0.5))
        if side * side == len(arr):
            arr = arr.reshape(side, side)
    return arr


def _map_figure(run_dir: Path, analysis: dict) -> list[str]:
    from matplotlib.figure import Figure

    from .moments import sensitivity_map_figure

    recs = analysis["records"][:8]
    if not recs:
        return []
    cols = min(4, len(recs))
    rows = -(-len(recs) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows))
    for i, r in enumerate(recs):
        ax = fig.add_subplot(rows, cols, i + 1)
        smap = _picture(r["map"], r["map_shape"])
        image = _picture(r["image"], r["input_shape"])
        sensitivity_map_figure(smap, ax, image=image if image.ndim == 2 else None,
                               title=f"example {r['example']}, σ={r['level']:g}")
    path = run_dir / "figures" / f"{analysis['name']}_maps.png"
    atomic_write_bytes(path, _figure_bytes(fig))
    return [path.name]


def _map_markdown(analysis: dict, figures: list[str]) -> str:
    lines = [f"## {analysis['name']} (pixel-level noise-sensitivity maps)", "",
             "Each map entry is tr Cov F when Gaussian noise of standard deviation σ enters only "
             "that pixel (or block), from the exact moments of the two-stage linearized network "
             "(Bibi et al. 2018). The top-10% column says how concentrated the sensitivity is.",
             "", "| example | σ | total variance | share of the top 10% of pixels |",
             "|---|---|---|---|"]
    for r in analysis["records"]:
        lines.append(f"| {r['example']} | {r['level']:g} | {_num(r['total'])} | "
                     f"{_num(r.get('top10_fraction'), '{:.2f}')} |")
    lines += ["", *[f"![{f}](figures/{f})" for f in figures], ""]
    return "\n".join(lines)


def _attack_figure(run_dir: Path, analysis: dict) -> list[str]:
    from matplotlib.figure import Figure

    recs = analysis["records"]
    if not recs:
        return []
    made = []
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    pm = [r["predicted_margin"] for r in recs]
    mc = [r["mc_margin"] for r in recs]
    err = [2 * r["mc_margin_stderr"] for r in recs]
    ax.errorbar(pm, mc, yerr=err, fmt="o")
    lo, hi = min(pm + mc), max(pm + mc)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("predicted expected margin (analytic moments)")
    ax.set_ylabel("Monte Carlo margin on the true network (±2 se)")
    ax.set_title(f"{analysis['name']}: prediction vs true network")
    path = run_dir / "figures" / f"{analysis['name']}_margins.png"
    atomic_write_bytes(path, _figure_bytes(fig))
    made.append(path.name)
    shown = [r for r in recs if _picture(r["std"], r["input_shape"]).ndim == 2][:4]
    if shown:
        fig = Figure(figsize=(6.0, 2.8 * len(shown)))
        for i, r in enumerate(shown):
            for j, (key, label) in enumerate((("mean_shift", "mean shift δ"),
                                              ("std", "noise std s"))):
                ax = fig.add_subplot(len(shown), 2, 2 * i + j + 1)
                im = ax.imshow(_picture(r[key], r["input_shape"]),
                               cmap="coolwarm" if key == "mean_shift" else "viridis")
                fig.colorbar(im, ax=ax)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"example {r['example']}: {label}")
        path = run_dir / "figures" / f"{analysis['name']}_distributions.png"
        atomic_write_bytes(path, _figure_bytes(fig))
        made.append(path.name)
    return made


def _attack_markdown(analysis: dict, figures: list[str]) -> str:
    recs = analysis["records"]
    target = recs[0]["target"] if recs else None
    kind = "untargeted" if target is None else f"targeted at class {target}"
    lines = [f"## {analysis['name']} (Gaussian noise attack, {kind})", "",
             "The attack optimizes the mean shift and per-pixel standard deviation of a Gaussian "
             "input distribution, within E‖x − x_clean‖² ≤ budget², through the differentiable "
             "analytic moments; each result is then checked by Monte Carlo on the true network "
             "and compared with isotropic noise of the same budget.", "",
             "| example | label | budget | predicted margin | MC margin ± se | success rate ± se "
             "| isotropic baseline success |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(
            f"| {r['example']} | {r['label']} | {r['level']:g} | {_num(r['predicted_margin'])} | "
            f"{_num(r['mc_margin'])} ± {_num(r['mc_margin_stderr'], '{:.2g}')} | "
            f"{_num(r['success_rate'], '{:.3f}')} ± {_num(r['success_stderr'], '{:.2g}')} | "
            f"{_num(r['baseline_success_rate'], '{:.3f}')} |")
    if recs:
        mean_s = sum(r["success_rate"] for r in recs) / len(recs)
        mean_b = sum(r["baseline_success_rate"] for r in recs) / len(recs)
        lines += ["", f"Mean success rate {mean_s:.3f} with the optimized distribution vs "
                  f"{mean_b:.3f} with isotropic noise of the same budget."]
    lines += ["", *[f"![{f}](figures/{f})" for f in figures], ""]
    return "\n".join(lines)


def _analysis_markdown(analysis: dict, clean_acc: float | None, figures: list[str]) -> str:
    recs = analysis["records"]
    table = _rows(recs)
    sites = _sites(recs)
    levels = sorted({r["level"] for r in recs})
    law = recs[0]["law"].rsplit(" ", 1)[0] if recs else ""
    lines = [f"## {analysis['name']} ({analysis['kind']}, {law})", ""]
    has_mom = any(r["estimator"] == "moments" for r in recs)
    lines += [
        "| site | ε | sampled E‖ΔF‖ ± se | predicted | sampled/predicted | bound | "
        "bound/sampled | accuracy | flip rate |" + (" moments (analytic) |" if has_mom else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if has_mom else ""),
    ]
    for s in sites:
        for lv in levels:
            row = table.get((s, lv))
            if not row:
                continue
            smp, lin, bnd = row.get("sampled"), row.get("linearized"), row.get("bound")
            ratio = (smp["mean"] / lin["mean"]) if smp and lin and lin["mean"] else None
            loose = (bnd["upper"] / smp["mean"]) if smp and bnd and smp["mean"] else None
            lines.append(
                f"| {s} | {lv:g} | "
                f"{_num(smp and smp['mean'])} ± {_num(smp and smp['stderr'], '{:.2g}')} | "
                f"{_num(lin and lin['mean'])} | {_num(ratio, '{:.3f}')} | "
                f"{_num(bnd and bnd['upper'])} | {_num(loose, '{:.1f}')}× | "
                f"{_num(smp and smp.get('accuracy'), '{:.3f}')} | "
                f"{_num(smp and smp.get('flip_rate'), '{:.3f}')} |"
                + (f" {_num(row['moments']['mean'])} |" if has_mom and "moments" in row
                   else (" – |" if has_mom else ""))
            )
    lines.append("")
    factors = {}
    for s in sites:
        lin = [r for r in recs if r["site"] == s and r["estimator"] == "linearized"]
        if lin and lin[0].get("factor") is not None:
            factors[s] = lin[0]["factor"]
    if len(factors) > 1:
        lo = min(factors, key=factors.get)
        hi = max(factors, key=factors.get)
        lines += [
            "**Which sites are resistant, and why.** To first order the mean-square output "
            "change is ε² · factor², with factor = ‖h‖·‖J‖_F/√n: the site's root-mean-square "
            "value times the Frobenius norm of the Jacobian from the site to the output. "
            f"Here the most resistant site is **{lo}** (factor {factors[lo]:.4g}) and the "
            f"most sensitive is **{hi}** (factor {factors[hi]:.4g}), a ratio of "
            f"{factors[hi] / factors[lo]:.3g}.",
            "",
            "| site | factor |",
            "|---|---|",
            *[f"| {s} | {f:.4g} |" for s, f in factors.items()],
            "",
        ]
    mid = [lv for lv in levels if any((s, lv) in table for s in sites)]
    if mid and clean_acc is not None:
        lv = min(mid, key=lambda v: abs(v - 0.05))
        accs = {s: table[(s, lv)]["sampled"].get("accuracy") for s in sites
                if (s, lv) in table and "sampled" in table[(s, lv)]}
        accs = {s: a for s, a in accs.items() if a is not None}
        if accs:
            n = analysis.get("num_examples")
            listed = ", ".join(f"{s} {a:.3f}" for s, a in accs.items())
            lines += [f"Accuracy on the {n} analysed test examples: clean {clean_acc:.3f}; with "
                      f"noise at ε = {lv:g} entering each site: {listed}.", ""]
    lines += [f"![{f}](figures/{f})" for f in figures]
    lines.append("")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """A compact terminal table: one line per (analysis, site) at the level nearest 5%."""
    out = [f"{'analysis':<18} {'site':<18} {'ε':>6} {'sampled':>10} {'predicted':>10} "
           f"{'bound':>10} {'accuracy':>9}"]
    for a in results.get("analyses", []):
        if a["kind"] == "sensitivity_map":
            for r in a["records"]:
                out.append(f"{a['name']:<18.18} {'map ex ' + str(r['example']):<18} "
                           f"{r['level']:>6g} {'total var':>10} {_num(r['total']):>10}")
            continue
        if a["kind"] == "gaussian_attack":
            for r in a["records"]:
                out.append(f"{a['name']:<18.18} {'attack ex ' + str(r['example']):<18} "
                           f"{r['level']:>6g} {'success':>10} "
                           f"{_num(r['success_rate'], '{:.3f}'):>10} {'baseline':>10} "
                           f"{_num(r['baseline_success_rate'], '{:.3f}'):>9}")
            continue
        if a["kind"] == "moments_tightness":
            for r in sorted(a["records"], key=lambda r: r["level"]):
                out.append(f"{a['name']:<18.18} {'input (SRE)':<18} {r['level']:>6g} "
                           f"{'mean':>10} {_num(r.get('sre_mean'), '{:.3g}'):>10} "
                           f"{'var':>10} {_num(r.get('sre_var'), '{:.3g}'):>9}")
            continue
        table = _rows(a["records"])
        levels = sorted({r["level"] for r in a["records"]})
        if not levels:
            continue
        lv = min(levels, key=lambda v: abs(v - 0.05))
        for s in _sites(a["records"]):
            row = table.get((s, lv), {})
            smp, lin, bnd = row.get("sampled"), row.get("linearized"), row.get("bound")
            out.append(
                f"{a['name']:<18.18} {s:<18.18} {lv:>6g} {_num(smp and smp['mean']):>10} "
                f"{_num(lin and lin['mean']):>10} {_num(bnd and bnd['upper']):>10} "
                f"{_num(smp and smp.get('accuracy'), '{:.3f}'):>9}"
            )
    return "\n".join(out)


def render_report(run_dir: str | Path, *, figures: bool = True, report: bool = True) -> str:
    """Write figures and ``report.md`` for ``run_dir``; return the terminal summary."""
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
        if a["kind"] == "moments_tightness":
            figs = _tightness_figure(run_dir, a) if figures else []
            parts.append(_tightness_markdown(a, figs))
            continue
        if a["kind"] == "sensitivity_map":
            figs = _map_figure(run_dir, a) if figures else []
            parts.append(_map_markdown(a, figs))
            continue
        if a["kind"] == "gaussian_attack":
            figs = _attack_figure(run_dir, a) if figures else []
            parts.append(_attack_markdown(a, figs))
            continue
        figs = _figures(run_dir, a) if figures else []
        parts.append(_analysis_markdown(a, a.get("clean_accuracy"), figs))
    if report:
        atomic_write_text(run_dir / "report.md", "\n".join(parts))
    return summary_table(results)

"""Every figure of every analysis kind is readable: nothing written over anything else.

Small analyses of every kind run once (on a tiny MLP over 8×8 "images"); each kind's
``figures`` is called as the report calls it, and every figure it saves is drawn at its
own size and checked with matplotlib's text extents:

* no two texts overlap (tick labels of one axis, titles, axis labels, colorbar labels,
  offset texts, figure titles and labels), across the whole figure;
* no text of one panel lies on another panel's data area (a colorbar label reaching into
  the next panel, an offset text over a title);
* no legend covers a data area, a text or another legend (legends sit outside the data);
* no two panels (colorbars included) overlap.

``test_the_checker_finds_overlaps`` shows that the checker can fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text

import jaxsens as js
from jaxsens import analyses
from jaxsens.analyses import _report
from jaxsens.config import parse_config
from jaxsens.io import clean_json

# ---------------------------------------------------------------------------------------
# The checker


def _visible_tick_labels(axis) -> list[Text]:
    """The tick labels matplotlib draws: visible, non-empty, at ticks inside the view."""
    lo, hi = sorted(axis.get_transform().transform(np.asarray(axis.get_view_interval())))
    tol = 1e-6 * max(abs(hi - lo), 1e-12)
    out = []
    for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks),
                        (axis.get_minorticklocs(), axis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs)), strict=False):
            t = axis.get_transform().transform(np.asarray([loc]))[0]
            if not (lo - tol <= t <= hi + tol) or not tick.get_visible():
                continue
            out += [lab for lab in (tick.label1, tick.label2)
                    if lab.get_visible() and lab.get_text().strip()]
    return out


def _axes_name(ax) -> str:
    return ax.get_title() or ax.get_label() or f"axes@{tuple(np.round(ax.get_position().p0, 2))}"


def _texts(fig: Figure) -> list[tuple[Any, str, Text]]:
    """``(owner axes or None, description, Text)`` of every drawn text outside legends."""
    found: list[tuple[Any, str, Text]] = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        name = _axes_name(ax)
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            found += [(ax, f"{which} tick {t.get_text()!r} of {name!r}", t)
                      for t in _visible_tick_labels(axis)]
            found += [(ax, f"{which} {what} of {name!r}", t)
                      for what, t in (("label", axis.label), ("offset text", axis.offsetText))]
        found += [(ax, f"title/text {t.get_text()!r} of {name!r}", t)
                  for t in ax.get_children() if isinstance(t, Text)]
    found += [(None, f"figure text {t.get_text()!r}", t) for t in fig.texts]
    for attr in ("_suptitle", "_supxlabel", "_supylabel"):
        t = getattr(fig, attr, None)
        if t is not None:
            found.append((None, f"figure title/label {t.get_text()!r}", t))
    unique = {id(t): (o, d, t) for o, d, t in found}  # the suptitle is also in fig.texts
    return [(o, d, t) for o, d, t in unique.values() if t.get_visible() and t.get_text().strip()]


def _legends(fig: Figure) -> list[tuple[Any, str, Any]]:
    out = [(ax, f"legend of {_axes_name(ax)!r}", ax.get_legend()) for ax in fig.axes
           if ax.get_legend() is not None]
    out += [(None, "figure legend", leg) for leg in fig.legends]
    return [(o, d, leg) for o, d, leg in out if leg.get_visible()]


def _hit(a, b, pad: float = 1.0) -> bool:
    """Whether two display boxes share more than a ``pad``-pixel sliver."""
    return a.width > 0 and a.height > 0 and b.width > 0 and b.height > 0 and \
        a.padded(-pad).overlaps(b.padded(-pad))


def overlaps(fig: Figure) -> list[str]:
    """Every collision in ``fig`` drawn at its own size, as readable strings."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [(o, d, t.get_window_extent(renderer)) for o, d, t in _texts(fig)]
    legends = [(o, d, leg.get_window_extent(renderer)) for o, d, leg in _legends(fig)]
    areas = [(ax, _axes_name(ax), ax.get_window_extent(renderer)) for ax in fig.axes
             if ax.get_visible()]
    found = []
    for i, (_, d1, b1) in enumerate(texts):
        for _, d2, b2 in texts[i + 1:]:
            if _hit(b1, b2):
                found.append(f"text overlap: {d1} / {d2}")
    for owner, d, b in texts:
        for ax, name, area in areas:
            own = owner is not None and (ax is owner or np.allclose(area.bounds,
                                                                    owner.bbox.bounds))
            if not own and _hit(b, area):
                found.append(f"text on another panel: {d} / data area of {name!r}")
    for i, (_, name1, a1) in enumerate(areas):
        for _, name2, a2 in areas[i + 1:]:
            if _hit(a1, a2) and not np.allclose(a1.bounds, a2.bounds):
                found.append(f"panels overlap: {name1!r} / {name2!r}")
    for i, (_, d, b) in enumerate(legends):
        for _, name, area in areas:
            if _hit(b, area):
                found.append(f"legend on data: {d} / data area of {name!r}")
        for _, d2, b2 in texts:
            if _hit(b, b2):
                found.append(f"legend on text: {d} / {d2}")
        for _, d2, b2 in legends[i + 1:]:
            if _hit(b, b2):
                found.append(f"legend on legend: {d} / {d2}")
    return found


def test_the_checker_finds_overlaps():
    """Figures built to collide: crowded ticks, a legend on the data, a colorbar label
    reaching into the next panel, a title under the panel above, overlapping panels."""
    fig = Figure(figsize=(6.0, 3.0))
    ax1, ax2 = fig.subplots(1, 2)
    fig.subplots_adjust(wspace=0.02, left=0.1, right=0.95, top=0.8)
    ax1.plot([0, 1], [0, 1], label="a line")
    ax1.set_xticks([0.0, 0.05], ["a long tick label", "another long one"])
    ax1.legend(loc="center")
    im = ax2.imshow(np.arange(9.0).reshape(3, 3) * 1e-4)
    fig.colorbar(im, ax=ax1, label="a colorbar label that is long")
    ax2.set_title("title")
    found = overlaps(fig)
    assert any(f.startswith("text overlap: x tick 'a long tick label'") for f in found), found
    assert any(f.startswith("legend on data: legend of") for f in found), found
    assert any("y label of" in f and "data area" in f for f in found), found
    fig2 = Figure(figsize=(3.0, 4.0))
    top, bottom = fig2.subplots(2, 1)
    fig2.subplots_adjust(hspace=0.05)
    bottom.set_title("a title under the panel above")
    top.set_xlabel("an x label")
    assert any("title/text 'a title under" in f for f in overlaps(fig2))
    fig3 = Figure(figsize=(3.0, 3.0))
    fig3.add_axes((0.1, 0.1, 0.5, 0.5))
    fig3.add_axes((0.4, 0.4, 0.5, 0.5))
    assert any(f.startswith("panels overlap") for f in overlaps(fig3))
    # A clean figure passes.
    ok = Figure(figsize=(4.0, 3.0), layout="constrained")
    ax = ok.add_subplot()
    ax.plot([0, 1], [0, 1], label="a")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    assert overlaps(ok) == []


# ---------------------------------------------------------------------------------------
# Small analyses of every kind


def _numpy_init(make, seed):
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 0.1 if len(leaf.shape) == 1 else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def _mlp(seed):
    return _numpy_init(lambda: js.models.MLP(64, [16, 12, 10], 5, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(0)), seed)


@dataclasses.dataclass(frozen=True)
class _Ctx(analyses.Context):
    """The runner's context with the initialized model (what noise_profile looks for)."""

    initial_model: Any = None


SPECS = [
    {"kind": "activation_noise", "name": "act", "noise": {"law": "relative_norm"},
     "levels": [0.01, 0.02, 0.05, 0.1, 0.2], "headline": 0.05, "samples": 24},
    {"kind": "weight_noise", "name": "wts", "noise": {"law": "weight_relative"},
     "levels": [0.02, 0.03, 0.04, 0.05, 0.1, 0.2], "samples": 24},
    {"kind": "input_noise", "name": "inp", "noise": {"law": "absolute"},
     "levels": [0.01, 0.03, 0.1, 0.3], "estimators": ["sampled", "linearized", "moments"],
     "samples": 24},
    {"kind": "moments_tightness", "name": "tight", "levels": [0.01, 0.1], "samples": 64,
     "examples": 4},
    {"kind": "sensitivity_map", "name": "maps", "levels": [0.1, 0.3], "examples": 6},
    {"kind": "sensitivity_map", "name": "blocks", "levels": [0.1], "region": 2,
     "examples": 3},
    {"kind": "gaussian_attack", "name": "attack", "budget": 1.0, "steps": 4, "samples": 32,
     "examples": 8},
    {"kind": "weight_norms", "name": "norms"},
    {"kind": "weight_margin", "name": "margin", "levels": [0.001, 0.003, 0.01, 0.03, 0.1],
     "examples": 8, "attack_examples": 3, "samples": 3, "attack_steps": 3,
     "attack_restarts": 0},
]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """``{name: saved analysis entry}``, as results.json holds them."""
    model, initial = _mlp(1), _mlp(2)
    rng = np.random.default_rng(0)
    # Images, as the runner hands the digits to an MLP (which flattens them); the kinds of
    # the analytic moments get them flat (8 × 8 pictures either way).
    images = jnp.asarray(rng.uniform(0, 1, (24, 8, 8, 1)), jnp.float32)
    flat = images.reshape(24, 64)
    y_all = jnp.asarray(rng.integers(0, 5, 24), jnp.int32)
    cfg = parse_config({"analyses": [dict(s, examples=s.get("examples", 24)) for s in SPECS]})
    out = {}
    for i, a in enumerate(cfg.analyses):
        n = a.examples
        x_all = images if a.kind in ("activation_noise", "weight_noise", "input_noise",
                                     "weight_norms") else flat
        ctx = _Ctx(model=model, x=x_all[:n], y=y_all[:n], key=jax.random.key(i), index=i,
                   quiet=True, initial_model=initial if a.kind != "input_noise" else None)
        records = analyses.KINDS[a.kind].run(a, ctx)
        pred = np.asarray(jnp.argmax(model(x_all[:n]), -1))
        entry = {"name": a.label, "kind": a.kind, "num_examples": n,
                 "clean_accuracy": float(np.mean(pred == np.asarray(y_all[:n]))),
                 "records": records}
        out[a.label] = json.loads(json.dumps(clean_json(entry)))
    return out


def _render(entry: dict, tmp_path, monkeypatch) -> dict[str, Figure]:
    """``{file name: Figure}`` of what the kind's ``figures`` saves."""
    drawn: list[Figure] = []
    real = _report.figure_png

    def keep(fig, **kw):
        drawn.append(fig)
        return real(fig, **kw)

    monkeypatch.setattr(_report, "figure_png", keep)
    names = analyses.KINDS[entry["kind"]].figures(tmp_path, entry)
    assert len(names) == len(drawn) and all((tmp_path / "figures" / n).is_file() for n in names)
    return dict(zip(names, drawn, strict=True))


def _stress(entry: dict) -> dict:
    """``entry`` with 8 sites of long names (copies of its own): crowded legends, ticks."""
    recs = []
    for k in range(4):
        for r in entry["records"]:
            recs.append(dict(r, site=f"block{k}/dense_layer/{r['site']}"))
    return dict(entry, name=entry["name"] + "_crowded", records=recs[: 8 * len(recs) // 12])


@pytest.mark.parametrize("name", [s["name"] for s in SPECS] + ["wts_crowded"])
def test_no_figure_has_overlaps(results, tmp_path, monkeypatch, name):
    entry = results[name] if name in results else _stress(results[name.split("_")[0]])
    figs = _render(entry, tmp_path, monkeypatch)
    assert figs
    for file_name, fig in figs.items():
        assert overlaps(fig) == [], file_name


def _lines(fig: Figure) -> list:
    return [ln for ax in fig.axes for ln in ax.get_lines()]


def test_noise_figures_name_the_quantity_and_the_site_kind(results, tmp_path, monkeypatch):
    figs = _render(results["act"], tmp_path, monkeypatch)
    assert set(figs) == {"act_deviation.png", "act_factor.png", "act_headline.png",
                         "act_accuracy.png"}
    dev = figs["act_deviation.png"]
    labels = [ax.get_xlabel() for ax in dev.axes] + [dev.get_suptitle()]
    assert any("activation noise ε (‖η‖ = ε‖h‖)" in s for s in labels), labels
    assert not any("x+η" in s for ax in dev.axes for s in (ax.get_ylabel(), ax.get_xlabel()))
    # One panel per site, and the bound on a panel of its own in log scale.
    titles = [ax.get_title() for ax in dev.axes]
    assert sum(t.startswith("activation site") for t in titles) == 3
    (bound_ax,) = [ax for ax in dev.axes if ax.get_title().startswith("certified bound")]
    assert bound_ax.get_yscale() == "log"
    site_axes = [ax for ax in dev.axes if ax.get_title().startswith("activation site")]
    assert all(not any("bound" in ln.get_label() for ln in ax.get_lines()) for ax in site_axes)
    # Accuracy: the clean reference line and 95% binomial error bars.
    acc = figs["act_accuracy.png"].axes[0]
    assert any(ln.get_label().startswith("clean accuracy") for ln in acc.get_lines())
    assert len(acc.containers) == 3  # one errorbar per site
    n = results["act"]["num_examples"]
    bar = acc.containers[0]
    segs = bar.lines[2][0].get_segments()
    y = bar.lines[0].get_ydata()
    half = [(s[1][1] - s[0][1]) / 2 for s in segs]
    assert half == pytest.approx([1.96 * math.sqrt(p * (1 - p) / n) for p in y], abs=1e-9)
    # The factor, broken down, trained and at initialization.
    fac = figs["act_factor.png"]
    assert [ax.get_title().split(" (")[0] for ax in fac.axes] == [
        "‖h‖/√n", "‖J‖_F", "factor = rms ‖ΔF‖ per unit ε"]
    assert {ln.get_label() for ln in _lines(fac)} == {"trained", "at initialization"}
    # Sampled and predicted side by side; the bound on its own log axis.
    head = figs["act_headline.png"]
    assert len(head.axes) == 2 and head.axes[1].get_yscale() == "log"
    labels = [c.get_label() for c in head.axes[0].containers]
    assert {"sampled (95% interval)", "predicted (linearized)",
            "predicted at initialization"} <= set(labels)


def test_weight_and_input_figures(results, tmp_path, monkeypatch):
    figs = _render(results["wts"], tmp_path, monkeypatch)
    fac = figs["wts_factor.png"]
    assert [ax.get_title().split(" (")[0] for ax in fac.axes] == [
        "‖W‖_F/√n", "‖h_in‖", "‖∂F/∂z‖_F", "factor = rms ‖ΔF‖ per unit ε"]
    dev = figs["wts_deviation.png"]
    assert sum(ax.get_title() == f"layers/{i}/kernel" for ax in dev.axes for i in range(4)) == 4
    assert any("weight noise ε (‖ΔW‖_F = ε‖W‖_F)" == ax.get_xlabel() for ax in dev.axes)
    figs = _render(results["inp"], tmp_path, monkeypatch)
    dev = figs["inp_deviation.png"]
    assert "analytic moments" in {ln.get_label() for ln in _lines(dev)}  # every estimator
    assert any("input noise σ" in s for s in [ax.get_xlabel() for ax in dev.axes]
               + [dev.get_supxlabel()])
    titles = [ax.get_title() for ax in figs["inp_factor.png"].axes]
    assert "‖J‖_F = rms ‖ΔF‖ per unit σ" in titles
    assert not any("per unit σ" in t for t in titles if t.startswith("factor"))


def test_maps_share_one_scale_and_attacks_show_every_example(results, tmp_path, monkeypatch):
    figs = _render(results["maps"], tmp_path, monkeypatch)
    (fig,) = figs.values()
    for level in (0.1, 0.3):
        maps = [im for ax in fig.axes for im in ax.get_images()
                if im.get_cmap().name == "inferno" and f"σ={level:g}" in ax.get_title()]
        assert len(maps) == 6
        assert len({im.get_clim() for im in maps}) == 1  # one colour scale per level
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2
    figs = _render(results["attack"], tmp_path, monkeypatch)
    dist = figs["attack_distributions.png"]
    images = [im for ax in dist.axes for im in ax.get_images() if isinstance(im, AxesImage)]
    assert len(images) == 2 * len(results["attack"]["records"]) == 16


def test_report_breaks_the_factor_down_and_compares_with_initialization(results):
    text = analyses.KINDS["activation_noise"].markdown(results["act"], [])
    assert "Headline level: ε = 0.05" in text
    assert "Which sites are resistant" in text and "| site | ‖h‖/√n (rms value) |" in text
    assert "**Do early layers resist?** At ε = 0.05" in text
    assert "**The same network at initialization**" in text
    recs = [r for r in results["act"]["records"] if "factor_geo" in r]
    for r in recs:  # the parts multiply to the factor, trained and initial
        assert r["factor_geo"] <= r["factor"] * (1 + 1e-6)  # geometric <= arithmetic mean
        assert r["value_rms"] * r["jacobian_norm"] == pytest.approx(r["factor_geo"], rel=1e-9)
        assert r["init_value_rms"] * r["init_jacobian_norm"] == pytest.approx(
            r["init_factor_geo"], rel=1e-9)
    w = [r for r in results["wts"]["records"] if "factor_geo" in r]
    for r in w:
        assert r["weight_rms"] * r["input_norm"] * r["downstream_norm"] == pytest.approx(
            r["factor_geo"], rel=1e-6)
    text = analyses.KINDS["input_noise"].markdown(results["inp"], [])
    assert "comparison with initialization is left out" in text
    summary = analyses.KINDS["weight_noise"].summary(results["wts"])
    assert all(" 0.1 " in line for line in summary)  # the default headline of weight noise

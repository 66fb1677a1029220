"""The ``weight_margin`` experiment kind end to end: config → runner → results.json, figures
and report; its numbers against the library functions it composes; its bad configs fail in
one line before any work."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxsens import analyses, bounds, cli, losses
from jaxsens.analyses.weight_margin import SOUNDNESS_TOLERANCE
from jaxsens.config import load_config, parse_config
from jaxsens.report import summary_table
from jaxsens.runner import (
    _loss_terms,
    build_model,
    load_run,
    prepare_data,
    validate_against_model,
)

BASE = {
    "name": "margin_kind",
    "seed": 0,
    "data": {"name": "digits8x8", "n_train": 300, "n_test": 40},
    "model": {"kind": "mlp", "widths": [12, 10]},
    "train": {"epochs": 3, "batch_size": 50, "optimizer": {"name": "adam",
                                                          "learning_rate": 0.01}},
}
ALL = {"kind": "weight_margin", "name": "all", "levels": [0.001, 0.01, 0.1], "examples": 16,
       "attack_examples": 4, "samples": 4, "attack_steps": 5, "attack_restarts": 2}
LAST = {"kind": "weight_margin", "name": "last", "layers": [-1], "levels": [0.003, 0.03],
        "examples": 16, "attack_examples": 4, "samples": 2, "attack_steps": 3,
        "attack_restarts": 0, "radius": False}
BUDGET_FIELDS = {
    "analysis", "estimator", "record", "site", "level", "layers", "relative", "bound_data",
    "bound_product", "bound_data_attacked", "bound_product_attacked", "attack",
    "ratio_median", "ratio_max", "ratio_product_max", "certified_data", "certified_product",
    "accuracy_clean", "accuracy_random", "accuracy_random_min", "accuracy_untargeted",
    "accuracy_attacked", "rademacher", "linf_product", "num_examples", "num_attacked",
    "samples", "dtype"}
TOL = SOUNDNESS_TOLERANCE["float32"]


def _write(tmp_path, analyses_cfg, **extra):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, analyses=analyses_cfg, **extra)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(run_dir, results)`` of one CLI run with both analyses."""
    base = tmp_path_factory.mktemp("margin")
    out = base / "run"
    assert cli.main(["run", str(_write(base, [ALL, LAST])), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _records(results, name, record):
    (entry,) = [a for a in results["analyses"] if a["name"] == name]
    assert entry["kind"] == "weight_margin"
    return [r for r in entry["records"] if r["record"] == record]


def test_records_hold_every_field_and_the_attack_never_beats_the_bound(finished):
    _, results = finished
    for name, depth_radii in (("all", 3), ("last", 0)):
        budget = _records(results, name, "budget")
        assert [r["level"] for r in budget] == (ALL if name == "all" else LAST)["levels"]
        for r in budget:
            assert BUDGET_FIELDS <= set(r), BUDGET_FIELDS - set(r)
            assert r["ratio_max"] is not None and 0 < r["ratio_max"] <= 1 + TOL, r
            assert r["attack"] <= r["bound_data_attacked"] * (1 + TOL)
            assert r["bound_data"] <= r["bound_product"] * (1 + 1e-6)
            assert r["ratio_product_max"] <= r["ratio_max"] * (1 + 1e-6)
            # certified ≤ attacked ≤ untargeted-only ≤ clean: certificates are never wrong.
            assert r["certified_product"] <= r["certified_data"] <= r["accuracy_attacked"]
            assert r["accuracy_attacked"] <= r["accuracy_untargeted"] <= r["accuracy_clean"]
        bound = [r["bound_data"] for r in budget]
        assert bound == sorted(bound) and bound[0] > 0
        certified = [r["certified_data"] for r in budget]
        assert certified == sorted(certified, reverse=True)
        assert len(_records(results, name, "radius")) == depth_radii
        (gen,) = _records(results, name, "generalization")
        assert gen["complexity"] > 0 and len(gen["linf_norms"]) == 3
    # All layers: the per-layer radii, and a bound the attack does not reach.
    radii = _records(results, "all", "radius")
    assert [r["layer"] for r in radii] == [0, 1, 2]
    assert all(r["radius_product_median"] <= r["radius_data_median"] * (1 + 1e-5)
               for r in radii)
    assert max(r["ratio_max"] for r in _records(results, "all", "budget")) < 0.9
    # Only the last layer moves (layers: [-1]): the data form is attained by the attack.
    last = _records(results, "last", "budget")
    assert all(r["layers"] == [2] and r["site"] == "layer 2" for r in last)
    assert min(r["ratio_max"] for r in last) > 0.99


def test_numbers_are_the_library_functions(finished):
    """The kind reproduces weight_margin_bound, certified_accuracy, generalization_term and
    accuracy_under_weight_noise (the same keys) on the run's trained model."""
    out, results = finished
    model, cfg, ds = load_run(out)
    x, y = jnp.asarray(ds.x_test[:16]), jnp.asarray(ds.y_test[:16])
    key = jax.random.key(7)
    spec = cfg.analyses[0].model_copy(update={"levels": [0.01], "radius": False})
    ctx = analyses.Context(model=model, x=x, y=y, key=key, index=0, quiet=True)
    (mine, gen) = analyses.KINDS["weight_margin"].run(spec, ctx)
    layers = [0, 1, 2]
    lib = bounds.accuracy_under_weight_noise(model, x, y, eps=0.01, layers=layers,
                                             relative=True, key=jax.random.fold_in(key, 0),
                                             samples=4, attack_steps=5)
    assert mine["accuracy_clean"] == lib["clean"]
    assert mine["accuracy_random"] == pytest.approx(lib["random"], abs=1e-6)
    assert mine["accuracy_untargeted"] == lib["attacked"]
    for form in ("data", "product"):
        g = bounds.weight_margin_bound(model, x, y, eps=0.01, layers=layers, relative=True,
                                       form=form)
        assert mine[f"bound_{form}"] == pytest.approx(float(jnp.mean(g.max(axis=1))),
                                                      rel=1e-5)
        assert mine[f"certified_{form}"] == float(bounds.certified_accuracy(
            model, x, y, eps=0.01, layers=layers, relative=True, form=form))
    rademacher = bounds.generalization_term(model, x, eps=0.01, layers=layers, relative=True)
    assert mine["rademacher"] == pytest.approx(rademacher["complexity"], rel=1e-6)
    assert gen["complexity"] == pytest.approx(bounds.generalization_term(model, x)["complexity"],
                                              rel=1e-6)
    linf = [float(np.abs(np.asarray(k)).sum(axis=0).max())
            for k in bounds.margin_chain(model).kernels]
    assert gen["linf_product"] == pytest.approx(float(np.prod(linf)), rel=1e-6)
    # The same run through the runner, at the same level: the saved record agrees.
    saved = [r for r in _records(results, "all", "budget") if r["level"] == 0.01][0]
    assert saved["bound_data"] == pytest.approx(mine["bound_data"], rel=1e-6)


def test_figures_report_and_summary(finished):
    out, results = finished
    stdout = summary_table(results)  # what `jaxsens run` prints
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"all_bound.png", "all_accuracy.png", "all_radius.png", "last_bound.png",
            "last_accuracy.png"} <= figs
    assert "last_radius.png" not in figs  # radius: false
    assert all((out / "figures" / f).stat().st_size > 0 for f in figs)
    report = (out / "report.md").read_text()
    for name in ("all", "last"):
        assert f"## {name} (weight-perturbation margins)" in report
    assert report.count("**Soundness:**") == 2 and "it is violated" not in report
    assert "does not use the paper's constants" in report
    assert "Golowich, Rakhlin & Shamir" in report and "biases folded in" in report
    assert re.search(r"\| dense layer \| weight \| ‖W_k‖_∞ \|", report)
    header = [line for line in stdout.splitlines() if "certified" in line]
    assert header and all(c in header[0] for c in ("ε", "attacked", "random", "R(ε)"))
    rows = [line for line in stdout.splitlines() if line.startswith("last ")]
    assert len(rows) == 2 and all("layer 2" in line for line in rows)


def test_the_report_flags_a_violated_bound(finished):
    _, results = finished
    (entry,) = [a for a in results["analyses"] if a["name"] == "all"]
    kind = analyses.KINDS["weight_margin"]
    assert re.search(r"is 0\.\d+: sound \(≤ 1 up to float32 rounding", kind.markdown(entry, []))
    bad = dict(entry, records=[dict(r, ratio_max=1.5) if r["record"] == "budget" else r
                               for r in entry["records"]])
    text = kind.markdown(bad, [])
    assert "is 1.5 > 1" in text and "it is violated" in text


BAD = [
    ("conv model", {"model": {"kind": "lenet", "widths": [12], "channels": [2, 3]}}, ALL,
     r"config error at analyses\[0\]: a weight_margin analysis needs a chain of dense "
     r"layers; .*'conv_general_dilated'"),
    ("layer out of range", {}, dict(ALL, layers=[0, 3]),
     r"config error at analyses\[0\]\.layers: dense layer 3 does not exist; the model has 3 "
     r"dense layers"),
    ("a layer twice", {}, dict(ALL, layers=[2, -1]),
     r"config error at analyses\[0\]\.layers: \[2, -1\] name a layer twice"),
    ("repeated index", {}, dict(ALL, layers=[1, 1]),
     r"config error at analyses\[0\]\.layers: indices must be distinct"),
    ("no levels", {}, {k: v for k, v in ALL.items() if k != "levels"},
     r"config error at analyses\[0\]\.levels"),
]


@pytest.mark.parametrize("what,extra,analysis,pattern", BAD, ids=[c[0] for c in BAD])
def test_bad_configs_fail_in_one_line_before_any_work(tmp_path, capsys, what, extra, analysis,
                                                      pattern):
    train = dict(BASE["train"], epochs=50)  # a late failure would take far longer
    path = _write(tmp_path, [analysis], **dict({"train": train}, **extra))
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_builtin_experiments_fit_their_models_and_the_documented_commands():
    for name, overrides in (
            ("margin_soundness", []),
            ("margin_soundness", ["model.widths=[64]"]),  # depth 2 (the YAML's commands)
            ("margin_soundness", ["model.widths=[64,64,64,64]"]),
            ("margin_training", ["train.loss.1.weight=0.3", "train.loss.2.weight=0.01"])):
        cfg = load_config(name, overrides)
        ds, _ = prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"n_train": 20, "n_test": 20})}))
        validate_against_model(cfg, build_model(cfg, ds), ds)
        assert any(a.kind == "weight_margin" for a in cfg.analyses)
    cfg = load_config("margin_training", ["train.loss.1.weight=0.3", "train.loss.2.weight=0.01"])
    assert [(t.kind, t.weight) for t in cfg.train.loss] == [
        ("cross_entropy", 1.0), ("weight_margin", 0.3), ("linf_norm", 0.01)]
    # λ is warmed up: the runner hands the train loop a schedule, not a number.
    weights = [w for w, _ in _loss_terms(cfg)]
    assert weights[0] == 1.0 and weights[2] == 0.01
    assert weights[1] == losses.Warmup(0.3, 100)
    # The input-adversarial comparison: the same chain, the adversarial term swept 0/1.
    for w in ("0", "1"):
        adv = load_config("adversarial_vs_weight_attack", [f"train.loss.1.weight={w}"])
        ds, _ = prepare_data(adv.model_copy(update={"data": adv.data.model_copy(
            update={"n_train": 20, "n_test": 20})}))
        validate_against_model(adv, build_model(adv, ds), ds)
        assert [t.kind for t in adv.train.loss] == ["cross_entropy", "adversarial"]
        assert {a.kind for a in adv.analyses} >= {"weight_margin", "input_noise"}
        assert "attack" in next(a for a in adv.analyses if a.kind == "input_noise").estimators
    # With both weights at 0 (the sweep's cross-entropy point) the config is still valid.
    assert [t.weight for t in load_config("margin_training").train.loss] == [1.0, 0.0, 0.0]
    assert parse_config({"analyses": [ALL]}).analyses[0].attack_examples == 4

"""Experiment kinds as a registry, and validation against the model before any work."""

from __future__ import annotations

import json
import re
import typing

import numpy as np
import pytest
import yaml

from jaxsens import analyses, cli
from jaxsens.config import ExperimentConfig, parse_config
from jaxsens.runner import build_model, prepare_data
from jaxsens.sites import split

BASE = {
    "name": "kinds",
    "seed": 1,
    "data": {"name": "digits", "n_train": 200, "n_test": 40},
    "model": {"kind": "mlp", "widths": [16, 12]},
    "train": {"epochs": 50, "batch_size": 50},  # long enough that a late failure would show
}


def _run(tmp_path, analyses_cfg, **extra) -> tuple[int, str]:
    cfg = dict(BASE, analyses=analyses_cfg, **extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    return cli.main(["run", str(path), "--out", str(out), "--quiet"]), str(out)


def test_every_kind_is_one_registry_entry_and_one_union_member():
    union_members = typing.get_args(typing.get_args(analyses.AnalysisUnion)[0])
    assert {m for m in union_members} == {k.config for k in analyses.KINDS.values()}
    for name, kind in analyses.KINDS.items():
        assert kind.name == name
        assert all(callable(f) for f in (kind.run, kind.figures, kind.markdown, kind.summary))
    # The config's analyses field is that union: each entry validates into its kind's class.
    cfg = parse_config({"analyses": [{"kind": "weight_norms"},
                                     {"kind": "gaussian_attack", "budget": 1.0}]})
    assert [type(a).__name__ for a in cfg.analyses] == ["WeightNorms", "GaussianAttack"]
    assert "analyses" in ExperimentConfig.model_fields


def test_a_field_of_another_kind_is_an_unknown_field(capsys, tmp_path):
    code, _ = _run(tmp_path, [{"kind": "weight_norms", "budget": 2.0}])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert re.search(r"analyses\[0\]\.budget: unknown field; allowed fields: .*'kind'", err), err


def test_unknown_kind_lists_the_registered_ones(capsys, tmp_path):
    code, _ = _run(tmp_path, [{"kind": "noise_everywhere"}])
    err = capsys.readouterr().err.strip()
    assert code == 2
    for name in analyses.KINDS:
        assert name in err, err


# Each case names something that only the built model can check; all must fail before
# training starts (50 epochs would take far longer than the limit below) and write nothing.
EARLY = [
    ("unknown activation site", {"kind": "activation_noise", "sites": ["h7"],
                                 "noise": {"law": "relative_norm"}, "levels": [0.1]},
     r"analyses\[0\]\.sites\[0\]: site='h7' is not a site of this model"),
    ("weight path typo", {"kind": "weight_noise", "sites": ["layers/0/kernal"],
                          "noise": {"law": "weight_relative"}, "levels": [0.1]},
     r"analyses\[0\]\.sites\[0\]: site='layers/0/kernal' is not a site of this model "
     r"\(did you mean 'layers/0/kernel'\?\)"),
    ("activation site given to weight_noise", {"kind": "weight_noise", "sites": ["h0"],
                                               "noise": {"law": "weight_relative"},
                                               "levels": [0.1]},
     r"analyses\[0\]\.sites\[0\]: 'h0' is an activation site"),
    ("bad split site", {"kind": "moments_tightness", "levels": [0.1], "split_at": "h9"},
     r"analyses\[0\]\.split_at: 'h9' is not a ReLU site"),
    ("attack target beyond the classes", {"kind": "gaussian_attack", "budget": 1.0,
                                          "target": 12},
     r"analyses\[0\]\.target: class 12 does not exist"),
]


@pytest.mark.parametrize("what,analysis,pattern", EARLY, ids=[c[0] for c in EARLY])
def test_model_checks_fail_before_training_and_write_nothing(tmp_path, capsys, what, analysis,
                                                             pattern):
    code, _ = _run(tmp_path, [analysis])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()  # no checkpoint, no metrics: no work ran


def test_loss_term_site_is_checked_before_training(tmp_path, capsys):
    code, _ = _run(tmp_path, [], train=dict(BASE["train"], loss=[
        {"kind": "cross_entropy"},
        {"kind": "noise", "site": "h5", "noise": {"law": "relative_norm"}, "weight": 0.1}]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.search(r"train\.loss\[1\]: site='h5'", err), err
    assert not (tmp_path / "run").exists()


def test_the_minimal_example_kind_runs_end_to_end(tmp_path):
    """weight_norms: the template kind, through config, runner, results, figures, report."""
    code, _ = _run(tmp_path, [{"kind": "weight_norms", "name": "norms"}],
                   train=dict(BASE["train"], epochs=0))
    assert code == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    (entry,) = res["analyses"]
    assert entry["kind"] == "weight_norms"
    recs = entry["records"]
    assert [r["site"] for r in recs] == ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel"]
    # Untrained (epochs 0): the same seeded model, rebuilt here, has these exact norms.
    cfg = parse_config(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    ds, _ = prepare_data(cfg)
    pm = split(build_model(cfg, ds))
    for r in recs:
        w = np.asarray(pm.param(r["site"]), np.float64)
        exact = np.linalg.norm(w, 2)
        assert exact <= r["spectral"] <= 1.01 * exact, r
        assert r["frobenius"] == pytest.approx(np.linalg.norm(w), rel=1e-6)
        assert r["linf_operator"] == pytest.approx(np.abs(w).sum(axis=0).max(), rel=1e-6)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## norms (weight norms)" in report and "layers/1/kernel" in report
    assert (tmp_path / "run" / "figures" / "norms_norms.png").stat().st_size > 0


def test_skipped_estimators_are_reported_not_dropped():
    kind = analyses.KINDS["activation_noise"]
    measured = {"analysis": "a", "site": "h0", "kind": "activation", "level": 0.1,
                "estimator": "linearized", "law": "relative-norm(sphere) ε=0.1", "mean": 1.0,
                "rms": 1.0, "factor": 10.0, "num_examples": 4, "num_samples": 0}
    skipped = {"analysis": "a", "site": "h0", "kind": "activation", "estimator": "bound",
               "skipped": "no certified bound at site 'h0'"}
    entry = {"name": "a", "kind": "activation_noise", "num_examples": 4,
             "clean_accuracy": 0.9, "records": [measured, skipped]}
    text = kind.markdown(entry, [])
    assert "Not run: bound at h0 (no certified bound at site 'h0')." in text
    assert "| h0 | 0.1 |" in text  # the measured row is still there
    assert len(kind.summary(entry)) == 1


def test_summary_table_has_a_header_per_kind():
    from jaxsens.report import summary_table

    results = {"analyses": [
        {"name": "norms", "kind": "weight_norms", "records": [
            {"site": "layers/0/kernel", "frobenius": 3.0, "spectral": 2.0,
             "linf_operator": 4.0}]},
        {"name": "maps", "kind": "sensitivity_map", "records": [
            {"example": 0, "level": 0.1, "total": 1.5, "top10_fraction": 0.4}]},
    ]}
    lines = summary_table(results).splitlines()
    assert lines[0].split()[:2] == ["analysis", "weight"] and "‖W‖₂" in lines[0]
    assert lines[1].startswith("norms") and "2" in lines[1]
    assert lines[2] == ""
    assert lines[3].split()[:3] == ["analysis", "example", "σ"] and "total" in lines[3]
    assert lines[4].startswith("maps") and "0.40" in lines[4]

"""The experiment runner end to end: configs, CLI, resume, determinism, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import jaxsens as js
from jaxsens import cli, runner
from jaxsens.config import ConfigError, load_config, parse_config

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "digits", "n_train": 400, "n_test": 100},
    "model": {"kind": "mlp", "widths": [32, 32]},
    "train": {
        "epochs": 3,
        "batch_size": 64,
        "optimizer": {"name": "adam", "learning_rate": 0.003},
        "loss": [{"kind": "cross_entropy"}],
    },
    "analyses": [
        {
            "kind": "activation_noise",
            "noise": {"law": "relative_norm"},
            "levels": [0.05, 0.1],
            "samples": 16,
            "examples": 24,
        },
        {
            "kind": "weight_noise",
            "sites": ["layers/1/kernel"],
            "noise": {"law": "weight_relative", "norm": "spectral"},
            "levels": [0.1],
            "samples": 8,
            "examples": 16,
            "estimators": ["sampled", "linearized"],
        },
    ],
}


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _with(path: str, value):
    cfg = json.loads(json.dumps(TINY))
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


BAD_CONFIGS = [
    ("unknown top-level field", _with("epochs", 3), r"epochs.*unknown field"),
    ("typo in a nested field", _with("model.widht", [3]), r"model\.widht.*did you mean 'widths'"),
    ("unknown optimizer", _with("train.optimizer.name", "adamm"), r"train\.optimizer\.name.*adamw"),
    ("non-positive learning rate", _with("train.optimizer.learning_rate", -1.0),
     r"train\.optimizer\.learning_rate.*greater than 0.*-1\.0"),
    ("negative epochs", _with("train.epochs", -2), r"train\.epochs.*-2"),
    ("unknown activation", _with("model.activation", "swish"), r"model\.activation.*'relu'"),
    ("unknown noise law", _with("analyses.0.noise.law", "salt"),
     r"analyses\[0\]\.noise\.law.*'relative_norm'"),
    ("empty level list", _with("analyses.0.levels", []), r"analyses\[0\]\.levels"),
    ("negative level", _with("analyses.0.levels", [0.1, -0.5]), r"analyses\[0\]\.levels\[1\]"),
    ("unknown estimator", _with("analyses.0.estimators", ["sampled", "exact"]),
     r"analyses\[0\]\.estimators\[1\].*'linearized'"),
    ("weight law at activations", _with("analyses.0.noise.law", "weight_relative"),
     r"analyses\[0\]\.noise\.law.*weight sites only"),
    ("unknown dataset", _with("data.name", "imagenet"), r"data\.name.*'digits'"),
    ("noise loss without site", _with("train.loss", [{"kind": "noise", "weight": 0.1}]),
     r"train\.loss\[0\].*needs `site` and `noise`"),
    ("negative warm-up", _with("train.loss", [{"kind": "cross_entropy", "warmup_steps": -5}]),
     r"train\.loss\[0\]\.warmup_steps.*greater than or equal to 0"),
    ("unknown loss kind", _with("train.loss", [{"kind": "hinge"}]),
     r"train\.loss\[0\]\.kind.*cross_entropy"),
    ("bad precision", _with("precision", "float16"), r"precision.*'float32'"),
    ("zero width", _with("model.widths", [32, 0]), r"model\.widths\[1\].*greater than 0"),
    ("samples too small", _with("analyses.0.samples", 1), r"analyses\[0\]\.samples"),
    ("moments estimator at activations", _with("analyses.0.estimators", ["moments"]),
     r"analyses\[0\]\.estimators.*input_noise analyses only"),
    ("noise analysis without a law", _with("analyses.0.noise", None),
     r"analyses\[0\]\.noise.*needs a noise law"),
    ("noise analysis without levels", _with("analyses.0.levels", None),
     r"analyses\[0\]\.levels.*needs a non-empty list"),
    ("attack without a budget", _with("analyses.0", {"kind": "gaussian_attack"}),
     r"analyses\[0\]\.budget.*needs a budget"),
]


@pytest.mark.parametrize("what,cfg,pattern", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_fails_in_one_line_and_writes_nothing(tmp_path, capsys, what, cfg, pattern):
    path = _write(tmp_path, cfg)
    out = tmp_path / "run"
    code = cli.main(["run", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("jaxsens: error: config error at")
    assert "\n" not in err, err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--set", "train.epochs"], r"must look like key\.path=value"),
        (["--set", "train.nope=1"], r"train\.nope.*unknown field"),
        (["--set", "analyses.7.levels=[1]"], r"not a valid list index"),
    ],
)
def test_bad_overrides(tmp_path, capsys, argv, pattern):
    import re

    path = _write(tmp_path, TINY)
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_with_one_line(tmp_path, capsys):
    cfg = _with("train.optimizer.learning_rate", 1e12)
    cfg["train"]["optimizer"]["name"] = "sgd"
    path = _write(tmp_path, cfg)
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("jaxsens: training stopped:") and "\n" not in err, err
    assert "learning rate" in err
    assert not (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_bad_files(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    assert cli.main(["run", str(bad), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert cli.main(["run", str(lst), "--quiet"]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    assert cli.main(["run", "no_such_builtin", "--quiet"]) == 2
    assert "noise_propagation" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_overrides_apply_and_validate():
    cfg = load_config("noise_propagation", ["train.epochs=2", "analyses.0.levels=[0.1, 0.2]"])
    assert cfg.train.epochs == 2 and cfg.analyses[0].levels == [0.1, 0.2]
    with pytest.raises(ConfigError):
        parse_config({"seed": "zero"})


def test_every_builtin_experiment_is_valid():
    from jaxsens.config import builtin_experiments

    names = builtin_experiments()
    assert {"noise_propagation", "moments_tightness_mlp", "moments_tightness_lenet",
            "sensitivity_maps", "gaussian_attacks"} <= set(names)
    for name in names:
        assert load_config(name).name == name


def test_moments_analyses_run_end_to_end(tmp_path):
    cfg = _with("train.epochs", 1)
    cfg["analyses"] = [
        {"kind": "moments_tightness", "levels": [0.05], "samples": 200, "examples": 2},
        {"kind": "input_noise", "noise": {"law": "absolute"}, "levels": [0.05],
         "estimators": ["sampled", "moments"], "samples": 16, "examples": 8},
    ]
    path = _write(tmp_path, cfg)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    tight = res["analyses"][0]["records"][0]
    assert tight["sre_var"] < tight["sre_var_zero_mean"]
    ests = {r["estimator"] for r in res["analyses"][1]["records"]}
    assert ests == {"sampled", "moments"}
    report = (tmp_path / "m" / "report.md").read_text()
    assert "zero-mean formula" in report and "moments (analytic)" in report
    assert (tmp_path / "m" / "figures" / "moments_tightness_tightness.png").stat().st_size > 0


def test_map_and_attack_analyses_run_end_to_end(tmp_path):
    cfg = _with("train.epochs", 1)
    cfg["analyses"] = [
        {"kind": "sensitivity_map", "levels": [0.1], "examples": 2},
        {"kind": "sensitivity_map", "name": "blocks", "levels": [0.1], "region": 4,
         "examples": 1},
        {"kind": "gaussian_attack", "budget": 2.0, "steps": 20, "samples": 200, "examples": 2},
    ]
    path = _write(tmp_path, cfg)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "u"), "--quiet"]) == 0
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    maps, blocks, attack = (a["records"] for a in res["analyses"])
    assert len(maps) == 2 and len(maps[0]["map"]) == 28 * 28 and maps[0]["total"] > 0
    assert blocks[0]["map_shape"] == [7, 7, 1]
    for r in attack:
        assert abs(r["mc_margin"] - r["predicted_margin"]) < 0.5 * abs(r["predicted_margin"]) + 1
        assert r["mean_shift_norm"] ** 2 + r["noise_norm"] ** 2 <= 2.0**2 * (1 + 1e-6)
    figs = {p.name for p in (tmp_path / "u" / "figures").iterdir()}
    assert {"sensitivity_map_maps.png", "gaussian_attack_margins.png"} <= figs
    report = (tmp_path / "u" / "report.md").read_text()
    assert "noise-sensitivity maps" in report and "isotropic baseline" in report


def test_builtin_default_config_is_valid(capsys):
    cfg = load_config(None)
    assert cfg.name == "noise_propagation"
    assert {a.kind for a in cfg.analyses} == {"activation_noise", "weight_noise"}
    assert cli.main(["list"]) == 0
    assert "noise_propagation" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    path = _write(base, TINY)
    out = base / "a"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return path, out


def test_cli_end_to_end_outputs(finished_run, capsys):
    _, out = finished_run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.csv", "report.md"):
        assert (out / name).stat().st_size > 0, name
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    res = json.loads((out / "results.json").read_text())
    assert len(res["analyses"]) == 2
    recs = res["analyses"][0]["records"]
    assert {r["estimator"] for r in recs} == {"sampled", "linearized", "bound"}
    assert {r["site"] for r in recs} == {"h0", "h1"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    report = (out / "report.md").read_text()
    assert "Which sites are resistant" in report and "figures/" in report
    # Re-render from saved results only.
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").stat().st_size > 0
    assert "h0" in capsys.readouterr().out


def test_same_seed_same_results(finished_run, tmp_path):
    path, out = finished_run
    other = tmp_path / "b"
    assert cli.main(["run", str(path), "--out", str(other), "--quiet"]) == 0
    assert (other / "results.json").read_bytes() == (out / "results.json").read_bytes()


def test_rerun_with_other_config_refuses(finished_run, capsys):
    path, out = finished_run
    code = cli.main(["run", str(path), "--out", str(out), "--quiet", "--set", "seed=4"])
    assert code == 2
    assert "different config" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["seed"] == 3


def test_resume_after_kill_matches_uninterrupted(finished_run, tmp_path, monkeypatch):
    path, out = finished_run
    killed = tmp_path / "killed"
    real = runner._append_metrics

    def die_after_first_epoch(run_dir, record):
        real(run_dir, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_append_metrics", die_after_first_epoch)
    assert cli.main(["run", str(path), "--out", str(killed), "--quiet"]) == 130
    assert not (killed / "results.json").exists()
    assert (killed / "config.yaml").exists()
    monkeypatch.setattr(runner, "_append_metrics", real)
    assert cli.main(["run", str(path), "--out", str(killed), "--quiet"]) == 0
    assert (killed / "results.json").read_bytes() == (out / "results.json").read_bytes()


def test_sweep_runs_each_point_once(tmp_path, capsys):
    cfg = _with("train.epochs", 1)
    cfg["analyses"] = cfg["analyses"][:1]
    path = _write(tmp_path, cfg)
    argv = ["sweep", str(path), "--grid", "model.activation=relu,tanh", "--out",
            str(tmp_path / "sw"), "--quiet"]
    assert cli.main(argv) == 0
    dirs = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert dirs == ["model.activation=relu", "model.activation=tanh"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("[skip]") == 2


def test_cli_config_version_and_bad_paths(tmp_path, capsys):
    """`config` prints the resolved config without running; bad --out and a directory
    given as the config fail in one line."""
    assert cli.main(["config", "noise_propagation", "--set", "train.epochs=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 2 and printed["analyses"][0]["kind"] == \
        "activation_noise"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("jaxsens ")
    assert cli.main(["run", str(tmp_path), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path = _write(tmp_path, TINY)
    for out in (blocker, blocker / "run"):
        assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxsens: error: run directory") and "\n" not in err, err
    assert blocker.read_text() == "x"  # nothing written over it


def test_train_once_analyse_many(finished_run, tmp_path, capsys):
    """New analyses on a finished run reuse its trained model: nothing is retrained, the
    metrics stay as they were, results.json holds the new analyses; load_run gives the
    trained model back in one call."""
    import shutil

    from jaxsens.runner import load_run

    _, out = finished_run
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    metrics = (run / "metrics.jsonl").read_bytes()
    new = _write(tmp_path, {"analyses": [{"kind": "weight_norms", "name": "norms"}]},
                 "new.yaml")
    assert cli.main(["analyse", str(run), str(new)]) == 0
    err = capsys.readouterr().err
    assert "trained: restoring the model of epoch 3" in err and "training mlp" not in err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    res = json.loads((run / "results.json").read_text())
    assert [a["kind"] for a in res["analyses"]] == ["weight_norms"]
    loaded = load_run(run)
    pm = js.split(loaded.model)
    w = np.asarray(pm.param("layers/1/kernel"), np.float64)
    rec = next(r for r in res["analyses"][0]["records"] if r["site"] == "layers/1/kernel")
    assert rec["frobenius"] == pytest.approx(np.linalg.norm(w), rel=1e-6)
    assert loaded.config.train.epochs == 3 and loaded.data.n_test == 100
    # Changing what the model depends on is still refused.
    assert cli.main(["analyse", str(run), "--set", "train.epochs=4", "--quiet"]) == 2
    assert "different config" in capsys.readouterr().err


def test_a_config_without_analyses_is_refused(tmp_path, capsys):
    cfg = json.loads(json.dumps(TINY))
    cfg["analyses"] = []
    assert cli.main(["run", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
    assert "has no analyses" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_device_fails_in_one_line(tmp_path):
    """--device names a device kind; one that JAX cannot start fails before any work."""
    import os
    import subprocess
    import sys

    path = _write(tmp_path, TINY)
    env = dict(os.environ, JAXSENS_COMPILE_CACHE="off")
    proc = subprocess.run([sys.executable, "-m", "jaxsens", "run", str(path), "--device",
                           "tpu", "--out", str(tmp_path / "r"), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith("jaxsens: error: --device tpu: no such device"), err
    assert not (tmp_path / "r").exists()

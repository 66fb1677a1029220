"""A sweep's points side by side: sweep.json, comparison.md / .png, `jaxsens report SWEEP`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import yaml

from jaxsens import cli, report
from jaxsens.analyses import summary_row

CONFIG = {
    "name": "tiny_sweep",
    "seed": 3,
    "data": {"name": "digits", "n_train": 200, "n_test": 60},
    "model": {"kind": "mlp", "widths": [16, 16]},
    "train": {"epochs": 1, "batch_size": 64,
              "optimizer": {"name": "adam", "learning_rate": 0.003}},
    "analyses": [
        {"kind": "activation_noise", "noise": {"law": "relative_norm"},
         "levels": [0.05, 0.1], "samples": 8, "examples": 16},
        {"kind": "weight_noise", "name": "wn", "sites": ["layers/1/kernel"],
         "noise": {"law": "weight_relative", "norm": "frobenius"}, "levels": [0.1],
         "samples": 8, "examples": 16, "estimators": ["sampled", "linearized"]},
    ],
}
LR = "train.optimizer.learning_rate"
POINTS = {f"{LR}=0.003__model.activation=relu": "0.003",
          f"{LR}=0.01__model.activation=relu": "0.01"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A real two-point sweep through the CLI entry point, and what it printed."""
    base = tmp_path_factory.mktemp("sweep")
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = base / "sw"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["sweep", str(cfg), "--grid", f"{LR}=0.003,0.01", "--grid",
                         "model.activation=relu", "--out", str(out), "--quiet"])
    assert code == 0
    return out, printed.getvalue()


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the (one) markdown table in ``md``."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return split[0], split[2:]


def _expected(results: dict, analysis: str, site: str, level: float) -> str:
    """sampled / predicted / bound / accuracy of one site, straight from the records."""
    recs = next(a for a in results["analyses"] if a["name"] == analysis)["records"]
    by = {r["estimator"]: r for r in recs
          if r.get("site") == site and r.get("level") == level and "skipped" not in r}
    smp, lin, bnd = by.get("sampled"), by.get("linearized"), by.get("bound")
    return " / ".join([f"{smp['mean']:.4g}", f"{lin['mean']:.4g}",
                       f"{bnd['upper']:.4g}" if bnd else "–", f"{smp['accuracy']:.3f}"])


def test_sweep_writes_manifest_and_comparison(swept):
    out, printed = swept
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["dir"] for p in manifest["points"]] == list(POINTS)
    assert manifest["grid"] == {LR: ["0.003", "0.01"], "model.activation": ["relu"]}
    assert manifest["points"][1]["values"] == {LR: "0.01", "model.activation": "relu"}
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    md = (out / "comparison.md").read_text()
    assert "![comparison](comparison.png)" in md
    header, rows = _table(md)
    assert "| " + " | ".join(header) + " |" in printed  # the sweep prints the table
    assert header[:4] == [LR, "model.activation", "status", "clean test accuracy"]
    assert len(rows) == 2
    for row, (name, lr) in zip(rows, POINTS.items(), strict=True):
        res = json.loads((out / name / "results.json").read_text())
        cell = dict(zip(header, row, strict=True))
        assert (cell[LR], cell["model.activation"], cell["status"]) == (lr, "relu", "ok")
        assert cell["clean test accuracy"] == f"{res['clean_test_accuracy']:.4f}"
        gap = res["final_train"]["train_accuracy"] - res["clean_test_accuracy"]
        assert cell["train − test"] == f"{gap:+.4f}"
        for site in ("h0", "h1"):
            col = f"activation_noise: {site} ε=0.05 — sampled / predicted / bound / accuracy"
            assert cell[col] == _expected(res, "activation_noise", site, 0.05)
        col = "wn: layers/1/kernel ε=0.1 — sampled / predicted / bound / accuracy"
        assert cell[col] == _expected(res, "wn", "layers/1/kernel", 0.1)


def test_report_on_a_sweep_rerenders_points_and_lists_missing_ones(swept, tmp_path, capsys):
    src, _ = swept
    out = tmp_path / "sw"
    shutil.copytree(src, out)
    first, second = list(POINTS)
    for name in ("comparison.md", "comparison.png"):
        (out / name).unlink()
    (out / first / "report.md").unlink()
    (out / second / "results.json").unlink()  # failed or unfinished
    report.write_sweep_manifest(out, [("never_ran", {LR: "0.1", "model.activation": "relu"})])
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / first / "report.md").stat().st_size > 0
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    header, rows = _table((out / "comparison.md").read_text())
    assert "| " + " | ".join(header) + " |" in printed
    assert [r[0] for r in rows] == ["0.003", "0.01", "0.1"]
    status = header.index("status")
    assert rows[0][status] == "ok"
    assert rows[1][status].startswith("missing") and "no results.json" in rows[1][status]
    assert rows[2][status] == "missing: not run"
    assert set(rows[1][status + 1:]) == set(rows[2][status + 1:]) == {"–"}
    assert "2 missing" in (out / "comparison.md").read_text()


def test_sweep_without_manifest_is_read_from_directory_names(swept, tmp_path):
    src, _ = swept
    out = tmp_path / "sw"
    shutil.copytree(src, out)
    (out / "sweep.json").unlink()
    table = report.render_sweep_report(out, figure=False)
    header, rows = _table(table)
    assert header[:3] == [LR, "model.activation", "status"]
    assert sorted(r[0] for r in rows) == ["0.003", "0.01"]


def test_report_on_other_directories_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stuff").mkdir()
    for target in (tmp_path / "empty", tmp_path / "nowhere"):
        assert cli.main(["report", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxsens: error:") and "\n" not in err, err
        assert "no results.json" in err and "sweep.json" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sweep.json").write_text("{not json")
    assert cli.main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a jaxsens sweep manifest" in err and "\n" not in err, err
    with pytest.raises(ValueError, match="not a jaxsens sweep directory"):
        report.sweep_points(tmp_path / "empty")


@pytest.mark.parametrize("cells", [
    ("h0", "0.05", "0.1234", "0.1201", "3.456", "0.812"),
    ("layers/1/kernel", "0.03125", "1.234e-05", "–", "", "1.000"),  # a cell wider than its
    ("example 3", "0.1", "12345678901234", "0.5"),                  # column, an empty one
])
def test_summary_rows_are_read_back_cell_by_cell(cells):
    assert report._summary_cells(summary_row("some_analysis", *cells)) == list(cells)


def test_sweep_into_a_file_fails_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    code = cli.main(["sweep", str(cfg), "--grid", f"{LR}=0.003", "--out",
                     str(blocker / "sw"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("jaxsens: error:") and "\n" not in err, err
    assert blocker.read_text() == "x"


def test_a_failed_point_is_listed_as_missing(tmp_path, capsys):
    """A diverging point stops the sweep (status 1), but the comparison is still written
    and names it missing."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sw"
    code = cli.main(["sweep", str(cfg), "--set", "train.optimizer.name=sgd", "--grid",
                     f"{LR}=1e12", "--out", str(out), "--quiet"])
    assert code == 1 and "training stopped" in capsys.readouterr().err
    header, rows = _table((out / "comparison.md").read_text())
    assert rows[0][:2] == ["1e12", "missing: unfinished or failed (no results.json)"]
    assert not (out / "comparison.png").exists()

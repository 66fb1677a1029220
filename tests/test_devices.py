"""Many devices: estimators on batch-sharded inputs, Monte Carlo draws split over devices,
data-parallel training, sharded checkpoints and the runner's ``devices`` section.

The multi-device checks run once, in a subprocess with four forced host devices
(``--xla_force_host_platform_device_count=4``), against the same computations on one
device; the tests below read its report. Mesh building, config errors and sharded sweeps
run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsens import cli, devices
from jaxsens.config import ConfigError, parse_config
from jaxsens.estimators._common import plan

_SCRIPT = r"""
import json, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
import jaxsens as js
from jaxsens import data, devices, runner
from jaxsens.config import parse_config

assert jax.device_count() == 4, jax.devices()
report = {}


def diff(a, b):
    # Largest |a - b| over the produced entries; absent (NaN) fields must match too.
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if not np.array_equal(np.isnan(u), np.isnan(v)):
            return float("inf")
        if u.size:
            worst = max(worst, float(np.nanmax(np.abs(u - v), initial=0.0)))
    return worst


def split(a):
    # The spec of a result and how many examples each device holds.
    return {"spec": str(a.sharding.spec),
            "rows": sorted(int(s.data.shape[0]) for s in a.addressable_shards)}


# ---- estimators on a batch split over an Explicit mesh (jax.make_mesh's default)
model = js.models.MLP(12, [16, 16], 4, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (8, 12))
labels = jnp.arange(8) % 4
key = jax.random.key(0)
eta = js.noise.RelativeNorm(0.05)
mesh = jax.make_mesh((4,), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
kw = dict(site="h1", noise=eta, key=key, num_samples=70, chunk_size=10)
calls = {
    "sampled": lambda v: js.sampled(model, v, labels=labels, **kw),
    "sampled_weight": lambda v: js.sampled(model, v, site="layers/1/kernel",
                                           noise=js.noise.WeightRelative(0.1), key=key,
                                           num_samples=40),
    "linearized": lambda v: js.linearized(model, v, site="h1", noise=eta),
    "bound": lambda v: js.bound(model, v, site="h0", noise=eta),
    "moments": lambda v: js.propagate_moments(model, v, site="input",
                                              noise=js.noise.Absolute(0.1),
                                              method="layerwise_diag"),
}
report["estimators"] = {}
ones = {}
for name, call in calls.items():
    ones[name], many = call(x), call(xs)
    report["estimators"][name] = {"diff": diff(ones[name], many), **split(many.mean),
                                  "cov": str(many.delta_cov.sharding.spec)}

# ---- profile on an Auto mesh (jaxsens.devices.make_mesh), batch split; its numbers
# against one device are the runner's below
auto = devices.make_mesh("auto")
xa = jax.device_put(x, devices.batch_sharding(auto))
table = js.profile(model, xa, noise=eta, levels=[0.05, 0.1], estimators=["bound"])
report["profile"] = {**split(table.deviation.mean[0, 0, 0]),
                     "spec": str(table.deviation.mean.sharding.spec)}

# ---- Monte Carlo draws split over the devices: a batch of 3 does not divide over 4
x3 = x[:3]
draws = NamedSharding(auto, P("data"))
report["draws"] = {
    "sampled": diff(js.sampled(model, x3, **kw), js.sampled(model, x3, draw_sharding=draws,
                                                           **kw)),
    "profile": diff(js.profile(model, x3, noise=eta, levels=[0.1], key=key, num_samples=30,
                               estimators=["sampled"]).deviation,
                    js.profile(model, x3, noise=eta, levels=[0.1], key=key, num_samples=30,
                               estimators=["sampled"], draw_sharding=draws).deviation),
}
# ... and both at once: examples over one mesh axis, draws over the other
grid = jax.make_mesh((2, 2), ("data", "draws"))
xg = jax.device_put(x, NamedSharding(grid, P("data")))
both = js.sampled(model, xg, labels=labels, draw_sharding=NamedSharding(grid, P("draws")),
                  **kw)
report["draws"]["both"] = diff(ones["sampled"], both)
report["draws"]["both_split"] = split(both.mean)
try:
    js.sampled(model, xg, draw_sharding=NamedSharding(grid, P("data")), **kw)
except ValueError as err:
    report["draws"]["overlap_error"] = str(err)

# ---- data-parallel training: 90 examples in batches of 16 (the last, 10, replicated)
ds = data.load("gaussian", n_train=90, n_test=30, dim=12, num_classes=4, key=0)
terms = [(1.0, js.losses.CrossEntropy()),
         (0.5, js.losses.NoiseLoss(site="h0", noise=js.noise.RelativeNorm(0.1)))]


optimizer = js.train.make_optimizer("adam", 1e-2)  # one object: its compiled steps are reused


def fit(mesh, epochs=2, directory=None):
    return js.train.train(js.models.MLP(12, [16, 16], 4, rngs=nnx.Rngs(0)), ds,
                          optimizer=optimizer, loss_terms=terms,
                          epochs=epochs, batch_size=16, eval_batch_size=8,
                          key=jax.random.key(3), progress=False, mesh=mesh,
                          checkpoint_dir=directory)


def history(result):
    return [{k: v for k, v in h.items() if k not in js.train.TIME_KEYS}
            for h in result.history]


def params(result):
    return nnx.state(result.model, nnx.Param)


one, many = fit(None), fit(auto)
kernel = many.model.layers[0].kernel.get_value()
report["train"] = {"one": history(one), "many": history(many),
                   "params": diff(params(one), params(many)),
                   "replicated": bool(kernel.is_fully_replicated),
                   "devices": len(kernel.sharding.device_set)}
with tempfile.TemporaryDirectory() as d:
    fit(auto, 1, d)
    resumed = fit(auto, 2, d)  # restores epoch 1 onto the mesh
    longer = fit(None, 3, d)  # a mesh checkpoint restores on one device
    loaded = js.train.load_checkpoint(d, js.models.MLP(12, [16, 16], 4, rngs=nnx.Rngs(0)),
                                      epoch=2)
    kernel = resumed.model.layers[0].kernel.get_value()
    report["checkpoint"] = {
        "resumed": history(resumed), "longer": history(longer)[:2],
        "resumed_params": diff(params(many), params(resumed)),
        "loaded_params": diff(params(many), nnx.state(loaded.model, nnx.Param)),
        "replicated": bool(kernel.is_fully_replicated),
        "devices": len(kernel.sharding.device_set)}

# ---- the runner: devices auto (4) against a mesh of one device; no training (the mesh
# training is the multi-process test's), the analyses' profile on a split batch
config = {
    "name": "devices", "seed": 0,
    "data": {"name": "gaussian",
             "options": {"n_train": 64, "n_test": 16, "dim": 6, "num_classes": 3}},
    "model": {"kind": "mlp", "widths": [8]},
    "train": {"epochs": 0},
    "analyses": [{"kind": "activation_noise", "noise": {"law": "relative_norm"},
                  "levels": [0.1], "samples": 8, "examples": 8,
                  "estimators": ["sampled", "linearized"]}],
    "output": {"figures": False, "report": False},
}
runs = {}
with tempfile.TemporaryDirectory() as d:
    for name, section in (("one", {"mesh": [1]}),
                          ("many", {"mesh": "auto", "split_examples": True})):
        res = runner.run_experiment(parse_config({**config, "devices": section}),
                                    f"{d}/{name}", quiet=True)
        runs[name] = json.loads(open(f"{d}/{name}/results.json").read())
        runs[name + "_file"] = json.loads(open(f"{d}/{name}/devices.json").read())
report["runner"] = runs
print("REPORT " + json.dumps(report))
"""

# Fast compiles (as conftest sets them for the suite) and four host devices.
_FLAGS = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
          "--xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def four():
    """The report of :data:`_SCRIPT`, run once with four forced host devices."""
    env = dict(os.environ, XLA_FLAGS=_FLAGS, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[0].removeprefix("REPORT "))


@pytest.mark.parametrize("name", ["sampled", "sampled_weight", "linearized", "bound",
                                  "moments"])
def test_estimators_on_a_split_batch_match_one_device_and_stay_split(four, name):
    got = four["estimators"][name]
    assert got["diff"] < 1e-5  # float32; the same draws, examples and formulas
    assert got["spec"] == "P('data',)" and got["rows"] == [2, 2, 2, 2]
    assert got["cov"].startswith("P('data'")


def test_profile_on_a_split_batch_stays_split(four):
    assert four["profile"]["spec"] == "P(None, None, None, 'data')"  # (site, level, est, B)
    assert four["profile"]["rows"] == [2, 2, 2, 2]


def test_draws_split_over_devices_give_one_device_numbers(four):
    d = four["draws"]
    assert d["sampled"] < 1e-5 and d["profile"] < 1e-5 and d["both"] < 1e-5
    assert d["both_split"]["rows"] == [4, 4, 4, 4]  # 'data' splits 8 examples in 2
    assert "already split the batch" in d["overlap_error"]


def _assert_histories_close(a, b):
    assert len(a) == len(b)
    for ha, hb in zip(a, b, strict=True):
        assert ha.keys() == hb.keys()
        for k in ha:
            np.testing.assert_allclose(ha[k], hb[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_data_parallel_training_matches_one_device(four):
    t = four["train"]
    _assert_histories_close(t["one"], t["many"])
    assert t["one"][-1]["train_noise"] > 0  # the robustness term took part
    assert t["params"] < 1e-5
    assert t["replicated"] and t["devices"] == 4


def test_sharded_checkpoints_resume_on_a_mesh_and_on_one_device(four):
    c, t = four["checkpoint"], four["train"]
    _assert_histories_close(c["resumed"], t["many"])
    _assert_histories_close(c["longer"], t["many"])
    assert c["resumed_params"] < 1e-6 and c["loaded_params"] < 1e-6
    assert c["replicated"] and c["devices"] == 4


def test_runner_devices_section(four):
    r = four["runner"]
    assert r["many_file"]["mesh"] == {"shape": [4], "axes": ["data"]}
    assert r["many_file"]["devices"] == [0, 1, 2, 3] and r["one_file"]["mesh"] is None
    one, many = (dict(r[k]) for k in ("one", "many"))
    assert one.pop("devices") == r["one_file"] and many.pop("devices") == r["many_file"]
    assert one.keys() == many.keys()
    assert one["clean_test_accuracy"] == many["clean_test_accuracy"]
    rows = [(a, b) for a, b in zip(one["analyses"][0]["records"],
                                   many["analyses"][0]["records"], strict=True)]
    assert rows and all(a["estimator"] == b["estimator"] for a, b in rows)
    for a, b in rows:
        for k, v in a.items():
            if isinstance(v, float):
                np.testing.assert_allclose(v, b[k], rtol=1e-4, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------- one device
def test_make_mesh_checks_its_shape():
    mesh = devices.make_mesh("auto", ("data", "model"))
    assert mesh.shape == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="needs 999 devices"):
        devices.make_mesh([999])
    with pytest.raises(ValueError, match="one size >= 1 per axis"):
        devices.make_mesh([1], ("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        devices.make_mesh([1, 1], ("a", "a"))


def test_one_device_runs_the_one_device_program():
    """Without a split batch or draws there is no plan: the kernel of old."""
    x = jax.numpy.ones((4, 3))
    assert plan(x) is None and plan(np.ones((4, 3))) is None
    one = devices.make_mesh("auto")
    assert plan(jax.device_put(x, devices.batch_sharding(one))) is None  # a 1-device mesh
    with pytest.raises(ValueError, match="draw_sharding must be a NamedSharding"):
        plan(x, P("data"))
    assert plan(x, NamedSharding(one, P("data"))).draws == ("data",)


@pytest.mark.parametrize("section,message", [
    ({"mesh": [2], "axes": ["a", "b"]}, "one size per axis"),
    ({"mesh": "all"}, "mesh must be 'auto' or a list"),
    ({"mesh": [0]}, "mesh must be 'auto' or a list"),
    ({"axes": ["a", "a"], "mesh": [1, 1]}, "distinct"),
    ({"axis": ["a"]}, "did you mean 'axes'"),
])
def test_devices_section_errors_are_one_line(section, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config({"devices": section})
    assert "\n" not in str(err.value) and "devices" in str(err.value)


def test_mesh_needing_more_devices_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**SWEEP, "devices": {"mesh": [64]}}))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "devices.mesh" in err and "needs 64 devices" in err
    assert not (tmp_path / "r").exists()


SWEEP = {
    "name": "sliced",
    "data": {"name": "gaussian",
             "options": {"n_train": 32, "n_test": 8, "dim": 4, "num_classes": 2}},
    "model": {"kind": "mlp", "widths": [4]},
    "train": {"epochs": 0},
    "analyses": [{"kind": "activation_noise", "noise": {"law": "relative_norm"},
                  "levels": [0.1], "samples": 4, "examples": 4,
                  "estimators": ["linearized"]}],
    "output": {"figures": False},
}


def test_sweep_slices_are_disjoint_and_the_report_gathers_them(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(SWEEP))
    parent = tmp_path / "sweep"
    grid = ["sweep", str(cfg), "--grid", "seed=0,1,2", "--out", str(parent), "--quiet"]
    names = [f"seed={s}" for s in range(3)]
    assert cli.main([*grid, "--shard", "1/2"]) == 0
    assert [(parent / n / "results.json").exists() for n in names] == [False, True, False]
    manifest = json.loads((parent / "sweep.json").read_text())
    assert [p["dir"] for p in manifest["points"]] == names  # the whole grid, from any slice
    assert cli.main([*grid, "--shard", "0/2"]) == 0
    assert all((parent / n / "results.json").exists() for n in names)
    assert cli.main([*grid, "--shard", "1/2"]) == 0  # its point is finished: skipped
    assert "[skip] seed=1: finished" in capsys.readouterr().err
    assert json.loads((parent / "sweep.json").read_text()) == manifest
    (parent / "comparison.md").unlink()
    assert cli.main(["report", str(parent)]) == 0
    table = capsys.readouterr().out
    assert "missing" not in (parent / "comparison.md").read_text()
    assert all(f"| {s} | ok |" in table for s in range(3)), table


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "3/2"])
def test_sweep_shard_must_name_a_slice(tmp_path, capsys, shard):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(SWEEP))
    assert cli.main(["sweep", str(cfg), "--grid", "seed=0,1", "--out", str(tmp_path / "s"),
                     "--shard", shard]) == 2
    assert "--shard must look like I/N" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags,message", [
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--process-id", "-1"], "--process-id must be >= 0"),
])
def test_bad_process_flags_fail_in_one_line(tmp_path, capsys, flags, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SWEEP))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()

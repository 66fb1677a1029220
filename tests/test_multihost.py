"""``jaxsens run`` as two processes on loopback (JAX's CPU collectives, gloo) gives the
results of one process; only process 0 writes the run directory, and a killed run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jaxsens import cli

pytestmark = pytest.mark.skipif(sys.platform == "win32",
                                reason="jaxlib has no gloo CPU collectives on Windows")

CONFIG = {
    "name": "twohosts",
    "seed": 1,
    "data": {"name": "gaussian",
             "options": {"n_train": 48, "n_test": 16, "dim": 6, "num_classes": 3}},
    "model": {"kind": "mlp", "widths": [8]},
    "train": {"epochs": 2, "batch_size": 16},
    "analyses": [{"kind": "activation_noise", "noise": {"law": "relative_norm"},
                  "levels": [0.1], "samples": 8, "examples": 8,
                  "estimators": ["linearized"]}],
    "output": {"figures": False},
}

# One process of the run: counts the files jaxsens itself writes (orbax's checkpoint
# files are written by the processes together, see jaxsens.train).
_WORKER = """
import sys
import jaxsens.io as io
writes = []
real = io.atomic_write_bytes
def spy(path, data):
    writes.append(str(path))
    real(path, data)
io.atomic_write_bytes = spy
from jaxsens import cli
status = cli.main(sys.argv[1:])
print("JAXSENS_WRITES", len(writes), flush=True)
sys.exit(status)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(config, out) -> list[tuple[int, str, str]]:
    """``jaxsens run`` as processes 0 and 1 of one run; (status, stdout, stderr) each."""
    port = _free_port()
    env = dict(os.environ, MPLBACKEND="Agg")
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, "run", str(config), "--out", str(out), "--device",
         "cpu", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            outputs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:  # one failed: the other would wait for it
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outputs


def _writes(stdout: str) -> int:
    return next(int(line.split()[1]) for line in stdout.splitlines()
                if line.startswith("JAXSENS_WRITES"))


def _comparable(run_dir):
    """results.json without what differs by construction (the devices), and the metrics
    without wall times."""
    results = json.loads((run_dir / "results.json").read_text())
    devices = results.pop("devices")
    metrics = [{k: v for k, v in m.items() if k not in ("epoch_time", "steps_per_second")}
               for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    return results, metrics, devices


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=path)
    else:
        assert a == b, path


def test_two_processes_run_one_experiment_and_resume(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    single = tmp_path / "single"
    assert cli.main(["run", str(config), "--out", str(single), "--quiet"]) == 0
    ref_results, ref_metrics, ref_devices = _comparable(single)
    assert ref_devices["process_count"] == 1 and ref_devices["mesh"] is None

    out = tmp_path / "two"
    (s0, o0, e0), (s1, o1, e1) = _two_processes(config, out)
    assert s0 == 0 and s1 == 0, f"process 0:\n{e0[-3000:]}\nprocess 1:\n{e1[-3000:]}"
    results, metrics, devices = _comparable(out)
    assert devices["process_count"] == 2 and devices["mesh"] == {"shape": [2],
                                                                 "axes": ["data"]}
    _close(results, ref_results)
    _close(metrics, ref_metrics)
    assert _writes(o0) > 0 and _writes(o1) == 0  # only process 0 writes the run directory
    assert "results:" in o0 and "results:" not in o1

    # A run killed after its first epoch: the last checkpoint and the results are gone.
    shutil.rmtree(out / "checkpoints" / "2")
    for name in ("results.json", "results.csv", "report.md"):
        (out / name).unlink()
    shutil.rmtree(out / "analyses")
    (s0, o0, e0), (s1, o1, e1) = _two_processes(config, out)
    assert s0 == 0 and s1 == 0, f"process 0:\n{e0[-3000:]}\nprocess 1:\n{e1[-3000:]}"
    assert "resuming training from epoch 1 of 2" in e0
    results, metrics, _ = _comparable(out)
    _close(results, ref_results)
    _close(metrics, ref_metrics)
    assert _writes(o1) == 0

"""The CLI keeps compiled programs between processes (JAX's persistent compilation cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

CONFIG = {
    "name": "cache",
    "seed": 0,
    "data": {"name": "gaussian",
             "options": {"n_train": 64, "n_test": 32, "dim": 6, "num_classes": 3}},
    "model": {"kind": "mlp", "widths": [8]},
    "train": {"epochs": 1, "batch_size": 32},
    "analyses": [{"kind": "activation_noise", "noise": {"law": "relative_norm"},
                  "levels": [0.1], "samples": 8, "examples": 4,
                  "estimators": ["linearized"]}],
}


# `jaxsens run` in a fresh process, counting the persistent-cache hits JAX reports.
_SCRIPT = """
import sys
import jax
from jaxsens import cli
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
status = cli.main(sys.argv[1:])
print("CACHE_HITS", len(hits))
sys.exit(status)
"""


def _run(tmp_path, out: str, cache: str) -> tuple[int, int, str]:
    env = dict(os.environ, JAXSENS_COMPILE_CACHE=cache, MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "run", str(tmp_path / "c.yaml"), "--out",
         str(tmp_path / out), "--quiet"], env=env, capture_output=True, text=True,
        timeout=600, check=False)
    hits = [int(line.split()[1]) for line in proc.stdout.splitlines()
            if line.startswith("CACHE_HITS")]
    return proc.returncode, hits[0] if hits else -1, proc.stderr


def test_second_process_finds_the_compiled_programs(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    cache = tmp_path / "xla"
    code, hits, err = _run(tmp_path, "a", str(cache))
    assert code == 0 and hits == 0, err
    entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert entries, "nothing was cached"
    code, hits, err = _run(tmp_path, "b", str(cache))
    assert code == 0, err
    # Which programs take long enough to compile to be kept (> 0.2 s) depends on the
    # machine and its load; every one that was kept must be found.
    assert hits >= 1, "no compiled program came from the cache"
    # Found, not rewritten: the first run's files are untouched (the second may add a
    # program whose compile time crossed the threshold only this time).
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert all(after.get(name) == mtime for name, mtime in entries.items())
    code, hits, err = _run(tmp_path, "c", "off")
    assert code == 0 and hits == 0, err

"""The README's "library in ten lines" runs as written and gives what it says."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


def test_readme_library_example_runs():
    namespace: dict = {}
    exec(compile(_first_python_block(), str(README), "exec"), namespace)  # noqa: S102
    js = namespace["js"]
    r, p, b, table = (namespace[n] for n in ("r", "p", "b", "table"))
    assert js.activation_sites(namespace["model"]) == ("h0", "h1")
    for arr in (r.mean, r.stderr, p.mean, p.rms, b.upper):
        assert arr.shape == (32,) and bool(jnp.all(jnp.isfinite(arr)))
    # Sampled within a few standard errors of the prediction at 5%; the bound above both.
    assert np.all(np.abs(np.asarray(r.mean) - np.asarray(p.mean)) < 0.05 * np.asarray(p.mean)
                  + 5 * np.asarray(r.stderr))
    assert np.all(np.asarray(b.upper) >= np.asarray(r.quantiles[:, -1]))
    assert table.deviation.mean.shape == (2, 3, 4, 32)

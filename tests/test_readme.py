"""The README's Python examples ("library in ten lines", "Training and analysis from Python")
run as written and give what they say."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


def _python_block_under(heading: str) -> str:
    """The first python block of the README section ``## heading``."""
    section = README.read_text().split(f"\n## {heading}\n", 1)
    assert len(section) == 2, f"the README has no section {heading!r}"
    body = section[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"the README section {heading!r} has no python example"
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


def test_readme_training_example_runs(tmp_path, monkeypatch, capsys):
    """Data, training, profile and a figure from Python, as the README shows them."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    code = _python_block_under("Training and analysis from Python")
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert namespace["result"].history[-1]["test_accuracy"] > 0.5
    table = namespace["table"]
    assert table.sites == ("h0", "h1")
    assert table.deviation.mean.shape == (2, 4, len(table.estimators), 64)
    for e in ("sampled", "linearized"):
        assert bool(jnp.all(jnp.isfinite(namespace["mean"][:, :, table.estimators.index(e)])))
    assert printed.startswith("test accuracy") and "h1: sampled" in printed
    assert (tmp_path / "deviation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_bring_your_own_model_runs():
    """The user-written residual CNN gets every estimator; the bound holds for the draws."""
    namespace: dict = {}
    exec(compile(_python_block_under("Bring your own model"), str(README), "exec"),  # noqa: S102
         namespace)
    js, model, x, table, b, m = (namespace[n] for n in ("js", "model", "x", "table", "b", "m"))
    assert table.sites == ("stem", "block0", "block1")
    for e in ("sampled", "linearized", "bound"):  # at every site (moments: input noise only)
        assert all(row[table.estimators.index(e)] for row in table.present), e
    assert m.delta_mean.shape == (16, 10) and m.delta_cov.shape == (16, 10, 10)
    assert bool(jnp.all(jnp.isfinite(m.rms)))
    s = js.sampled(model, x, site="stem", noise=namespace["eta"], key=namespace["key"],
                   num_samples=200, quantiles=(1.0,))
    assert np.all(np.asarray(s.quantiles[:, 0]) <= np.asarray(b.upper))

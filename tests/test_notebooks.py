"""The notebooks are committed clean and listed on the documentation site.

CI executes every notebook (``.ci/run``: ``pytest --nbmake`` on copies); these checks are
the cheap part: no outputs in the repository, a title for the site's navigation, a kernel
that any environment with ipykernel has, and no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"hidden_layer_noise", "weight_noise", "gaussian_moments",
            "training_for_robustness", "bring_your_own_model"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "a notebook without code"
    for i, cell in enumerate(code):
        assert not cell.get("outputs"), f"code cell {i} has outputs: clear them"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_title_and_downloads_nothing(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and first.startswith("# ")
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for word in ("urlopen", "requests.get", "download=True", "wget ", "curl "):
        assert word not in code, f"{path.name} downloads ({word!r})"

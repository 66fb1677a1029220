"""The generated documentation pages cover the code they are generated from.

``docs/gen_pages.py`` builds the config reference from the pydantic schema and one API page
per public module at every ``mkdocs build``; these tests run the generators without MkDocs
(CI also builds the site with ``mkdocs build --strict``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("docs_gen_pages", ROOT / "docs" / "gen_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(gen) -> str:
    return gen.config_reference()


def _rows(page: str, heading: str) -> set[str]:
    """The field names of the table under ``heading``."""
    body = page.split(heading, 1)[1]
    body = re.split(r"\n#{2,4} ", body, maxsplit=1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", body, flags=re.MULTILINE))


def test_config_reference_lists_every_kind_and_field(reference):
    from jaxsens.analyses import KINDS

    for name, kind in KINDS.items():
        heading = f"### `{name}` {{#kind-{name.replace('_', '-')}}}"
        assert heading in reference, f"kind {name!r} missing from the config reference"
        expected = set(kind.config.model_fields) - {"kind"}
        assert _rows(reference, heading) == expected, name


def test_config_reference_lists_every_section(reference):
    from jaxsens.config import ExperimentConfig

    assert _rows(reference, "## ExperimentConfig {#experimentconfig}") == set(
        ExperimentConfig.model_fields)
    for name, field in ExperimentConfig.model_fields.items():
        cls = field.annotation
        if isinstance(cls, type) and hasattr(cls, "model_fields"):
            heading = f"## {cls.__name__} {{#{cls.__name__.lower()}}}"
            assert _rows(reference, heading) == set(cls.model_fields), name


def test_config_reference_reads_choices_from_the_registries(reference):
    from jaxsens.estimators import ESTIMATORS
    from jaxsens.losses import LOSSES
    from jaxsens.schema import LAW_NAMES

    for names in (ESTIMATORS, LOSSES, LAW_NAMES):
        for name in names:
            assert f"`{name}`" in reference


def test_api_pages_cover_every_public_name(gen):
    modules = gen.public_modules()
    assert {"jaxsens", "jaxsens.estimators", "jaxsens.noise", "jaxsens.moments",
            "jaxsens.bounds", "jaxsens.graph", "jaxsens.config"} <= set(modules)
    rendered: dict[str, str] = {}
    for name in modules:
        page = gen.api_page(name)
        module = importlib.import_module(name)
        for public in gen.public_names(module):
            assert (f"::: {name}.{public}\n" in page or f"| `{name}.{public}` |" in page), (
                f"{name}.{public} is on no API page")
        for ident in re.findall(r"^::: (\S+)$", page, flags=re.MULTILINE):
            obj = gen._lookup(ident)[1]
            if callable(obj) and ident != name:
                assert id(obj) not in rendered, (
                    f"{ident} is rendered twice (also as {rendered.get(id(obj))})")
                rendered[id(obj)] = ident


@pytest.mark.parametrize(("target", "context", "expected"), [
    ("split", "jaxsens.sites.activation_sites", "jaxsens.sites.split"),
    ("jaxsens.linearized", "jaxsens.losses", "jaxsens.estimators.linearized"),
    ("Deviation.has", "jaxsens.estimators._profile.Profile",
     "jaxsens.estimators.Deviation.has"),
    ("jaxsens.graph", "jaxsens.estimators._bound.bound", "jaxsens.graph"),
    ("example_index", "jaxsens.estimators._sampled.sampled_body", None),
    ("jax.jit", "jaxsens.sites", None),
])
def test_docstring_references_resolve_to_api_pages(gen, target, context, expected):
    assert gen.identifier(target, context) == expected

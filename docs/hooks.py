"""MkDocs hooks: pages generated from the code at every build (see ``gen_pages.py``).

* ``reference/config.md``: the experiment config reference, from the pydantic schema;
* ``api/<module>.md``: one API page per public module (mkdocstrings directives);
* ``notebooks/<name>.ipynb``: every notebook of ``notebooks/``, rendered by mkdocs-jupyter.
  With ``JAXSENS_DOCS_NOTEBOOKS=DIR`` the copies in DIR are used instead — executed ones,
  with their outputs (``.ci/run`` executes the notebooks once, then builds from those).

The nav sections "API reference" and "Notebooks" are filled here from what exists, so a
new module or notebook appears without an edit to ``mkdocs.yml``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

_HERE = Path(__file__).resolve().parent


def _gen() -> Any:
    spec = importlib.util.spec_from_file_location("jaxsens_docs_gen_pages",
                                                  _HERE / "gen_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen()


def _notebook_dir() -> Path:
    chosen = os.environ.get("JAXSENS_DOCS_NOTEBOOKS")
    folder = Path(chosen).resolve() if chosen else gen.NOTEBOOKS
    if folder.name != "notebooks" or not folder.is_dir():
        raise ValueError(f"JAXSENS_DOCS_NOTEBOOKS={chosen!r} must be a folder named "
                         "'notebooks' (the pages' URLs are notebooks/<name>/)")
    return folder


def _fill(nav: list, title: str, entries: list) -> None:
    for item in nav:
        if isinstance(item, dict) and title in item:
            item[title] = entries
            return
    nav.append({title: entries})


def on_config(config, **kwargs):
    """Fill the generated nav sections."""
    nav = config["nav"]
    api = [{name: f"api/{name}.md"} for name in gen.public_modules()]
    _fill(nav, "API reference", api)
    books = [{gen.notebook_title(p): f"notebooks/{p.name}"}
             for p in gen.notebooks(_notebook_dir())]
    _fill(nav, "Notebooks", books)
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns notebooks into pages
def on_files(files: Files, config, **kwargs) -> Files:
    """Add the generated pages and the notebooks."""
    files.append(File.generated(config, "reference/config.md",
                                content=gen.config_reference()))
    for name in gen.public_modules():
        files.append(File.generated(config, f"api/{name}.md", content=gen.api_page(name)))
    folder = _notebook_dir()
    for path in gen.notebooks(folder):
        # A file of a source folder (not File.generated): mkdocs-jupyter wraps it, and its
        # wrapper reads the path from the source folder.
        files.append(File(f"notebooks/{path.name}", src_dir=str(folder.parent),
                          dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files

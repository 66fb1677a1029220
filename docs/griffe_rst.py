"""A Griffe extension: the reStructuredText bits of the docstrings, as Markdown.

The docstrings are Google style with Sphinx roles and math blocks. This rewrites, before
mkdocstrings renders them:

* ``:func:`name``` (and ``:class:``, ``:data:``, ``:mod:``, ``:meth:``, ``:attr:``,
  ``:obj:``, ``:exc:``; ``~`` shows the last component only) into a link to the API page
  that renders the object, or into inline code when no page does (an optional
  cross-reference: it never breaks a strict build);
* ``.. math::`` blocks into fenced blocks of the LaTeX source (the site loads no math
  renderer).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import griffe

_spec = importlib.util.spec_from_file_location(
    "jaxsens_docs_gen_pages_griffe", Path(__file__).resolve().parent / "gen_pages.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|obj|exc):`(~?)([^`]+)`")


def roles_to_markdown(text: str, context: str) -> str:
    """Replace the Sphinx roles of ``text`` (a docstring of the object at ``context``)."""

    def replace(m: re.Match) -> str:
        tilde, target = m.group(1), m.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        ident = gen.identifier(target, context)
        if ident is None:
            return f"`{shown}`"
        return f'<autoref identifier="{ident}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(replace, text)


def math_to_markdown(text: str) -> str:
    """Replace every ``.. math::`` block by a fenced block of its source."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        body = [stripped[len(".. math::"):].strip()] if stripped[len(".. math::"):].strip() \
            else []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        depth = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        out += [f"{indent}```text", *(indent + b[depth:] for b in body), f"{indent}```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite Sphinx roles and math blocks of every docstring (see the module)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place."""
        if obj.docstring is None:
            return
        value = obj.docstring.value
        if ":" in value:
            value = roles_to_markdown(math_to_markdown(value), obj.path)
        obj.docstring.value = value

"""Atomic file writes for run directories: a killed run never leaves a half-written file."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["atomic_write_text", "atomic_write_bytes", "write_json", "write_csv", "write_yaml",
           "clean_json"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    The temporary file is flushed and fsynced before ``os.replace``, so ``path`` holds either
    its old contents or all of ``data``; missing parent folders are created, and the
    temporary file is removed if anything fails.

    Args:
      path: the file to write (replaced if it exists).
      data: the bytes to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded (see :func:`atomic_write_bytes`).

    Args:
      path: the file to write (replaced if it exists).
      text: the text to write.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_json(obj: Any) -> Any:
    """Plain JSON data: NaN/inf become None, numpy scalars become Python numbers.

    Args:
      obj: nested mappings, lists and tuples of values; 0-d arrays and NumPy / JAX scalars
        are converted with ``.item()``.

    Returns:
      A copy with mappings as dicts (keys as ``str``), lists and tuples as lists,
      0-d arrays and scalars as Python numbers, and non-finite floats as ``None``; other
      values are returned as they are.
    """
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, after :func:`clean_json`.

    Args:
      path: the file to write (replaced if it exists).
      obj: JSON-like data (NaN and infinities are written as ``null``).
    """
    atomic_write_text(path, json.dumps(clean_json(obj), indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as YAML (``yaml.safe_dump``, key order kept) to ``path`` atomically.

    Args:
      path: the file to write (replaced if it exists).
      obj: YAML-safe data, passed through :func:`clean_json` first.
    """
    atomic_write_text(path, yaml.safe_dump(clean_json(obj), sort_keys=False))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` as a CSV table to ``path`` atomically.

    The columns are the union of the rows' keys in order of first appearance; a row
    without a column, ``None`` and non-finite values give empty cells.

    Args:
      path: the file to write (replaced if it exists).
      rows: one mapping per row (values cleaned by :func:`clean_json`); no rows give an
        empty header line.
    """
    rows = list(rows)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in clean_json(dict(r)).items()})
    atomic_write_text(path, buf.getvalue())

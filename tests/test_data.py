"""Tests for jaxsens.data: loaders, file formats, synthetic data, splits, batching, registry."""

import gzip
import hashlib
import json
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsens import data

# ------------------------------------------------------------------------------------------
# Offline digits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "side", "n_total"), [("mnist5k", 28, 5000), ("sklearn8x8", 8, 1797)]
)
def test_digits_shapes_labels_and_range(source, side, n_total):
    ds = data.load_digits(source)
    assert ds.x_train.shape[1:] == (side, side, 1) == ds.input_shape
    assert ds.n_train + ds.n_test == n_total
    assert ds.n_test == round(0.2 * n_total)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))
    # Real digits are mostly background with a substantial stroke.
    assert 0.05 < ds.x_train.mean() < 0.5


def test_digits_split_is_stratified_deterministic_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(np.bincount(a.y_test), np.full(10, 100))
    # No test image also appears in train: the split partitions the 5,000 images.
    train_rows = {r.tobytes() for r in a.x_train.reshape(a.n_train, -1)}
    assert not any(r.tobytes() in train_rows for r in a.x_test.reshape(a.n_test, -1))
    other = data.load_digits(seed=1)
    assert not np.array_equal(other.y_train, a.y_train)


def test_digits_results_do_not_alias_the_cache():
    ds = data.load_digits()
    ds.x_train[:] = -1.0
    assert data.load_digits().x_train.min() == 0.0


def test_digits_unknown_source():
    with pytest.raises(ValueError, match="valid sources: mnist5k, sklearn8x8"):
        data.load_digits("emnist")


# ------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------

_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the spec: 0x00 0x00, type 0x08 (uint8), ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder: Path, compressed: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 7, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for part, array in arrays.items():
        raw = _idx_bytes(array)
        if compressed:
            (folder / f"{_STEMS[part]}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / _STEMS[part]).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
def test_idx_round_trip(tmp_path, compressed):
    arrays = _write_idx_folder(tmp_path, compressed)
    ds = data.load_idx_dataset(tmp_path, "fashion_mnist", verify=False)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (7, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0] * 255, arrays["train_images"], atol=1e-4)
    np.testing.assert_allclose(ds.x_test[..., 0] * 255, arrays["test_images"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])


def test_read_idx_big_endian_types(tmp_path):
    values = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    raw = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.astype(">i4").tobytes()
    (tmp_path / "a.idx").write_bytes(raw)
    out = data.read_idx(tmp_path / "a.idx")
    np.testing.assert_array_equal(out, values)
    assert out.dtype == np.int32


def test_idx_bad_magic(tmp_path):
    _write_idx_folder(tmp_path, compressed=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x1234"):
        data.load_idx_dataset(tmp_path, verify=False)


def test_idx_truncated(tmp_path):
    _write_idx_folder(tmp_path, compressed=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: header declares shape"):
        data.load_idx_dataset(tmp_path, verify=False)


def test_idx_corrupt_gzip(tmp_path):
    _write_idx_folder(tmp_path, compressed=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: cannot decompress"):
        data.load_idx_dataset(tmp_path, verify=False)


def test_idx_count_mismatch(tmp_path):
    _write_idx_folder(tmp_path, compressed=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match="holds 7 images but train-labels-idx1-ubyte holds 5"):
        data.load_idx_dataset(tmp_path, verify=False)


def test_idx_published_checksum_mismatch(tmp_path):
    _write_idx_folder(tmp_path, compressed=True)
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte.gz: md5 checksum mismatch "
        r"\(expected f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ):
        data.load_idx_dataset(tmp_path, "mnist")


def test_idx_user_checksums(tmp_path):
    _write_idx_folder(tmp_path, compressed=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    ds = data.load_idx_dataset(tmp_path, checksums={path.name: good})
    assert ds.n_test == 3
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: sha256 checksum mismatch"):
        data.load_idx_dataset(tmp_path, checksums={path.name: "0" * 64}, verify=False)
    with pytest.raises(ValueError, match="unknown file name 'train-images.gz'; valid names: "):
        data.load_idx_dataset(tmp_path, checksums={"train-images.gz": good})
    with pytest.raises(ValueError, match="hex MD5 .32 chars. or SHA-256"):
        data.load_idx_dataset(tmp_path, checksums={path.name: "abc"})


def test_idx_missing_file(tmp_path):
    _write_idx_folder(tmp_path, compressed=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte.gz .*download=True"
    ):
        data.load_idx_dataset(tmp_path, "mnist", download=False)


def test_idx_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="valid names: mnist, fashion_mnist"):
        data.load_idx_dataset(tmp_path, "kmnist")


# ------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """The published layout: per row the 1024 red values, then green, then blue (row-major)."""
    return images.transpose(0, 3, 1, 2).reshape(images.shape[0], 3072)


def _write_cifar(folder: Path, n: int = 2, seed: int = 0) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images = rng.integers(0, 256, (6, n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (6, n))
    for name, im, lab in zip(names, images, labels, strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"data": _cifar_rows(im),
            b"labels": [int(v) for v in lab],
            b"filenames": [b"x.png"] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return images, labels


@pytest.mark.parametrize("nested", [True, False], ids=["parent", "batches-dir"])
def test_cifar10_round_trip(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "mine"
    images, labels = _write_cifar(folder)
    ds = data.load_cifar10(tmp_path if nested else folder, verify=False)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train * 255, images[:5].reshape(10, 32, 32, 3), atol=1e-4)
    np.testing.assert_allclose(ds.x_test * 255, images[5], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, labels[:5].reshape(-1))
    np.testing.assert_array_equal(ds.y_test, labels[5])


def test_cifar10_channel_planes_go_to_last_axis(tmp_path):
    _write_cifar(tmp_path)
    # A hand-built row: red plane all 255, green plane 0, blue plane = pixel index % 256.
    planes = [np.full(1024, 255), np.zeros(1024), np.arange(1024) % 256]
    row = np.concatenate(planes).astype(np.uint8)
    batch = {b"data": row[None], b"labels": [3]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    ds = data.load_cifar10(tmp_path, verify=False)
    img = ds.x_test[0] * 255
    np.testing.assert_allclose(img[..., 0], 255)
    np.testing.assert_allclose(img[..., 1], 0)
    # Blue plane is row-major: pixel (r, c) holds (32 r + c) % 256.
    assert img[0, 1, 2] == pytest.approx(1) and img[1, 0, 2] == pytest.approx(32)
    assert img[7, 31, 2] == pytest.approx((7 * 32 + 31) % 256)


def test_cifar10_published_checksum_mismatch(tmp_path):
    _write_cifar(tmp_path)
    with pytest.raises(ValueError, match="data_batch_1: md5 checksum mismatch"):
        data.load_cifar10(tmp_path)


def test_cifar10_refuses_unexpected_pickle_globals(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(ValueError, match=r"data_batch_3: .*collections.OrderedDict is not allowed"):
        data.load_cifar10(tmp_path, verify=False)


def test_cifar10_bad_layout(tmp_path):
    _write_cifar(tmp_path)
    batch = {b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' must be uint8 \(n, 3072\)"):
        data.load_cifar10(tmp_path, verify=False)


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_1, .*test_batch .*download"):
        data.load_cifar10(tmp_path, download=False)


# ------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------


def _assert_same(a: data.Dataset, b: data.Dataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_teacher_deterministic_and_key_dependent():
    kwargs = dict(n_train=300, n_test=100, dim=8, num_classes=4, hidden=(16,))
    a = data.teacher_dataset(jax.random.key(0), **kwargs)
    _assert_same(a, data.teacher_dataset(jax.random.key(0), **kwargs))
    # Legacy uint32 keys and int seeds are accepted too.
    _assert_same(a, data.teacher_dataset(jax.random.key_data(jax.random.key(0)), **kwargs))
    _assert_same(data.teacher_dataset(5, **kwargs), data.teacher_dataset(5, **kwargs))
    b = data.teacher_dataset(jax.random.key(1), **kwargs)
    assert not np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.y_train, b.y_train)
    assert a.x_train.shape == (300, 8) and a.input_shape == (8,) and a.name == "teacher"


def test_teacher_labels_are_teacher_argmax_and_balanced():
    key = jax.random.key(3)
    ds = data.teacher_dataset(key, n_train=4000, n_test=1000, dim=10, num_classes=5)
    teacher = data.teacher_mlp(key, dim=10, num_classes=5)
    np.testing.assert_array_equal(ds.y_train, teacher.logits(ds.x_train).argmax(axis=1))
    freq = np.bincount(ds.y_train, minlength=5) / ds.n_train
    assert freq.min() > 0.05, freq
    noisy = data.teacher_dataset(key, n_train=4000, n_test=1000, dim=10, num_classes=5, noise=1.0)
    np.testing.assert_array_equal(noisy.x_train, ds.x_train)
    agreement = np.mean(noisy.y_train == ds.y_train)
    assert 0.2 < agreement < 0.99


def test_gaussian_mixture_balanced_and_separable():
    ds = data.gaussian_mixture(
        jax.random.key(0), n_train=600, n_test=300, dim=20, num_classes=3, separation=8.0
    )
    np.testing.assert_array_equal(np.bincount(ds.y_train), [200, 200, 200])
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(3)])
    nearest = np.argmin(((ds.x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == ds.y_test) > 0.99
    _assert_same(
        ds,
        data.gaussian_mixture(
            jax.random.key(0), n_train=600, n_test=300, dim=20, num_classes=3, separation=8.0
        ),
    )


def test_gaussian_inputs_moments_and_jit():
    n, dim = 20000, 4
    mean = np.array([0.0, 1.0, -2.0, 3.0], np.float32)
    x = jax.jit(lambda k: data.gaussian_inputs(k, n, dim, mean=mean, std=2.0))(jax.random.key(0))
    assert x.shape == (n, dim) and x.dtype == np.float32
    x = np.asarray(x, np.float64)
    # Sample mean has standard error std/sqrt(n); sample variance std^2 * sqrt(2/n).
    np.testing.assert_allclose(x.mean(0), mean, atol=5 * 2.0 / np.sqrt(n))
    np.testing.assert_allclose(x.var(0), 4.0, atol=5 * 4.0 * np.sqrt(2 / n))


@pytest.mark.parametrize("bad", [-1, True, jax.random.split(jax.random.key(0), 2)])
def test_bad_keys_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="seed|key"):
        data.teacher_dataset(bad, n_train=4, n_test=4, dim=2, num_classes=2)


# ------------------------------------------------------------------------------------------
# Split, subsample, normalize
# ------------------------------------------------------------------------------------------


@pytest.fixture
def blobs() -> data.Dataset:
    return data.gaussian_mixture(
        jax.random.key(7), n_train=1000, n_test=200, dim=6, num_classes=4, separation=2.0
    )


def test_split_partitions_train_deterministically(blobs):
    a = data.split(blobs, val_fraction=0.2, seed=0)
    assert a.x_val.shape == (200, 6) and a.n_train == 800
    np.testing.assert_array_equal(np.bincount(a.y_val), [50, 50, 50, 50])
    merged = np.concatenate([a.x_train, a.x_val])
    np.testing.assert_array_equal(
        np.sort(merged.view(np.void), axis=0), np.sort(blobs.x_train.view(np.void), axis=0)
    )
    np.testing.assert_array_equal(a.x_test, blobs.x_test)
    b = data.split(blobs, val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    c = data.split(blobs, val_fraction=0.2, seed=jax.random.key(1))
    assert not np.array_equal(a.x_val, c.x_val)
    with pytest.raises(ValueError, match="already has a validation split"):
        data.split(a, val_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
        data.split(blobs, val_fraction=1.0, seed=0)


def test_subsample_deterministic_stratified_subset(blobs):
    a = data.subsample(blobs, n_train=100, n_test=40, seed=3)
    assert a.n_train == 100 and a.n_test == 40
    np.testing.assert_array_equal(np.bincount(a.y_train), [25, 25, 25, 25])
    rows = {r.tobytes() for r in blobs.x_train}
    assert all(r.tobytes() in rows for r in a.x_train)
    _assert_same(a, data.subsample(blobs, n_train=100, n_test=40, seed=3))
    assert not np.array_equal(a.x_train, data.subsample(blobs, n_train=100, seed=4).x_train)
    plain = data.subsample(blobs, n_train=99, seed=3, stratified=False)
    assert plain.n_train == 99 and plain.n_test == blobs.n_test
    with pytest.raises(ValueError, match=r"n_train must lie in \[1, 1000\]"):
        data.subsample(blobs, n_train=1001, seed=0)


def test_standardize_uses_train_statistics_only():
    ds = data.load_digits("sklearn8x8")
    rgb = data.Dataset(
        np.repeat(ds.x_train, 3, axis=-1) * np.array([1.0, 2.0, 3.0], np.float32),
        ds.y_train,
        np.repeat(ds.x_test, 3, axis=-1) + 5.0,
        ds.y_test,
        10,
        "rgb",
    )
    out, stats = data.normalize(rgb, "standardize")
    assert stats.shift.shape == (3,) and stats.scale.shape == (3,)
    flat_train = out.x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(flat_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat_train.std(0), 1.0, atol=1e-5)
    # Test data uses the train statistics: its shift of +5 survives as +5/std.
    expected = (rgb.x_test - stats.shift) / stats.scale
    np.testing.assert_allclose(out.x_test, expected, rtol=1e-6)
    assert out.x_test.reshape(-1, 3).mean(0).min() > 3.0
    # Changing the test set does not change the statistics.
    _, stats2 = data.normalize(rgb.replace(x_test=rgb.x_test * 0), "standardize")
    np.testing.assert_array_equal(stats.shift, stats2.shift)
    np.testing.assert_array_equal(stats.scale, stats2.scale)
    again, _ = data.normalize(rgb, "standardize")
    np.testing.assert_array_equal(again.x_train, out.x_train)


def test_minmax_none_val_and_stats_round_trip(blobs):
    ds = data.split(blobs, val_fraction=0.25, seed=0)
    mm, stats = data.normalize(ds, "minmax")
    assert mm.x_train.min() == pytest.approx(0.0) and mm.x_train.max() == pytest.approx(1.0)
    np.testing.assert_allclose(mm.x_val, (ds.x_val - stats.shift) / stats.scale, rtol=1e-6)
    same, ident = data.normalize(ds, "none")
    np.testing.assert_array_equal(same.x_train, ds.x_train)
    assert ident.method == "none"
    restored = data.NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(data.apply_normalization(ds, restored).x_test, mm.x_test)
    with pytest.raises(ValueError, match="valid methods: standardize, minmax, none"):
        data.normalize(ds, "zscore")


def test_constant_channel_gets_unit_scale():
    x = np.zeros((4, 2), np.float32)
    x[:, 1] = [1, 2, 3, 4]
    ds = data.Dataset(x, np.zeros(4, np.int32), x, np.zeros(4, np.int32), 2, "c")
    out, stats = data.normalize(ds)
    assert stats.scale[0] == 1.0 and np.all(np.isfinite(out.x_train))


# ------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, 0, jax.random.key(0)])
@pytest.mark.parametrize("n", [10, 12])
def test_batches_cover_each_example_once(key, n):
    x, y = np.arange(n) * 10, np.arange(n)
    out = list(data.batches(x, y, 4, key=key))
    assert len(out) == data.num_batches(n, 4) == -(-n // 4)
    assert all(len(bx) == 4 for bx, _ in out[:-1])
    seen = np.concatenate([by for _, by in out])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([bx for bx, _ in out]), seen * 10)
    if key is None:
        np.testing.assert_array_equal(seen, np.arange(n))


def test_batches_deterministic_and_key_dependent():
    x = y = np.arange(100)

    def order(key):
        return np.concatenate([b for _, b in data.batches(x, y, 16, key=key)])

    np.testing.assert_array_equal(order(jax.random.key(0)), order(jax.random.key(0)))
    assert not np.array_equal(order(jax.random.key(0)), order(jax.random.key(1)))
    assert not np.array_equal(order(jax.random.key(0)), np.arange(100))


def test_batches_drop_last_and_validation():
    x = y = np.arange(10)
    out = list(data.batches(x, y, 4, key=1, drop_last=True))
    assert [len(b) for _, b in out] == [4, 4] and data.num_batches(10, 4, drop_last=True) == 2
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.batches(x, y, 0)
    with pytest.raises(ValueError, match="x has 10 examples but y has 9"):
        data.batches(x, y[:9], 2)


def test_batches_accept_jax_arrays():
    x = jax.numpy.arange(12.0).reshape(6, 2)
    y = jax.numpy.arange(6)
    (bx, by), *_ = data.batches(x, y, 6, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(bx)[:, 0], 2 * np.asarray(by))


# ------------------------------------------------------------------------------------------
# Registry and container
# ------------------------------------------------------------------------------------------


def test_registry_names_and_errors(tmp_path):
    expected = ("digits", "digits8x8", "mnist", "fashion_mnist", "cifar10", "teacher", "gaussian")
    assert data.available() == expected
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; valid names: digits, digits8x8"):
        data.load("svhn")
    with pytest.raises(ValueError, match=r"load\('mnist'\): missing a required argument: 'folder'"):
        data.load("mnist")
    with pytest.raises(ValueError, match=r"load\('teacher'\): .*'widht'"):
        data.load("teacher", key=0, n_train=4, n_test=4, dim=2, num_classes=2, widht=3)


def test_registry_loads(tmp_path):
    assert data.load("digits8x8").input_shape == (8, 8, 1)
    _write_idx_folder(tmp_path, compressed=True)
    assert data.load("mnist", folder=tmp_path, verify=False).name == "mnist"
    t = data.load("teacher", key=jax.random.key(0), n_train=8, n_test=4, dim=3, num_classes=2)
    assert t.x_train.shape == (8, 3)
    g = data.load("gaussian", key=1, n_train=8, n_test=4, dim=3, num_classes=2)
    assert g.name == "gaussian"


def test_dataset_flat_pytree_and_validation(blobs):
    ds = data.split(data.load_digits("sklearn8x8"), val_fraction=0.1, seed=0)
    flat = ds.flat()
    assert flat.x_train.shape == (ds.n_train, 64) and flat.input_shape == (64,)
    assert flat.x_val.shape == (ds.x_val.shape[0], 64)
    np.testing.assert_array_equal(flat.x_test[3], ds.x_test[3].reshape(-1))
    leaves, treedef = jax.tree_util.tree_flatten(ds)
    assert len(leaves) == 6
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.name == ds.name and back.num_classes == 10
    with pytest.raises(ValueError, match=r"x_train \(3, 2\) and y_train \(2,\)"):
        data.Dataset(np.zeros((3, 2)), np.zeros(2), np.zeros((1, 2)), np.zeros(1), 2, "bad")
    with pytest.raises(ValueError, match="per-example shape"):
        data.Dataset(np.zeros((2, 2)), np.zeros(2), np.zeros((1, 3)), np.zeros(1), 2, "bad")

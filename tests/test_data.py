"""Tests for jaxcompress.data against the real files in $JAXCOMPRESS_DATA_DIR."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxcompress import data

DATA_DIR = os.environ.get("JAXCOMPRESS_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR or not os.path.isdir(DATA_DIR), reason="JAXCOMPRESS_DATA_DIR not available"
)

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def tfds_or_skip():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_datasets")


# ----------------------------------------------------------------------------- images


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_shapes_dtypes_and_counts(name):
    train = data.load(name, "train", backend="idx")
    test = data.load(name, "test", backend="idx")
    for ds, n in ((train, 60000), (test, 10000)):
        assert ds.x.shape == (n, 28, 28, 1) and ds.x.dtype == np.float32
        assert ds.y.shape == (n,) and ds.y.dtype == np.int32
        assert len(ds) == n and ds.num_classes == 10 and ds.name == name
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    if name == "fashion_mnist":
        assert np.bincount(train.y).tolist() == [6000] * 10
        assert np.bincount(test.y).tolist() == [1000] * 10
        assert train.class_names[9] == "Ankle boot"
        # Mean pixel from the data README (72.940 / 73.147 on the 0..255 scale).
        assert train.x.mean() * 255 == pytest.approx(72.940, abs=1e-3)
        assert test.x.mean() * 255 == pytest.approx(73.147, abs=1e-3)
    else:
        assert np.bincount(train.y).tolist() == MNIST_TRAIN_COUNTS
        assert np.bincount(test.y).tolist() == MNIST_TEST_COUNTS
        assert train.x.mean() * 255 == pytest.approx(33.318, abs=1e-3)


@needs_data
def test_loads_are_cached_and_read_only():
    a = data.mnist("test", backend="idx")
    b = data.load("mnist", "test", backend="idx", data_dir=DATA_DIR)
    assert a.x is b.x and a.y is b.y
    with pytest.raises(ValueError, match="read-only"):
        a.x[0, 0, 0, 0] = 1.0


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_and_idx_backends_give_identical_arrays(name):
    tfds_or_skip()
    via_tfds = data.load(name, "test", backend="tfds")
    via_idx = data.load(name, "test", backend="idx")
    assert via_tfds.x.dtype == via_idx.x.dtype and via_tfds.y.dtype == via_idx.y.dtype
    np.testing.assert_array_equal(via_tfds.x, via_idx.x)
    np.testing.assert_array_equal(via_tfds.y, via_idx.y)
    # "auto" with TensorFlow installed is the tfds path, cached per process.
    assert data.load(name, "test").x is via_tfds.x


@needs_data
def test_tfds_train_split_identical_fashion_mnist():
    tfds_or_skip()
    via_tfds = data.fashion_mnist("train", backend="tfds")
    via_idx = data.fashion_mnist("train", backend="idx")
    np.testing.assert_array_equal(via_tfds.y, via_idx.y)
    np.testing.assert_array_equal(via_tfds.x, via_idx.x)


def _copy_dataset(name, dst: Path) -> Path:
    folder = dst / name
    folder.mkdir(parents=True)
    for f in Path(DATA_DIR, name).glob("*.gz"):
        shutil.copy(f, folder / f.name)
        os.chmod(folder / f.name, 0o644)
    return folder


@needs_data
@pytest.mark.parametrize("backend", ["idx", "tfds"])
def test_checksum_mismatch_names_file_and_hashes(tmp_path, backend):
    if backend == "tfds":
        tfds_or_skip()
    folder = _copy_dataset("fashion_mnist", tmp_path)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as err:
        data.fashion_mnist("test", tmp_path, backend=backend)
    msg = str(err.value)
    assert str(target) in msg
    assert "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5" in msg
    assert data._sha256(target) in msg


@needs_data
def test_truncated_but_matching_name_file_is_rejected(tmp_path):
    folder = _copy_dataset("mnist", tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.mnist("test", tmp_path, backend="idx")


def test_missing_files_error_lists_files_and_places(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        data.mnist("train", tmp_path, backend="idx")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert str(tmp_path / "mnist") in msg and f"{tmp_path} (from data_dir argument)" in msg


def test_missing_files_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$JAXCOMPRESS_DATA_DIR"):
        data.fashion_mnist("test", backend="idx")
    monkeypatch.delenv("JAXCOMPRESS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="no data directory is configured"):
        data.fashion_mnist("test", backend="idx")


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ValueError, match=r"'cifar10'.*mnist.*fashion_mnist.*digits.*sst2"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="split must be one of"):
        data.mnist("validation")
    with pytest.raises(ValueError, match="backend must be one of"):
        data.mnist("test", backend="torch")
    with pytest.raises(TypeError, match="data_dir"):
        data.mnist("test", data_dir=3)


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_deterministic_stratified_partition():
    train, test = data.digits("train"), data.digits("test")
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (8, 8, 1) and train.x.dtype == np.float32
    assert 0.0 <= train.x.min() and train.x.max() == 1.0
    assert len(test) == pytest.approx(0.2 * 1797, abs=10)
    np.testing.assert_array_equal(data.digits("test").x, test.x)  # same seed, same split
    other = data.digits("test", seed=1)
    assert not np.array_equal(other.x, test.x)
    # Stratified: every class ~20% in test. Train and test are disjoint and cover everything.
    full = np.concatenate([train.x, test.x]).reshape(1797, -1)
    assert len(np.unique(full, axis=0)) == len(
        np.unique(data._digits_arrays()[0].reshape(1797, -1), axis=0)
    )
    counts = np.bincount(test.y, minlength=10) / np.bincount(
        np.concatenate([train.y, test.y]), minlength=10
    )
    assert np.all(np.abs(counts - 0.2) < 0.01)
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits("test", test_fraction=1.0)


# ----------------------------------------------------------------------------- sst2


@needs_data
def test_sst2_counts_labels_and_vocab_reuse():
    train = data.sst2("train")
    dev = data.load("sst2", "validation")
    assert train.x.shape == (67349, 64) and dev.x.shape == (872, 64)
    assert train.x.dtype == np.int32 and train.y.dtype == np.int32
    assert np.bincount(train.y).tolist() == [29780, 37569]
    assert np.bincount(dev.y).tolist() == [428, 444]
    assert dev.vocab is train.vocab and dev.split == "validation"
    vocab = train.vocab
    assert vocab.tokens[:2] == ("<pad>", "<unk>")
    assert 5000 < len(vocab) < 20000
    assert int(train.x.max()) == len(vocab) - 1
    # Padding is 0 and right-aligned; dev sentences contain words unseen in train (id 1).
    lengths = (train.x != 0).sum(1)
    assert np.all(train.x[np.arange(64)[None, :] >= lengths[:, None]] == 0)
    assert (dev.x == 1).any()
    # Round trip of the first training sentence ("hide new secretions from the parental units").
    assert vocab.decode(train.x[0]).startswith("hide new")
    # An explicit vocabulary is used as given; max_len truncates.
    small = data.Vocabulary.build(["a good movie", "a bad movie"], min_freq=1)
    dev_small = data.sst2("dev", vocab=small, max_len=8)
    assert dev_small.x.shape == (872, 8) and dev_small.vocab is small
    assert int(dev_small.x.max()) < len(small)


def test_sst2_tsv_parsing_with_quotes(tmp_path, monkeypatch):
    folder = tmp_path / "sst2"
    folder.mkdir()
    text = 'sentence\tlabel\nit \'s a "great" film \t1\nbad , bad , bad \t0\n'
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text(text)
    monkeypatch.setitem(data._SHA256["sst2"], "train.tsv", data._sha256(folder / "train.tsv"))
    monkeypatch.setitem(data._SHA256["sst2"], "dev.tsv", data._sha256(folder / "dev.tsv"))
    ds = data.sst2("train", tmp_path, min_freq=1, max_len=6)
    assert ds.y.tolist() == [1, 0]
    assert ds.vocab.decode(ds.x[0]) == 'it \'s a " great "'
    assert ds.vocab.tokens[2] == "bad"  # most frequent token first


def test_tokenize_and_vocabulary():
    assert data.tokenize("It's a GREAT movie, isn't it?") == [
        "it's", "a", "great", "movie", ",", "isn't", "it", "?",
    ]  # fmt: skip
    vocab = data.Vocabulary.build(["b a a", "c a b"], min_freq=2)
    assert vocab.tokens == ("<pad>", "<unk>", "a", "b")
    assert vocab.encode("a c b a", max_len=3).tolist() == [2, 1, 3]
    assert vocab.encode("a", max_len=3).tolist() == [2, 0, 0]
    assert data.Vocabulary.build(["b a a", "c a b"], min_freq=1, max_size=3).tokens[-1] == "a"
    with pytest.raises(ValueError, match="min_freq"):
        data.Vocabulary.build(["a"], min_freq=0)


# ----------------------------------------------------------------------------- batching


def toy(n=10, num_classes=3):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = (np.arange(n) % num_classes).astype(np.int32)
    return data.ArrayDataset(x=x, y=y, name="toy", split="train", num_classes=num_classes)


def test_batches_deterministic_and_cover_each_example_once():
    ds = toy(103)
    first = [xb[:, 0].tolist() for xb, _ in data.batches(ds, 10, seed=3, epoch=1)]
    again = [xb[:, 0].tolist() for xb, _ in data.batches(ds, 10, seed=3, epoch=1)]
    other_epoch = [xb[:, 0].tolist() for xb, _ in data.batches(ds, 10, seed=3, epoch=2)]
    other_seed = [xb[:, 0].tolist() for xb, _ in data.batches(ds, 10, seed=4, epoch=1)]
    assert first == again and first != other_epoch and first != other_seed
    assert len(first) == data.num_batches(ds, 10) == 10
    seen = np.concatenate(first)
    assert len(np.unique(seen)) == 100  # drop_remainder: 3 examples skipped, none repeated
    full = [xb for xb, _ in data.batches(ds, 10, seed=3, drop_remainder=False)]
    assert len(full) == data.num_batches(ds, 10, drop_remainder=False) == 11
    assert sorted(np.concatenate(full)[:, 0].tolist()) == list(range(103))
    for xb, yb in data.batches(ds, 10):
        np.testing.assert_array_equal(yb, (xb[:, 0].astype(int) % 3))  # pairs stay aligned


def test_batches_without_shuffle_follow_dataset_order():
    ds = toy(7)
    out = [xb[:, 0].tolist() for xb, _ in data.batches(ds, 3, shuffle=False, drop_remainder=False)]
    assert out == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(ds, 0)
    with pytest.raises(TypeError, match="ds must be"):
        data.batches([1, 2], 1)


def test_subset_and_random_labels():
    ds = toy(1000, num_classes=10)
    sub = data.subset(ds, 100, seed=1)
    assert len(sub) == 100 and np.all(np.diff(sub.x[:, 0]) > 0)
    np.testing.assert_array_equal(data.subset(ds, 100, seed=1).x, sub.x)
    with pytest.raises(ValueError, match="n must be <="):
        data.subset(ds, 1001)

    noisy, idx = data.random_labels(ds, 0.25, seed=7)
    assert idx.shape == (250,) and len(np.unique(idx)) == 250
    changed = np.flatnonzero(noisy.y != ds.y)
    np.testing.assert_array_equal(changed, idx)  # exactly the returned indices, all wrong now
    assert noisy.y.min() >= 0 and noisy.y.max() < 10
    assert np.bincount(noisy.y[idx], minlength=10).min() > 5  # spread over the classes
    again, idx2 = data.random_labels(ds, 0.25, seed=7)
    np.testing.assert_array_equal(again.y, noisy.y)
    np.testing.assert_array_equal(idx2, idx)
    assert ds.y.tolist() == (np.arange(1000) % 10).tolist()  # input untouched
    with pytest.raises(ValueError, match="fraction"):
        data.random_labels(ds, 1.5)

"""Tests for jaxcompress.data.tinyshakespeare and windows (nanoGPT's shakespeare_char)."""

import os
import shutil

import jax
import numpy as np
import pytest

import jaxcompress as jc

DATA = os.environ.get("JAXCOMPRESS_DATA_DIR", "/work/shared/data")
TEXT_PATH = os.path.join(DATA, "tinyshakespeare", "input.txt")

pytestmark = pytest.mark.skipif(
    not os.path.isfile(TEXT_PATH), reason=f"Tiny Shakespeare not found at {TEXT_PATH}"
)


@pytest.fixture(scope="module")
def oracle():
    # nanoGPT's data/shakespeare_char/prepare.py, restated.
    with open(TEXT_PATH, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = [stoi[c] for c in text]
    n = len(ids)
    return text, chars, ids[: int(n * 0.9)], ids[int(n * 0.9) :]


def test_vocabulary_split_and_encoding_match_nanogpt(oracle):
    text, chars, train_ids, val_ids = oracle
    train = jc.data.tinyshakespeare("train", data_dir=DATA)
    val = jc.data.tinyshakespeare("val", data_dir=DATA)
    assert len(text) == 1_115_394 and len(chars) == 65
    assert train.vocab_size == val.vocab_size == 65
    assert list(train.chars) == chars and val.chars == train.chars
    assert (len(train), len(val)) == (1_003_854, 111_540)
    np.testing.assert_array_equal(train.tokens, np.asarray(train_ids))
    np.testing.assert_array_equal(val.tokens, np.asarray(val_ids))
    assert train.tokens.dtype == np.uint8 and not train.tokens.flags.writeable
    assert train.decode(train.tokens[:200]) == text[:200]
    assert val.decode(val.tokens[-50:]) == text[-50:]
    np.testing.assert_array_equal(train.encode(text[:300]), train_ids[:300])


def test_environment_variable_is_the_default_root(monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_DATA_DIR", DATA)
    assert len(jc.data.tinyshakespeare("val")) == 111_540
    monkeypatch.delenv("JAXCOMPRESS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="JAXCOMPRESS_DATA_DIR"):
        jc.data.tinyshakespeare("val")


def test_checksum_is_verified(tmp_path):
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    data = bytearray(open(TEXT_PATH, "rb").read())
    data[1000] = ord("#") if data[1000] != ord("#") else ord("%")
    (folder / "input.txt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        jc.data.tinyshakespeare("train", data_dir=tmp_path)
    # The original file in a fresh folder passes.
    shutil.copy(TEXT_PATH, folder / "input.txt")
    assert len(jc.data.tinyshakespeare("val", data_dir=tmp_path)) == 111_540


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        jc.data.tinyshakespeare("test", data_dir=DATA)
    with pytest.raises(FileNotFoundError, match="input.txt"):
        jc.data.tinyshakespeare("train", data_dir=tmp_path)
    corpus = jc.data.tinyshakespeare("val", data_dir=DATA)
    with pytest.raises(ValueError, match="not in the 65-character vocabulary"):
        corpus.encode("caf\u00e9")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 65\)"):
        corpus.decode([3, 65])


def test_windows_are_shifted_by_one_and_in_range():
    tokens = np.arange(1000, dtype=np.int64)
    x, y = jc.data.windows(tokens, 64, 16, 0)
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    assert x[:, 0].min() >= 0 and y[:, -1].max() <= 999
    # Starts are uniform on [0, N - context): all of them appear over many draws.
    starts = np.concatenate([jc.data.windows(tokens, 500, 990, s)[0][:, 0] for s in range(4)])
    assert set(starts.tolist()) == set(range(10))


def test_windows_are_deterministic_per_seed_and_key():
    corpus = jc.data.tinyshakespeare("train", data_dir=DATA)
    a = jc.data.windows(corpus, 8, 32, (3, 7))
    b = jc.data.windows(corpus.tokens, 8, 32, [3, 7])
    c = jc.data.windows(corpus, 8, 32, (3, 8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    key = jax.random.key(5)
    k1 = jc.data.windows(corpus, 4, 16, key)
    k2 = jc.data.windows(corpus, 4, 16, jax.random.key_data(key))
    np.testing.assert_array_equal(k1[0], k2[0])
    assert not np.array_equal(k1[0], jc.data.windows(corpus, 4, 16, jax.random.key(6))[0])
    # The windows are the corpus' own text.
    x, y = a
    start = int(
        np.flatnonzero(
            np.all(np.lib.stride_tricks.sliding_window_view(corpus.tokens[:], 32) == x[0], axis=1)
        )[0]
    )
    np.testing.assert_array_equal(y[0], corpus.tokens[start + 1 : start + 33])


def test_windows_bad_arguments():
    tokens = np.arange(100)
    with pytest.raises(ValueError, match="context must be less"):
        jc.data.windows(tokens, 2, 100, 0)
    with pytest.raises(ValueError, match="batch"):
        jc.data.windows(tokens, 0, 10, 0)
    with pytest.raises(TypeError, match="1-D"):
        jc.data.windows(tokens.reshape(10, 10), 2, 4, 0)
    with pytest.raises(ValueError, match="integer dtype"):
        jc.data.windows(tokens.astype(np.float32), 2, 4, 0)
    with pytest.raises(TypeError, match="key_or_seed"):
        jc.data.windows(tokens, 2, 4, "seed")
    with pytest.raises(ValueError, match="non-negative"):
        jc.data.windows(tokens, 2, 4, -1)

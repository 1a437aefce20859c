"""Datasets as in-memory numpy arrays, and deterministic batching.

Four real datasets: MNIST (LeCun et al., 1998), Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017,
arXiv:1708.07747), scikit-learn's 8x8 ``digits`` (UCI optical digits, Alpaydin & Kaynak, 1998)
and GLUE SST-2 (Socher et al., 2013; Wang et al., 2018). Images are ``float32`` NHWC in
``[0, 1]``, labels ``int32``; SST-2 examples are ``int32`` token ids padded with 0. For language
modelling, :func:`tinyshakespeare` returns the character-level Tiny Shakespeare corpus as a
:class:`CharCorpus` and :func:`windows` draws seeded next-token windows from it.

Where the files come from, in order:

1. the ``data_dir`` argument, else
2. the environment variable ``JAXCOMPRESS_DATA_DIR``,

both laid out as ``<dir>/<name>/<original files>`` (``<dir>`` itself holding the files is
accepted too); else 3. tensorflow-datasets' own download (a machine with internet access).

MNIST and Fashion-MNIST have two backends that give identical arrays:

* ``"tfds"``: tensorflow-datasets prepares the dataset offline from the original files
  (``DownloadConfig(manual_dir=<dir>/<name>)``) into a cache directory (``cache_dir``, else
  ``$JAXCOMPRESS_CACHE_DIR/tfds``, else ``~/.cache/jaxcompress/tfds``), with one extraction
  folder per dataset (MNIST and Fashion-MNIST share file names). tfds stores records in the
  order of ``md5(split + str(index))``; the loader restores the original file order.
* ``"idx"``: a numpy reader of the gzip'd IDX files that first checks each file's SHA-256.

``"auto"`` (the default) uses tfds when TensorFlow and tensorflow-datasets import, else IDX.
Decoded arrays are cached per process and returned read-only; copy before writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import math
import numbers
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcompress._checks import check_fraction, check_int

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "CharCorpus",
    "Vocabulary",
    "batches",
    "digits",
    "fashion_mnist",
    "load",
    "mnist",
    "num_batches",
    "random_labels",
    "sst2",
    "subset",
    "tinyshakespeare",
    "tokenize",
    "windows",
]

DATASET_NAMES = ("mnist", "fashion_mnist", "digits", "sst2")
DATA_DIR_ENV = "JAXCOMPRESS_DATA_DIR"
CACHE_DIR_ENV = "JAXCOMPRESS_CACHE_DIR"
BACKENDS = ("auto", "tfds", "idx")

_IMAGE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_COUNTS = {"train": 60000, "test": 10000}

# SHA-256 of the original distribution files (equal to tensorflow-datasets' url_checksums).
_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
        ),
    },
    "sst2": {
        "train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
        "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    },
    "tinyshakespeare": {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
}

_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "digits": tuple(str(i) for i in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "sst2": ("negative", "positive"),
}

_SST2_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
_SST2_SPLIT_ALIASES = {"train": "train", "validation": "validation", "dev": "validation"}


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1

# Lower-cased words (with inner apostrophes: "n't", "it's"), clitics ("'s"), or one
# punctuation character. SST-2 is already PTB-tokenised, so there this mostly splits on spaces.
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|'[^\W_]+|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words, clitics and single punctuation marks.

    >>> tokenize("It's a GREAT movie , isn't it?")
    ["it's", 'a', 'great', 'movie', ',', "isn't", 'it', '?']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Word-level vocabulary: ``tokens[i]`` is the token with id ``i``.

    Id 0 is padding (``"<pad>"``) and id 1 the unknown word (``"<unk>"``); the other ids are
    the training tokens with count ``>= min_freq``, by decreasing count, ties alphabetical.
    Hashable, so it can key caches; build it with :meth:`build`.
    """

    tokens: tuple[str, ...]
    _index: dict[str, int] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self):
        tokens = tuple(self.tokens)
        if len(tokens) < 2 or tokens[PAD_ID] != PAD_TOKEN or tokens[UNK_ID] != UNK_TOKEN:
            raise ValueError(
                f"tokens must start with ({PAD_TOKEN!r}, {UNK_TOKEN!r}), got {tokens[:2]!r}"
            )
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be unique")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(tokens)})

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self.tokens)})"

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_freq: int = 2, max_size: int | None = None
    ) -> Vocabulary:
        """Vocabulary of the :func:`tokenize` tokens of ``texts`` seen at least ``min_freq``
        times, keeping at most ``max_size`` ids in all (including pad and unk)."""
        min_freq = check_int("min_freq", min_freq, minimum=1)
        if max_size is not None:
            max_size = check_int("max_size", max_size, minimum=2)
        counts = Counter(tok for text in texts for tok in tokenize(text))
        counts.pop(PAD_TOKEN, None)
        counts.pop(UNK_TOKEN, None)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls((PAD_TOKEN, UNK_TOKEN, *kept))

    def id(self, token: str) -> int:
        """Id of ``token`` (``UNK_ID`` when absent)."""
        return self._index.get(token, UNK_ID)

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """``int32`` ids of ``tokenize(text)``, truncated or right-padded with 0 to ``max_len``."""
        max_len = check_int("max_len", max_len, minimum=1)
        ids = [self._index.get(t, UNK_ID) for t in tokenize(text)[:max_len]]
        out = np.zeros((max_len,), np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """``(len(texts), max_len)`` ``int32`` ids, as :meth:`encode` row by row."""
        max_len = check_int("max_len", max_len, minimum=1)
        out = np.zeros((len(texts), max_len), np.int32)
        index = self._index
        for row, text in enumerate(texts):
            ids = [index.get(t, UNK_ID) for t in tokenize(text)[:max_len]]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Space-joined tokens of ``ids``, padding dropped."""
        return " ".join(self.tokens[int(i)] for i in ids if int(i) != PAD_ID)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held as numpy arrays.

    Attributes:
      x: inputs, ``(N, H, W, C)`` ``float32`` in ``[0, 1]`` for images, ``(N, max_len)``
        ``int32`` token ids (0 = padding) for text.
      y: ``(N,)`` ``int32`` labels in ``[0, num_classes)``.
      name: dataset name (one of :data:`DATASET_NAMES`, or free text for derived data).
      split: split name (``"train"``, ``"test"``, ``"validation"``).
      num_classes: number of classes.
      class_names: optional label names, ``class_names[k]`` for label ``k``.
      vocab: the :class:`Vocabulary` of a text dataset (``None`` for images).
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    split: str
    num_classes: int
    class_names: tuple[str, ...] | None = None
    vocab: Vocabulary | None = None

    def __post_init__(self):
        if not isinstance(self.x, np.ndarray) or not isinstance(self.y, np.ndarray):
            raise TypeError(
                f"x and y must be numpy arrays, got {type(self.x).__name__} and "
                f"{type(self.y).__name__}"
            )
        if self.y.ndim != 1 or self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x must be (N, ...) and y (N,) with the same N, got x.shape={self.x.shape} "
                f"and y.shape={self.y.shape}"
            )
        if self.y.dtype != np.int32:
            raise ValueError(f"y must have dtype int32, got {self.y.dtype}")
        check_int("num_classes", self.num_classes, minimum=1)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def replace(self, **changes: Any) -> ArrayDataset:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Argument checks and file location
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; valid names: {list(DATASET_NAMES)}")
    return name


def _data_roots(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The configured data root with where it came from; empty when none is configured."""
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}")
        return [(Path(data_dir).expanduser(), "data_dir argument")]
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [(Path(env).expanduser(), f"${DATA_DIR_ENV}")]
    return []


def _locate(name: str, files: Sequence[str], roots: list[tuple[Path, str]]) -> Path:
    """First of ``<root>/<name>`` and ``<root>`` holding all ``files``; else one clear error."""
    looked = []
    for root, source in roots:
        for folder in (root / name, root):
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return folder.resolve()
            looked.append(f"  {folder} (from {source}): missing {', '.join(missing)}")
    raise FileNotFoundError(
        f"{name}: could not find the files {list(files)}. Looked in:\n"
        + "\n".join(looked)
        + f"\nPut the original files in <data_dir>/{name}/ and pass data_dir= or set "
        f"${DATA_DIR_ENV}."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(name: str, path: Path) -> None:
    expected = _SHA256[name][path.name]
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(
            f"{name}: checksum mismatch for {path}: expected SHA-256 {expected}, got {actual}. "
            "The file is corrupt or not the original; replace it with the original file."
        )


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    base = Path(env).expanduser() if env else Path("~/.cache/jaxcompress").expanduser()
    return base / "tfds"


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _read_idx(name: str, path: Path, expected_ndim: int) -> np.ndarray:
    """Decode a gzip'd IDX file: magic ``00 00 08 ndim``, ``ndim`` big-endian uint32 sizes,
    then the uint8 data in C order."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise ValueError(f"{name}: {path} is not a valid gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise ValueError(
            f"{name}: {path} has IDX magic {raw[:4].hex()}, expected 000008{expected_ndim:02x} "
            f"(uint8, {expected_ndim} dims)"
        )
    header = 4 + 4 * expected_ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"{name}: {path} declares shape {shape} but holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _tfds_available() -> bool:
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (POSIX ``flock``) so concurrent processes prepare once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tfds_record_order(split: str, n: int) -> np.ndarray:
    """Original index of each tfds record: tfds writes examples sorted by the 128-bit
    ``md5(split_name || str(key))`` and MNIST's keys are the file positions 0..n-1."""
    salted = hashlib.md5(split.encode())
    hashes = []
    for key in range(n):
        h = salted.copy()
        h.update(str(key).encode())
        hashes.append(h.digest())
    return np.array(sorted(range(n), key=hashes.__getitem__), dtype=np.int64)


def _tfds_arrays(
    name: str, split: str, folder: Path | None, cache: Path
) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(cache))
    if folder is not None:
        config = tfds.download.DownloadConfig(
            manual_dir=str(folder),
            extract_dir=str(cache / "downloads" / "extracted" / name),
            try_download_gcs=False,
        )
    else:  # online: tfds downloads the files itself
        config = tfds.download.DownloadConfig(
            extract_dir=str(cache / "downloads" / "extracted" / name)
        )
    if not builder.is_prepared():
        with _file_lock(cache / f"{name}.lock"):
            builder = tfds.builder(name, data_dir=str(cache))
            if not builder.is_prepared():
                builder.download_and_prepare(download_config=config)
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    images, labels = np.asarray(data["image"]), np.asarray(data["label"])
    order = _tfds_record_order(split, labels.shape[0])
    out_images = np.empty_like(images)
    out_labels = np.empty_like(labels)
    out_images[order] = images
    out_labels[order] = labels
    return out_images[..., 0], out_labels


@functools.lru_cache(maxsize=16)
def _image_arrays(
    name: str, split: str, folder: str | None, backend: str, cache: str
) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = _IMAGE_FILES[split]
    if folder is not None:
        for f in (image_file, label_file):
            _verify(name, Path(folder) / f)
    if backend == "idx":
        if folder is None:  # the IDX reader has no download path
            raise ValueError(f"{name}: the idx backend needs the folder holding {image_file}")
        images = _read_idx(name, Path(folder) / image_file, 3)
        labels = _read_idx(name, Path(folder) / label_file, 1)
    else:
        images, labels = _tfds_arrays(
            name, split, None if folder is None else Path(folder), Path(cache)
        )
    n = _IMAGE_COUNTS[split]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(
            f"{name}/{split}: expected {n} images of 28x28 and {n} labels, got "
            f"{images.shape} and {labels.shape}"
        )
    x = (images.astype(np.float32) / np.float32(255.0))[..., None]
    y = labels.astype(np.int32)
    _readonly(x, y)
    return x, y


def _image_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None,
    backend: str,
    cache_dir: str | os.PathLike | None,
) -> ArrayDataset:
    split = _check_choice("split", split, tuple(_IMAGE_FILES))
    backend = _check_choice("backend", backend, BACKENDS)
    roots = _data_roots(data_dir)
    cache = _cache_root(cache_dir)
    folder = _locate(name, _IMAGE_FILES[split], roots) if roots else None
    if backend == "auto":
        backend = "tfds" if _tfds_available() else "idx"
    elif backend == "tfds" and not _tfds_available():
        raise ImportError(
            "backend='tfds' needs tensorflow and tensorflow-datasets (pip install "
            "'jaxcompress[data]'); use backend='idx' to read the original files with numpy"
        )
    if folder is None and backend == "idx":
        raise FileNotFoundError(
            f"{name}: backend='idx' reads local files but no data directory is configured: "
            f"pass data_dir= or set ${DATA_DIR_ENV} (expected <dir>/{name}/"
            f"{'|'.join(_IMAGE_FILES[split])})"
        )
    x, y = _image_arrays(name, split, None if folder is None else str(folder), backend, str(cache))
    return ArrayDataset(
        x=x, y=y, name=name, split=split, num_classes=10, class_names=_CLASS_NAMES[name]
    )


def mnist(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> ArrayDataset:
    """MNIST (LeCun et al., 1998): ``x`` ``(N, 28, 28, 1)`` float32 in [0, 1], ``y`` int32.

    Args:
      split: ``"train"`` (60,000) or ``"test"`` (10,000).
      data_dir: root holding ``mnist/*-ubyte.gz``; default ``$JAXCOMPRESS_DATA_DIR``, else
        tfds downloads the data.
      backend: ``"auto"``, ``"tfds"`` or ``"idx"`` (see the module docstring).
      cache_dir: where tfds prepares the dataset (default ``$JAXCOMPRESS_CACHE_DIR/tfds`` or
        ``~/.cache/jaxcompress/tfds``).
    """
    return _image_dataset("mnist", split, data_dir, backend, cache_dir)


def fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al., 2017): ``x`` ``(N, 28, 28, 1)`` float32 in [0, 1], ``y``
    int32, 6,000 (train) / 1,000 (test) examples per class. Arguments as :func:`mnist`, with
    files under ``<data_dir>/fashion_mnist/``."""
    return _image_dataset("fashion_mnist", split, data_dir, backend, cache_dir)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    pixels, target = load_digits(return_X_y=True)  # (1797, 64): the 8x8 images, row-major
    x = (np.asarray(pixels, np.float32).reshape(-1, 8, 8) / np.float32(16.0))[..., None]
    y = np.asarray(target, np.int32)
    _readonly(x, y)
    return x, y


def digits(split: str = "train", seed: int = 0, test_fraction: float = 0.2) -> ArrayDataset:
    """scikit-learn's ``load_digits`` (1,797 8x8 images, pixel values 0..16 scaled to [0, 1]).

    The split is stratified and deterministic: within each class the examples are permuted
    with ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction * n_class)``
    go to ``"test"``. Examples keep their original relative order.

    Returns: ``x`` ``(N, 8, 8, 1)`` float32, ``y`` ``(N,)`` int32.
    """
    split = _check_choice("split", split, ("train", "test"))
    seed = check_int("seed", seed, minimum=0)
    check_fraction("test_fraction", test_fraction, interval="(0, 1)")
    x, y = _digits_arrays()
    rng = np.random.default_rng(seed)
    is_test = np.zeros(y.shape[0], bool)
    for c in range(10):
        members = np.flatnonzero(y == c)
        picked = rng.permutation(members)[: round(float(test_fraction) * members.size)]
        is_test[picked] = True
    keep = is_test if split == "test" else ~is_test
    return ArrayDataset(
        x=x[keep],
        y=y[keep],
        name="digits",
        split=split,
        num_classes=10,
        class_names=_CLASS_NAMES["digits"],
    )


# --------------------------------------------------------------------------------------------
# SST-2
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _read_sst2_tsv(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Sentences and labels of a GLUE ``sentence<TAB>label`` file (no quoting: sentences
    contain ``"``, so each line is split on its last tab)."""
    file = Path(path)
    _verify("sst2", file)
    lines = file.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        raise ValueError(f"sst2: {file} must start with the header 'sentence<TAB>label'")
    sentences, labels = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        sentence, tab, label = line.rpartition("\t")
        if not tab or label not in ("0", "1"):
            raise ValueError(f"sst2: {file}:{lineno}: expected 'sentence<TAB>0|1', got {line!r}")
        sentences.append(sentence)
        labels.append(int(label))
    y = np.asarray(labels, np.int32)
    _readonly(y)
    return tuple(sentences), y


@functools.lru_cache(maxsize=2)
def _tfds_sst2(cache: str) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    import tensorflow_datasets as tfds

    out = {}
    for split in ("train", "validation"):
        data = tfds.as_numpy(
            tfds.load("glue/sst2", split=split, data_dir=cache, batch_size=-1, download=True)
        )
        sentences = tuple(s.decode("utf-8") for s in data["sentence"])
        y = np.asarray(data["label"], np.int32)
        _readonly(y)
        out[split] = (sentences, y)
    return out


@functools.lru_cache(maxsize=8)
def _train_vocab(source: str, min_freq: int, max_size: int | None) -> Vocabulary:
    return Vocabulary.build(_sst2_texts(source, "train")[0], min_freq=min_freq, max_size=max_size)


def _sst2_texts(source: str, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """``source`` is ``"dir:<folder>"`` or ``"tfds:<cache>"``."""
    kind, _, where = source.partition(":")
    if kind == "dir":
        return _read_sst2_tsv(str(Path(where) / _SST2_FILES[split]))
    return _tfds_sst2(where)[split]


@functools.lru_cache(maxsize=8)
def _encode(
    source: str, split: str, vocab: Vocabulary, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    sentences, y = _sst2_texts(source, split)
    x = vocab.encode_batch(sentences, max_len)
    _readonly(x)
    return x, y


def sst2(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    vocab: Vocabulary | None = None,
    max_len: int = 64,
    min_freq: int = 2,
    max_vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ArrayDataset:
    """GLUE SST-2 binary sentiment (Socher et al., 2013): 67,349 train / 872 validation.

    Reads ``<data_dir>/sst2/train.tsv`` and ``dev.tsv`` (``split="validation"``, alias
    ``"dev"``); with no data directory configured, tfds' ``glue/sst2`` (online only).

    Args:
      split: ``"train"`` or ``"validation"``.
      data_dir: root holding ``sst2/``; default ``$JAXCOMPRESS_DATA_DIR``.
      vocab: vocabulary to encode with; default: built from the *training* sentences (so the
        validation split shares the train ids), with ``min_freq`` / ``max_vocab_size``.
      max_len: tokens per example; longer sentences are truncated, shorter padded with 0.
      min_freq: minimum training count of a token to get its own id (else id 1, unknown).
      max_vocab_size: cap on the vocabulary size (including pad and unk); ``None``: no cap.
      cache_dir: tfds cache for the online path.

    Returns: ``x`` ``(N, max_len)`` int32 token ids, ``y`` int32 in {0, 1}, and ``vocab``.
    """
    if not isinstance(split, str) or split not in _SST2_SPLIT_ALIASES:
        raise ValueError(f"split must be one of ['train', 'validation'], got {split!r}")
    split = _SST2_SPLIT_ALIASES[split]
    max_len = check_int("max_len", max_len, minimum=1)
    min_freq = check_int("min_freq", min_freq, minimum=1)
    if max_vocab_size is not None:
        max_vocab_size = check_int("max_vocab_size", max_vocab_size, minimum=2)
    if vocab is not None and not isinstance(vocab, Vocabulary):
        raise TypeError(f"vocab must be a jaxcompress.data.Vocabulary, got {type(vocab).__name__}")
    roots = _data_roots(data_dir)
    if roots:
        needed = (
            (_SST2_FILES["train"], _SST2_FILES[split]) if vocab is None else (_SST2_FILES[split],)
        )
        source = f"dir:{_locate('sst2', tuple(dict.fromkeys(needed)), roots)}"
    else:
        if not _tfds_available():
            raise FileNotFoundError(
                f"sst2: no data directory configured (pass data_dir= or set ${DATA_DIR_ENV}, "
                f"expected <dir>/sst2/train.tsv and dev.tsv) and tensorflow-datasets is not "
                f"installed to download glue/sst2"
            )
        source = f"tfds:{_cache_root(cache_dir)}"
    if vocab is None:
        vocab = _train_vocab(source, min_freq, max_vocab_size)
    x, y = _encode(source, split, vocab, max_len)
    return ArrayDataset(
        x=x,
        y=y,
        name="sst2",
        split=split,
        num_classes=2,
        class_names=_CLASS_NAMES["sst2"],
        vocab=vocab,
    )


# --------------------------------------------------------------------------------------------
# Tiny Shakespeare (character level)
# --------------------------------------------------------------------------------------------

_TINYSHAKESPEARE_FILE = "input.txt"
_TINYSHAKESPEARE_SPLITS = ("train", "val")
_TINYSHAKESPEARE_TRAIN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True, eq=False)
class CharCorpus:
    """A character-level corpus: one token per character.

    Attributes:
      tokens: ``(N,)`` ``uint8`` ids of the split's characters, read-only.
      chars: the vocabulary, ``chars[i]`` the character with id ``i`` (sorted, built from the
        whole corpus, so both splits share it).
      name: corpus name.
      split: ``"train"`` or ``"val"``.
    """

    tokens: np.ndarray
    chars: tuple[str, ...]
    name: str
    split: str
    _index: dict[str, int] = dataclasses.field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.tokens, np.ndarray) or self.tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D numpy array, got {type(self.tokens).__name__}")
        if len(set(self.chars)) != len(self.chars) or not all(
            isinstance(c, str) and len(c) == 1 for c in self.chars
        ):
            raise ValueError("chars must be distinct single characters")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    def __repr__(self) -> str:
        return (
            f"CharCorpus(name={self.name!r}, split={self.split!r}, tokens={self.tokens.size}, "
            f"vocab_size={len(self.chars)})"
        )

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``int32`` ids of the characters of ``text``; a character outside the vocabulary is a
        ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return np.fromiter((self._index[c] for c in text), np.int32, len(text))
        except KeyError as err:
            raise ValueError(
                f"{self.name}: character {err.args[0]!r} is not in the {len(self.chars)}-"
                "character vocabulary"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of ``ids`` (any integer array or iterable) as one string."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not isinstance(i, int) or not 0 <= i < len(self.chars):
                raise ValueError(f"ids must lie in [0, {len(self.chars)}), got {i!r}")
            out.append(self.chars[i])
        return "".join(out)


@functools.lru_cache(maxsize=2)
def _tinyshakespeare_arrays(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    file = Path(path)
    _verify("tinyshakespeare", file)
    text = file.read_text(encoding="utf-8")
    chars = tuple(sorted(set(text)))
    lookup = np.zeros(max(map(ord, chars)) + 1, np.uint8)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint8)
    tokens = lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)]
    _readonly(tokens)
    return chars, tokens


def tinyshakespeare(split: str = "train", data_dir: str | os.PathLike | None = None) -> CharCorpus:
    """Tiny Shakespeare, the character-level corpus of char-rnn and nanoGPT (1,115,394
    characters, 65 distinct), encoded as in nanoGPT's ``shakespeare_char``.

    Reads ``<data_dir>/tinyshakespeare/input.txt`` (``data_dir`` default
    ``$JAXCOMPRESS_DATA_DIR``; no download), checks its SHA-256, builds the vocabulary as the
    sorted set of all characters and splits at ``int(0.9 N)``: the first 1,003,854 characters
    are ``"train"``, the last 111,540 ``"val"``. Draw training windows with :func:`windows`.

    Returns: a :class:`CharCorpus` (``tokens`` ``uint8``, ``encode``/``decode``).
    """
    split = _check_choice("split", split, _TINYSHAKESPEARE_SPLITS)
    roots = _data_roots(data_dir)
    if not roots:
        raise FileNotFoundError(
            f"tinyshakespeare: no data directory configured; pass data_dir= or set "
            f"${DATA_DIR_ENV} (expected <dir>/tinyshakespeare/{_TINYSHAKESPEARE_FILE})"
        )
    folder = _locate("tinyshakespeare", (_TINYSHAKESPEARE_FILE,), roots)
    chars, tokens = _tinyshakespeare_arrays(str(folder / _TINYSHAKESPEARE_FILE))
    cut = int(tokens.size * _TINYSHAKESPEARE_TRAIN_FRACTION)
    part = tokens[:cut] if split == "train" else tokens[cut:]
    return CharCorpus(tokens=part, chars=chars, name="tinyshakespeare", split=split)


def _seed_words(key_or_seed: Any) -> list[int]:
    """The words that seed :func:`windows`' generator: an int, a sequence of ints, or a JAX
    PRNG key (typed, or raw ``uint32``) whose key data are used."""
    value = key_or_seed
    dtype = getattr(value, "dtype", None)
    if dtype is not None and "key<" in str(dtype):  # a typed JAX key: jax is already imported
        value = sys.modules["jax"].random.key_data(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        words = [int(value)]
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.ndim > 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                "key_or_seed must be an int, a sequence of ints or a JAX PRNG key, got "
                f"{key_or_seed!r}"
            )
        words = [int(w) for w in arr.reshape(-1)]
    if any(w < 0 for w in words):
        raise ValueError(f"key_or_seed must hold non-negative ints, got {key_or_seed!r}")
    return words


def windows(
    tokens: np.ndarray | CharCorpus, batch: int, context: int, key_or_seed: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random context windows of a token stream and their next-token targets.

    As nanoGPT's ``get_batch``: starts :math:`i_b` uniform on ``[0, N - context)``,
    ``x[b] = tokens[i_b : i_b + context]`` and ``y[b] = tokens[i_b + 1 : i_b + context + 1]``
    (``x`` shifted by one). The starts come from ``numpy.random.default_rng(words)`` with
    ``words`` the int seed, the sequence of ints (e.g. ``(seed, step)``) or the key data of a
    JAX key, so the same ``key_or_seed`` always gives the same windows.

    Args:
      tokens: a 1-D integer array, or a :class:`CharCorpus`.
      batch: number of windows (``>= 1``).
      context: window length (``>= 1``, less than the number of tokens).
      key_or_seed: an int, a sequence of non-negative ints, or a JAX PRNG key.

    Returns: ``(x, y)``, both ``int32`` of shape ``(batch, context)``.
    """
    if isinstance(tokens, CharCorpus):
        tokens = tokens.tokens
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise TypeError(
            f"tokens must be a 1-D numpy array or a CharCorpus, got {type(tokens).__name__}"
            + (f" of shape {tokens.shape}" if isinstance(tokens, np.ndarray) else "")
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    batch = check_int("batch", batch, minimum=1)
    context = check_int("context", context, minimum=1)
    if context >= tokens.size:
        raise ValueError(
            f"context must be less than the number of tokens ({tokens.size}), got {context}"
        )
    rng = np.random.default_rng(_seed_words(key_or_seed))
    starts = rng.integers(0, tokens.size - context, size=batch)
    chunk = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
    return chunk[:, :-1], chunk[:, 1:]


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def load(
    name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None, **kwargs: Any
) -> ArrayDataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) as an :class:`ArrayDataset`.

    ``kwargs`` go to the per-dataset function: ``backend``/``cache_dir`` for
    :func:`mnist`/:func:`fashion_mnist`, ``seed``/``test_fraction`` for :func:`digits`
    (which ignores ``data_dir``: scikit-learn bundles it), ``vocab``/``max_len``/``min_freq``/
    ``max_vocab_size`` for :func:`sst2`.
    """
    name = _check_name(name)
    if name == "mnist":
        return mnist(split, data_dir, **kwargs)
    if name == "fashion_mnist":
        return fashion_mnist(split, data_dir, **kwargs)
    if name == "digits":
        return digits(split, **kwargs)
    return sst2(split, data_dir, **kwargs)


# --------------------------------------------------------------------------------------------
# Batching and derived datasets
# --------------------------------------------------------------------------------------------


def _arrays(ds: ArrayDataset | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ds, ArrayDataset):
        return ds.x, ds.y
    if isinstance(ds, tuple) and len(ds) == 2:
        x, y = (np.asarray(a) for a in ds)
        if x.ndim < 1 or x.shape[:1] != y.shape[:1]:
            raise ValueError(
                f"ds must be (x, y) with the same leading size, got shapes {x.shape}, {y.shape}"
            )
        return x, y
    raise TypeError(f"ds must be an ArrayDataset or an (x, y) tuple, got {type(ds).__name__}")


def num_batches(
    ds: ArrayDataset | tuple[np.ndarray, np.ndarray] | int,
    batch_size: int,
    drop_remainder: bool = True,
) -> int:
    """Batches per epoch: ``floor(N / B)`` when dropping the remainder, else ``ceil(N / B)``."""
    if isinstance(ds, (int, np.integer)):
        n = check_int("ds", ds, minimum=0)
    else:
        n = len(_arrays(ds)[1])
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    ds: ArrayDataset | tuple[np.ndarray, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    epoch: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over one epoch of ``(x, y)`` numpy batches.

    With ``shuffle`` the order is ``numpy.random.default_rng([seed, epoch]).permutation(N)``:
    the same for the same ``(seed, epoch)``, different across epochs, and every example
    appears once per epoch (the last ``N mod B`` of the permutation are skipped when
    ``drop_remainder``). Without ``shuffle`` batches follow the dataset order.

    ``rows=(start, stop)`` yields only those rows of every batch and reads nothing else: in a
    multi-process run each process passes its slice of the global batch
    (``jaxcompress.sharding.process_rows``), so the processes together see exactly the batches
    of a single process with the same ``seed``.

    Raises:
      ValueError: ``batch_size`` larger than the dataset with ``drop_remainder`` (no batch at
        all), or ``rows`` outside ``[0, batch_size]``.
    """
    x, y = _arrays(ds)
    n_batches = num_batches(len(y), batch_size, drop_remainder)
    if n_batches == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({len(y)} examples): with "
            "drop_remainder=True there would be no batch; use a smaller batch_size or "
            "drop_remainder=False"
        )
    seed = check_int("seed", seed, minimum=0)
    epoch = check_int("epoch", epoch, minimum=0)
    start, stop = 0, batch_size
    if rows is not None:
        if not (isinstance(rows, tuple) and len(rows) == 2):
            raise ValueError(f"rows must be a (start, stop) pair, got {rows!r}")
        start = check_int("rows[0]", rows[0], minimum=0)
        stop = check_int("rows[1]", rows[1], minimum=start + 1)
        if stop > batch_size:
            raise ValueError(f"rows={rows!r} must lie within [0, batch_size={batch_size}]")
    order = np.random.default_rng([seed, epoch]).permutation(len(y)) if shuffle else None

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in range(n_batches):
            if order is None:
                sl = slice(b * batch_size, (b + 1) * batch_size)
                yield x[sl][start:stop], y[sl][start:stop]
            else:
                idx = np.sort(order[b * batch_size : (b + 1) * batch_size])[start:stop]
                yield x[idx], y[idx]

    return generate()


def subset(ds: ArrayDataset, n: int, seed: int = 0) -> ArrayDataset:
    """``n`` examples drawn without replacement (``default_rng(seed)``), in dataset order."""
    if not isinstance(ds, ArrayDataset):
        raise TypeError(f"ds must be an ArrayDataset, got {type(ds).__name__}")
    n = check_int("n", n, minimum=1)
    if n > len(ds):
        raise ValueError(f"n must be <= len(ds) = {len(ds)}, got {n}")
    seed = check_int("seed", seed, minimum=0)
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.replace(x=ds.x[idx], y=ds.y[idx])


def random_labels(
    ds: ArrayDataset, fraction: float, seed: int = 0
) -> tuple[ArrayDataset, np.ndarray]:
    """Copy of ``ds`` where ``round(fraction * N)`` examples get a wrong label.

    The relabelled examples are drawn without replacement; each new label is
    :math:`(y + k) \\bmod C` with :math:`k` uniform on ``1 .. C - 1``, i.e. uniform over the
    *other* classes, so the corrupted examples can only be fit by memorisation (Zhang et al.,
    2017, "Understanding deep learning requires rethinking generalization", arXiv:1611.03530;
    used by AC/DC, Peste et al., 2021, arXiv:2106.12379).

    Returns: the relabelled dataset and the sorted ``int64`` indices that were changed.
    """
    if not isinstance(ds, ArrayDataset):
        raise TypeError(f"ds must be an ArrayDataset, got {type(ds).__name__}")
    check_fraction("fraction", fraction, interval="[0, 1]")
    if ds.num_classes < 2:
        raise ValueError(f"random_labels needs num_classes >= 2, got {ds.num_classes}")
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    count = round(float(fraction) * len(ds))
    idx = np.sort(rng.choice(len(ds), size=count, replace=False)).astype(np.int64)
    y = np.array(ds.y, copy=True)
    shift = rng.integers(1, ds.num_classes, size=count)
    y[idx] = ((y[idx] + shift) % ds.num_classes).astype(np.int32)
    return ds.replace(y=y, name=f"{ds.name}+random_labels"), idx

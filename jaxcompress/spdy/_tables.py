"""Per-layer timing tables and SPDY budget accounting.

A :class:`TimingTable` lists, for every compressible layer, its options (a label and a
time each: sparsity levels, 2:4, fewer channels, a lower rank, ...), plus the dense model's
total time ``base`` and the summed dense time ``prunable`` of the listed layers. Option 0 of
every layer is, by convention, the uncompressed layer.

Budget (Frantar & Alistarh, "SPDY", ICML 2022, and ``SPDY.__init__`` in IST-DASLab/spdy):
for a target speedup ``s`` the pruned layers may take

    T = base / s - (base - prunable)

in total. The reference drops skipped layers (first/last) from the DP but leaves their dense
time inside ``prunable``, so they are not charged anywhere; :func:`budget` reproduces that
with ``reference_budget=True`` and by default charges their dense time as fixed overhead:

    T = base / s - (base - prunable) - sum_{skipped} t_dense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "LayerOptions",
    "TimingTable",
    "budget",
    "max_speedup",
    "modelled_speedup",
    "prior_errors",
]

_JSON_FORMAT = "jaxcompress.spdy.TimingTable"
_JSON_VERSION = 1


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _warn_short_last_layer(layers: list[LayerOptions], source: str, lineno: int) -> None:
    """Warn when the last layer looks cut short: its labels are a strict prefix of the
    labels that every other layer (two or more) shares."""
    if len(layers) < 3:
        return
    shared = {layer.labels for layer in layers[:-1]}
    last = layers[-1].labels
    if len(shared) == 1:
        (full,) = shared
        if len(last) < len(full) and full[: len(last)] == last:
            warnings.warn(
                f"{source}:{lineno}: the last layer {layers[-1].name!r} has {len(last)} options "
                f"where every other layer has {len(full)} (the same labels, up to "
                f"{last[-1]!r}); the file may be truncated",
                stacklevel=3,
            )


def _read_utf8(path: str, what: str) -> str:
    """The UTF-8 text of ``path``; a ``ValueError`` naming the file and the first bad byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {what}: byte {e.start} is not UTF-8 ({e.reason})") from None


def _readonly(a: Any, dtype=np.float64) -> np.ndarray:
    arr = np.array(a, dtype=dtype, copy=True)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The options of one layer.

    Attributes:
      name: the layer's name (e.g. a key path or the reference's module name).
      labels: one label per option (``"0.0000"`` dense, ``"0.7069"``, ``"2:4"``, ``"rank=64"``).
      times: ``float64[n]`` time per option; option 0 is the uncompressed layer.
      noise: optional ``float64[n]`` relative timing noise (IQR / median) from :func:`measure`.
    """

    name: str
    labels: tuple[str, ...]
    times: np.ndarray
    noise: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ValueError(
                f"layer name must be a non-empty string without spaces; got {self.name!r}"
            )
        labels = tuple(str(x) for x in self.labels)
        times = np.asarray(self.times, np.float64)
        if times.ndim != 1 or times.shape[0] == 0:
            raise ValueError(f"layer {self.name!r}: times must be a non-empty 1-D array")
        if len(labels) != times.shape[0]:
            raise ValueError(
                f"layer {self.name!r}: {len(labels)} labels for {times.shape[0]} times"
            )
        if len(set(labels)) != len(labels):
            raise ValueError(f"layer {self.name!r}: duplicate option labels {labels}")
        if not np.all(np.isfinite(times)) or np.any(times < 0):
            raise ValueError(
                f"layer {self.name!r}: times must be finite and non-negative; got {times.tolist()}"
            )
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "times", _readonly(times))
        if self.noise is not None:
            noise = np.asarray(self.noise, np.float64)
            if noise.shape != times.shape:
                raise ValueError(f"layer {self.name!r}: noise shape {noise.shape} != {times.shape}")
            object.__setattr__(self, "noise", _readonly(noise))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerOptions):
            return NotImplemented
        same_noise = (self.noise is None and other.noise is None) or (
            self.noise is not None
            and other.noise is not None
            and np.array_equal(self.noise, other.noise)
        )
        return (
            self.name == other.name
            and self.labels == other.labels
            and np.array_equal(self.times, other.times)
            and same_noise
        )

    __hash__ = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class TimingTable:
    """Per-layer option times of one model on one device.

    Attributes:
      base: total time of the dense model.
      prunable: summed dense time of the listed layers (as written by the reference tool; it
        still includes layers removed with :meth:`drop`).
      layers: the layers' :class:`LayerOptions`, in model order.
      ignored: names that appeared without any entries in a loaded file (dropped, as the
        reference does for ``rn50_4block.txt``).
    """

    base: float
    prunable: float
    layers: tuple[LayerOptions, ...]
    ignored: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("base", "prunable"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"{field} must be a number; got {v!r}")
            if not math.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"{field} must be finite and non-negative; got {v!r}")
            object.__setattr__(self, field, float(v))
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("a TimingTable needs at least one layer")
        names = [layer.name for layer in layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate layer names: {dup}")
        if self.prunable > self.base:
            raise ValueError(f"prunable ({self.prunable}) exceeds base ({self.base})")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "ignored", tuple(self.ignored))

    # ---- views -------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerOptions:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {list(self.names)}")

    def times(self) -> list[np.ndarray]:
        """Per-layer option times, the ``times`` argument of :func:`jaxcompress.spdy.solve`."""
        return [layer.times for layer in self.layers]

    def labels(self) -> list[tuple[str, ...]]:
        return [layer.labels for layer in self.layers]

    def dense_times(self) -> np.ndarray:
        """Time of option 0 (uncompressed) per layer."""
        return np.array([layer.times[0] for layer in self.layers])

    def drop(self, skip: Iterable[str]) -> TimingTable:
        """The table without the layers named in ``skip`` (``base``/``prunable`` unchanged)."""
        skip = _check_skip(self, skip)
        return dataclasses.replace(
            self, layers=tuple(layer for layer in self.layers if layer.name not in skip)
        )

    def profile(self, choice: Sequence[int]) -> dict[str, str]:
        """Map a DP choice (one index per layer) to ``{layer name: option label}``."""
        choice = [int(c) for c in np.asarray(choice).reshape(-1)]
        if len(choice) != len(self.layers):
            raise ValueError(f"choice has {len(choice)} entries for {len(self.layers)} layers")
        out = {}
        for layer, j in zip(self.layers, choice, strict=True):
            if not 0 <= j < len(layer.labels):
                raise ValueError(f"choice {j} out of range for layer {layer.name!r}")
            out[layer.name] = layer.labels[j]
        return out

    # ---- the reference text format -----------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> TimingTable:
        """Read a reference ``timings/*.txt`` file (see :meth:`loads`).

        Raises:
          ValueError: naming the file (and the line where there is one) for a file that is
            not UTF-8 text, that ends in the middle of a line (no final newline: a
            truncated copy), or that :meth:`loads` rejects.
        """
        source = os.fspath(path)
        text = _read_utf8(source, "a text timing table")
        if "\x00" in text:
            line = text.count("\n", 0, text.index("\x00")) + 1
            raise ValueError(f"{source}:{line}: not a text timing table: it contains NUL bytes")
        if text.strip() and not text.endswith("\n"):
            line = text.count("\n") + 1
            last = text.rsplit("\n", 1)[-1]
            raise ValueError(
                f"{source}:{line}: the file ends in the middle of a line ({last!r}, no final "
                "newline); it looks truncated"
            )
        return cls.loads(text, source=source)

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> TimingTable:
        """Parse the reference text format.

        Format: ``base``, its value, ``prunable``, its value, then for each layer a name line
        followed by ``<time> <label>`` lines. Options are sorted by numeric label when every
        label of a layer is a number (the reference sorts its level strings); names without
        entries are dropped (the ``rn50_4block`` trailer). A repeated label inside a layer
        keeps the last time (the reference's dict semantics) and warns. Blank lines are
        skipped. A layer name is never a number: a line holding only a number is a time
        whose label was cut off, and an error.

        Warns:
          UserWarning: a repeated label; a last layer whose labels are a strict prefix of
            those every other layer shares (the text may have been cut at a line end).

        Raises:
          ValueError: naming ``source`` and the 1-based line number of the first bad line
            (also for ``prunable > base``).
        """
        lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
        lines = [(i, ln) for i, ln in lines if ln]

        def fail(lineno: int, msg: str) -> ValueError:
            return ValueError(f"{source}:{lineno}: {msg}")

        header = []
        for k, key in enumerate(("base", "prunable")):
            if len(lines) < 2 * k + 2:
                last = lines[-1][0] if lines else 0
                raise fail(last + 1, f"unexpected end of file: expected {key!r} and its value")
            (ln_key, word), (ln_val, val) = lines[2 * k], lines[2 * k + 1]
            if word != key:
                raise fail(ln_key, f"expected {key!r}, got {word!r}")
            try:
                v = float(val)
            except ValueError:
                raise fail(ln_val, f"expected the {key} time (a number), got {val!r}") from None
            if not math.isfinite(v) or v < 0:
                raise fail(ln_val, f"{key} time must be finite and non-negative, got {val!r}")
            header.append(v)
            if key == "prunable" and v > header[0]:
                raise fail(
                    ln_val,
                    f"prunable time {val} exceeds the base time {header[0]!r}; "
                    "prunable is the part of base spent in the listed layers",
                )

        entries: dict[str, dict[str, float]] = {}
        order: list[str] = []
        first_line: dict[str, int] = {}
        current = None
        for lineno, ln in lines[4:]:
            parts = ln.split()
            if len(parts) == 1:
                if _is_number(parts[0]):
                    raise fail(
                        lineno,
                        f"a time without a label ({ln!r}): expected '<time> <label>' or a layer "
                        "name; the line looks cut off (a truncated file?)",
                    )
                if parts[0] in entries:
                    raise fail(
                        lineno, f"layer {parts[0]!r} already defined on line {first_line[parts[0]]}"
                    )
                current = parts[0]
                entries[current] = {}
                order.append(current)
                first_line[current] = lineno
                continue
            if len(parts) != 2:
                raise fail(lineno, f"expected '<time> <label>' or a layer name, got {ln!r}")
            if current is None:
                raise fail(lineno, f"entry {ln!r} before any layer name")
            try:
                t = float(parts[0])
            except ValueError:
                raise fail(lineno, f"expected a time (number), got {parts[0]!r}") from None
            if not math.isfinite(t) or t < 0:
                raise fail(lineno, f"time must be finite and non-negative, got {parts[0]!r}")
            if parts[1] in entries[current]:
                warnings.warn(
                    f"{source}:{lineno}: layer {current!r} repeats option {parts[1]!r}; keeping "
                    "the later time (reference behaviour)",
                    stacklevel=2,
                )
            entries[current][parts[1]] = t

        layers, ignored = [], []
        for name in order:
            opts = entries[name]
            if not opts:
                ignored.append(name)
                continue
            labels = list(opts)
            try:
                labels.sort(key=float)
            except ValueError:
                pass  # non-numeric labels: keep file order
            layers.append(LayerOptions(name, tuple(labels), np.array([opts[x] for x in labels])))
        if not layers:
            raise fail(lines[-1][0] if lines else 1, "no layer with entries")
        _warn_short_last_layer(layers, source, lines[-1][0])
        return cls(base=header[0], prunable=header[1], layers=tuple(layers), ignored=tuple(ignored))

    def dumps(self) -> str:
        """The reference text format (noise is not representable there).

        Raises:
          ValueError: a layer name that is a number, or an empty label or one with white
            space: :meth:`loads` could not read them back (use :meth:`to_json`).
        """
        for layer in self.layers:
            if _is_number(layer.name):
                raise ValueError(
                    f"layer {layer.name!r}: a numeric name cannot be written in the text format "
                    "(a lone number reads as a cut-off entry); use to_json()"
                )
            bad = [lab for lab in layer.labels if not lab or any(c.isspace() for c in lab)]
            if bad:
                raise ValueError(
                    f"layer {layer.name!r}: labels {bad} are empty or contain white space and "
                    "cannot be written in the text format; use to_json()"
                )
        out = ["base", repr(self.base), "prunable", repr(self.prunable)]
        for layer in self.layers:
            out.append(layer.name)
            out.extend(
                f"{t!r} {lab}" for t, lab in zip(layer.times.tolist(), layer.labels, strict=True)
            )
        return "\n".join(out) + "\n"

    # ---- JSON ----------------------------------------------------------------------------

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to our JSON format; also write it to ``path`` when given."""
        doc = {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "base": self.base,
            "prunable": self.prunable,
            "ignored": list(self.ignored),
            "layers": [
                {
                    "name": layer.name,
                    "labels": list(layer.labels),
                    "times": layer.times.tolist(),
                    **({} if layer.noise is None else {"noise": layer.noise.tolist()}),
                }
                for layer in self.layers
            ],
        }
        text = json.dumps(doc, indent=1)
        if path is not None:
            _write_atomic(os.fspath(path), text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> TimingTable:
        """Inverse of :meth:`to_json`; accepts the JSON text or a path to it.

        Raises:
          ValueError: naming the file (when a path is given) for a file that is not UTF-8
            JSON, not a ``TimingTable`` document, or holds invalid values.
        """
        text = os.fspath(text_or_path)
        source = "<string>"
        if not text.lstrip().startswith("{"):
            source = text
            text = _read_utf8(source, "a JSON timing table")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{e.lineno}: not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != _JSON_FORMAT:
            raise ValueError(f"{source}: not a {_JSON_FORMAT} document (missing or wrong 'format')")
        if doc.get("version") != _JSON_VERSION:
            raise ValueError(
                f"{source}: unsupported version {doc.get('version')!r}; expected {_JSON_VERSION}"
            )
        try:
            layers = tuple(
                LayerOptions(d["name"], tuple(d["labels"]), d["times"], d.get("noise"))
                for d in doc["layers"]
            )
            return cls(doc["base"], doc["prunable"], layers, tuple(doc.get("ignored", ())))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: malformed {_JSON_FORMAT} document: {e!r}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    # ---- analytic and measured tables ------------------------------------------------

    @classmethod
    def from_flops(
        cls,
        flops: Mapping[str, float],
        options: Sequence[Any] | Mapping[str, Sequence[Any]],
        *,
        time_fn: Callable[[str, float, Any], float] | None = None,
        label_fn: Callable[[Any], str] | None = None,
        overhead: float = 0.0,
    ) -> TimingTable:
        """An analytic table: time = dense FLOPs x density, or any ``time_fn``.

        Args:
          flops: dense FLOPs (or MACs, any proxy) per layer, in model order.
          options: shared options for every layer, or a mapping layer -> options. Option 0 must
            be the uncompressed layer. With the default ``time_fn`` options are sparsities
            ``s`` in [0, 1) and ``t = flops * (1 - s)``.
          time_fn: ``(name, dense_flops, option) -> time`` for other choices (2:4, channels,
            rank, ...).
          label_fn: option -> label; default ``f"{s:.4f}"`` for numbers, else ``str``.
          overhead: time of the parts of the model outside ``flops``; ``base`` is
            ``overhead + sum(flops)``.
        """
        if not isinstance(flops, Mapping) or not flops:
            raise ValueError("flops must be a non-empty mapping layer name -> dense FLOPs")
        if not math.isfinite(float(overhead)) or overhead < 0:
            raise ValueError(f"overhead must be finite and non-negative; got {overhead!r}")

        def default_time(name, f, s):
            s = float(s)
            if not 0.0 <= s < 1.0:
                raise ValueError(
                    f"layer {name!r}: sparsity options must lie in [0, 1) with the default "
                    f"time_fn; got {s!r}"
                )
            return f * (1.0 - s)

        def default_label(o):
            return f"{o:.4f}" if isinstance(o, (float, int, np.floating, np.integer)) else str(o)

        time_fn = time_fn or default_time
        label_fn = label_fn or default_label
        layers = []
        for name, f in flops.items():
            f = float(f)
            if not math.isfinite(f) or f < 0:
                raise ValueError(f"flops[{name!r}] must be finite and non-negative; got {f!r}")
            opts = options[name] if isinstance(options, Mapping) else options
            if len(opts) == 0:
                raise ValueError(f"layer {name!r} has no options")
            layers.append(
                LayerOptions(
                    name,
                    tuple(label_fn(o) for o in opts),
                    np.array([float(time_fn(name, f, o)) for o in opts]),
                )
            )
        prunable = float(sum(float(v) for v in flops.values()))
        return cls(base=prunable + float(overhead), prunable=prunable, layers=tuple(layers))


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------
# Budget accounting.
# --------------------------------------------------------------------------------------


def _check_skip(table: TimingTable, skip: Iterable[str]) -> frozenset[str]:
    if isinstance(skip, str):
        raise TypeError(f"skip must be a collection of layer names, not a string; got {skip!r}")
    skip = frozenset(skip)
    unknown = sorted(skip - set(table.names))
    if unknown:
        raise ValueError(f"skip names unknown layers {unknown}; layers: {list(table.names)}")
    if len(skip) == len(table.layers):
        raise ValueError("skip removes every layer; nothing is left to compress")
    return skip


def _fixed_time(table: TimingTable, skip: frozenset[str], reference_budget: bool) -> float:
    fixed = table.base - table.prunable
    if not reference_budget:
        fixed += sum(float(table[n].times[0]) for n in skip)
    return fixed


def max_speedup(
    table: TimingTable, *, skip: Iterable[str] = (), reference_budget: bool = False
) -> float:
    """Largest modelled speedup: every kept layer at its fastest option."""
    skip = _check_skip(table, skip)
    fastest = sum(float(layer.times.min()) for layer in table.layers if layer.name not in skip)
    total = _fixed_time(table, skip, reference_budget) + fastest
    return math.inf if total <= 0 else table.base / total


def budget(
    table: TimingTable,
    speedup: float,
    *,
    skip: Iterable[str] = (),
    reference_budget: bool = False,
) -> float:
    """Time allowed for the kept (non-skipped) layers at a target ``speedup``.

    ``reference_budget=True``: ``base / speedup - (base - prunable)`` exactly as the reference
    (skipped layers' dense time is then counted nowhere). Default: additionally subtract the
    skipped layers' dense time, so the modelled end-to-end speedup is the target.

    Raises:
      ValueError: ``speedup`` not a finite number > 1; unknown ``skip`` names; a target above
        :func:`max_speedup` (the message gives the maximum).
    """
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float, np.floating, np.integer)):
        raise TypeError(f"speedup must be a number; got {speedup!r}")
    if not math.isfinite(float(speedup)) or speedup <= 1:
        raise ValueError(f"speedup must be a finite number > 1; got {speedup!r}")
    skip = _check_skip(table, skip)
    t = table.base / float(speedup) - _fixed_time(table, skip, reference_budget)
    best = max_speedup(table, skip=skip, reference_budget=reference_budget)
    fastest = sum(float(layer.times.min()) for layer in table.layers if layer.name not in skip)
    if t <= 0 or t < fastest:
        mode = "reference" if reference_budget else "corrected"
        raise ValueError(
            f"speedup {speedup!r} is unreachable ({mode} budget): the maximum modelled speedup "
            f"with skip={sorted(skip)} is {best:.4f}"
        )
    return t


def modelled_speedup(
    table: TimingTable,
    choice: Sequence[int],
    *,
    skip: Iterable[str] = (),
    reference_budget: bool = False,
) -> float:
    """``base / modelled time`` of a profile over the kept layers (``table.drop(skip)`` order).

    The default charges skipped layers at their dense time; ``reference_budget=True`` leaves
    them out, which is what the reference's printout reports.
    """
    skip = _check_skip(table, skip)
    kept = [layer for layer in table.layers if layer.name not in skip]
    choice = [int(c) for c in np.asarray(choice).reshape(-1)]
    if len(choice) != len(kept):
        raise ValueError(f"choice has {len(choice)} entries for {len(kept)} kept layers")
    chosen = 0.0
    for layer, j in zip(kept, choice, strict=True):
        if not 0 <= j < layer.times.shape[0]:
            raise ValueError(f"choice {j} out of range for layer {layer.name!r}")
        chosen += float(layer.times[j])
    return table.base / (_fixed_time(table, skip, reference_budget) + chosen)


def prior_errors(table: TimingTable | Sequence[int]) -> list[np.ndarray]:
    """SPDY's layer-independent error prior ``e_l(j) = (j / (n_l - 1))^2`` by option rank.

    ``UnstrDatabase.get_errors`` in the reference; ``n_l`` is the layer's option count (a
    single-option layer gets 0). Accepts a table or a list of option counts.
    """
    if isinstance(table, TimingTable):
        counts = [len(layer.labels) for layer in table.layers]
    else:
        counts = [int(n) for n in table]
        if any(n < 1 for n in counts):
            raise ValueError(f"option counts must be >= 1; got {counts}")
    # Python floats on purpose: ``(i / (n - 1)) ** 2`` via C ``pow`` is what the reference
    # computes, and it differs from NumPy's ``x * x`` in the last bit for some ranks.
    return [
        np.array([(i / (n - 1)) ** 2 for i in range(n)] if n > 1 else [0.0], np.float64)
        for n in counts
    ]

"""SPDY's reconstruction database (layer-wise AdaPrune) and global AdaPrune.

Reference: E. Frantar and D. Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees",
ICML 2022 (arXiv:2201.13096), Sec. 3.3 and 4; I. Hubara et al., "Accelerated Sparse Neural
Training" / AdaPrune (arXiv:2102.08124); ``adaprune.py`` (``gen`` and ``load`` modes) in
GitHub ``IST-DASLab/spdy``.

**Layer-wise AdaPrune (the database).** For every compressible layer ``l`` with dense kernel
``W_d`` and options ``o_0 (dense), o_1, ..., o_{n-1}`` in order of increasing compression, the
mask of option ``j`` is chosen on the reconstructed kernel of option ``j - 1`` (cumulative, as
the reference prunes the already-pruned weights further), and the kept weights are fitted with
Adam (lr ``1e-3``) so that the layer reproduces the *dense* model's output on the *dense*
model's layer inputs ``x``:

    min_W  || f(W ⊙ M_j, x) - f(W_d, x) ||^2 / || f(W_d, x) ||^2 ,

with ``f`` the layer's own computation (a matmul, a convolution with its strides and padding)
and the mask re-applied after every step; ``epochs`` passes over the calibration inputs in
mini-batches. The normalised error of every entry, before and after the fit, is kept with the
database.

**Global AdaPrune (gAP).** After a profile is stitched from the database, all parameters are
trained jointly with Adam (lr ``1e-5`` by default) on

    sum_l || f_l(W_l ⊙ M_l, x_l^p) - f_l(W_l^d, x_l^d) ||^2 / || f_l(W_l^d, x_l^d) ||^2 ,

where ``x_l^p`` is the layer input in the *compressed* model and ``x_l^d`` in the dense one;
masks are re-applied after every step.

**Capturing layer inputs without Flax.** Everything here sees params pytrees and two
user-supplied pieces: ``layer_fns[name](kernel, x) -> y``, the layer's computation, and a
``taps_fn(params, x) -> {name: layer input}`` forward that returns every compressible
layer's input (for a BatchNorm CNN in eval mode, a functional forward over the params and the
running statistics, or an ``nnx.capture``/``sow`` forward; see ``experiments/spdy/model.py``
for a functional SmallCNN). ``name`` is the kernel leaf's
:func:`jaxcompress.masks.path_str` (``"blocks/0/conv/kernel"``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress._checks import check_int
from jaxcompress.masks import apply as apply_masks
from jaxcompress.masks import keep_count, path_str

__all__ = [
    "Database",
    "adaprune_layer",
    "build_database",
    "channel_mask",
    "global_adaprune",
    "layer_error",
    "unstructured_mask",
]

LayerFn = Callable[[jax.Array, jax.Array], jax.Array]
TapsFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]
MaskFn = Callable[[np.ndarray, Any, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------
# Masks (host side: they run once per database entry, never in a hot loop).
# --------------------------------------------------------------------------------------


def _sparsity_arg(option: Any, fn: str) -> float:
    if isinstance(option, bool) or not isinstance(option, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: option must be a sparsity in [0, 1); got {option!r}")
    s = float(option)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"{fn}: option must be a sparsity in [0, 1); got {option!r}")
    return s


def _top_keep(scores: np.ndarray, alive: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask of the ``keep`` largest ``scores`` among ``alive`` (lower index wins ties)."""
    s = np.where(alive, scores, -np.inf)
    order = np.argsort(-s, kind="stable")
    out = np.zeros(s.shape[0], bool)
    out[order[:keep]] = True
    return out & alive


def unstructured_mask(w: Any, option: Any, prev_mask: Any = None) -> np.ndarray:
    """Magnitude mask keeping ``ceil(N (1 - s))`` entries of ``w`` (``s = option``).

    Only entries kept by ``prev_mask`` compete (cumulative pruning over increasing sparsity, as
    the reference database). Ties go to the lower row-major index.
    """
    s = _sparsity_arg(option, "unstructured_mask")
    w = np.asarray(w)
    alive = np.ones(w.size, bool) if prev_mask is None else np.asarray(prev_mask, bool).ravel()
    keep = min(keep_count(w.size, s), int(alive.sum()))
    return _top_keep(np.abs(w).ravel(), alive, keep).reshape(w.shape)


def channel_mask(w: Any, option: Any, prev_mask: Any = None) -> np.ndarray:
    """Structured mask keeping ``ceil(C (1 - s))`` output channels (last axis) of ``w``.

    Channels are ranked by the L2 norm of their filter (``w[..., c]``); only channels alive in
    ``prev_mask`` compete. A Flax Dense ``(in, out)`` or Conv ``(kh, kw, in, out)`` kernel with
    this mask computes exactly the layer with the dropped outputs removed.
    """
    s = _sparsity_arg(option, "channel_mask")
    w = np.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"channel_mask: kernel must have ndim >= 2; got shape {w.shape}")
    c = w.shape[-1]
    flat = w.reshape(-1, c)
    if prev_mask is None:
        alive = np.ones(c, bool)
    else:
        alive = np.asarray(np.asarray(prev_mask, bool).reshape(-1, c).any(axis=0))
    keep = min(keep_count(c, s), int(alive.sum()))
    chans = _top_keep(np.sqrt((flat.astype(np.float64) ** 2).sum(axis=0)), alive, keep)
    return np.broadcast_to(chans, w.shape).copy()


# --------------------------------------------------------------------------------------
# Layer-wise AdaPrune.
# --------------------------------------------------------------------------------------


def _normalised_sq_error(y: jax.Array, y_ref: jax.Array) -> jax.Array:
    num = jnp.sum(jnp.square((y - y_ref).astype(jnp.float32)))
    den = jnp.sum(jnp.square(y_ref.astype(jnp.float32)))
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


@jax.jit(static_argnames=("layer_fn",))
def _layer_error(layer_fn, w, w_dense, x):
    return _normalised_sq_error(layer_fn(w, x), layer_fn(w_dense, x))


def layer_error(layer_fn: LayerFn, w: Any, w_dense: Any, x: Any) -> float:
    """``||f(w, x) - f(w_dense, x)||^2 / ||f(w_dense, x)||^2`` over all of ``x`` (jitted)."""
    return float(_layer_error(layer_fn, jnp.asarray(w), jnp.asarray(w_dense), jnp.asarray(x)))


def _adam_state(w: Any) -> Any:
    """Adam's state does not depend on the learning rate, so one ``init`` serves every lr."""
    return optax.adam(1.0).init(w)


@jax.jit(static_argnames=("layer_fn",))
def _layer_step(layer_fn, w, opt, w_dense, mask, xb, lr):
    """One AdaPrune step: Adam on the normalised output error, then ``w * mask``."""

    def loss_fn(w):
        return _normalised_sq_error(layer_fn(w, xb), layer_fn(w_dense, xb))

    loss, g = jax.value_and_grad(loss_fn)(w)
    upd, opt = optax.adam(lr).update(g, opt, w)
    return optax.apply_updates(w, upd) * mask.astype(w.dtype), opt, loss


def _batches(n: int, batch_size: int, epochs: int, seed: int):
    """``epochs`` reshuffled passes of ``n // batch_size`` index batches (numpy, seeded)."""
    rng = np.random.default_rng(seed)
    steps = n // batch_size
    for _ in range(epochs):
        yield from rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)


def _fit_layer(layer_fn, w0, w_dense, mask, x, seed, lr, *, epochs, batch_size):
    # A Python loop over one jitted step: on XLA:CPU the same step inside lax.scan ran its
    # convolutions about 15x slower (measured on SmallCNN layers) than dispatched on its own.
    w = w0 * mask.astype(w0.dtype)
    opt = _adam_state(w)
    x_host = np.asarray(x)
    losses = []
    for idx in _batches(x_host.shape[0], batch_size, epochs, seed):
        w, opt, loss = _layer_step(layer_fn, w, opt, w_dense, mask, x_host[idx], lr)
        losses.append(loss)
    steps = x_host.shape[0] // batch_size
    return w, jnp.stack(losses).reshape(epochs, steps).mean(axis=1)


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a positive float; got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive float; got {value!r}")
    return float(value)


def adaprune_layer(
    layer_fn: LayerFn,
    w_dense: Any,
    mask: Any,
    x: Any,
    *,
    init: Any = None,
    lr: float = 1e-3,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Fit the kept weights of one layer to the dense layer's outputs (AdaPrune).

    Minimises ``||f(W ⊙ M, x) - f(W_d, x)||^2 / ||f(W_d, x)||^2`` per mini-batch with Adam,
    starting from ``init ⊙ M`` (default ``W_d ⊙ M``) and re-applying ``M`` after every step.
    ``epochs`` passes over ``x`` (reshuffled each pass; a last partial batch is dropped).
    One jitted step, compiled once per ``(layer_fn, shapes)``; ``lr`` is data.

    Args:
      layer_fn: ``(kernel, inputs) -> outputs``; must be hashable (a module-level function or
        a ``functools.partial`` of one) since it is a static argument of the jitted fit.
      w_dense: the dense kernel ``W_d`` (the fit's target is ``f(W_d, x)``).
      mask: boolean array of ``w_dense``'s shape (True = kept).
      x: the dense model's inputs to this layer, leading axis = samples.
      init: starting kernel (e.g. the previous, less sparse reconstruction); default ``W_d``.
      lr, epochs, batch_size: Adam learning rate, passes, mini-batch size.
      seed: seeds the (numpy) shuffling.

    Returns:
      ``(kernel, loss_per_epoch)``; ``kernel`` is exactly zero where ``mask`` is False.
    """
    if not callable(layer_fn):
        raise TypeError(f"layer_fn must be callable; got {layer_fn!r}")
    w_dense = jnp.asarray(w_dense)
    mask = jnp.asarray(mask)
    x = jnp.asarray(x)
    if mask.shape != w_dense.shape or mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be a bool array of shape {w_dense.shape}; got {mask.dtype}{mask.shape}"
        )
    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size)
    if x.ndim < 1 or x.shape[0] < batch_size:
        raise ValueError(
            f"x must hold at least batch_size={batch_size} samples; got shape {tuple(x.shape)}"
        )
    lr = _check_lr("lr", lr)
    w0 = w_dense if init is None else jnp.asarray(init, w_dense.dtype)
    if w0.shape != w_dense.shape:
        raise ValueError(f"init must have shape {w_dense.shape}; got {w0.shape}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    return _fit_layer(
        layer_fn,
        w0,
        w_dense,
        mask,
        x,
        int(seed),
        jnp.float32(lr),
        epochs=epochs,
        batch_size=batch_size,
    )


@dataclasses.dataclass(frozen=True)
class Database:
    """Reconstructed kernels of every (layer, option), with their masks and errors.

    Attributes:
      names: layer names (kernel :func:`jaxcompress.masks.path_str`), in model order.
      labels: per layer, one label per option (``"0.0000"``, ``"0.5000"``, ``"keep=16"``, ...).
      kernels: ``name -> float[n, *shape]``: the kernel of every option (option 0 = dense).
      masks: ``name -> bool[n, *shape]``.
      errors: ``name -> float[n]``: normalised layer output error after AdaPrune.
      raw_errors: ``name -> float[n]``: the same error of the plain magnitude-pruned kernel.
    """

    names: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    kernels: Mapping[str, np.ndarray]
    masks: Mapping[str, np.ndarray]
    errors: Mapping[str, np.ndarray]
    raw_errors: Mapping[str, np.ndarray]

    def __post_init__(self):
        if len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.names)} names but {len(self.labels)} label tuples")
        for name, labels in zip(self.names, self.labels, strict=True):
            n = len(labels)
            for field in ("kernels", "masks", "errors", "raw_errors"):
                arr = getattr(self, field).get(name)
                if arr is None or arr.shape[0] != n:
                    raise ValueError(f"{field}[{name!r}] must have {n} entries (one per option)")

    def error_list(self, *, raw: bool = False) -> list[np.ndarray]:
        """Per-layer errors in :attr:`names` order (the ``errors`` argument of ``solve``)."""
        src = self.raw_errors if raw else self.errors
        return [np.asarray(src[n], np.float64) for n in self.names]

    def stitch(self, params: Any, choice: Sequence[int] | Mapping[str, int]) -> tuple[Any, Any]:
        """``params`` with each database layer's kernel replaced by the chosen option's.

        Args:
          params: the params pytree the database was built from (any structure; leaves are
            matched by :func:`jaxcompress.masks.path_str`).
          choice: one option index per layer in :attr:`names` order, or ``{name: index}``.

        Returns:
          ``(params, masks)``; ``masks`` mirrors ``params`` with the chosen bool mask for
          database layers and ``None`` elsewhere.
        """
        if isinstance(choice, Mapping):
            unknown = sorted(set(choice) - set(self.names))
            if unknown or len(choice) != len(self.names):
                raise ValueError(f"choice must give one index for each of {list(self.names)}")
            idx = {n: int(choice[n]) for n in self.names}
        else:
            flat = [int(c) for c in np.asarray(choice).reshape(-1)]
            if len(flat) != len(self.names):
                raise ValueError(f"choice has {len(flat)} entries for {len(self.names)} layers")
            idx = dict(zip(self.names, flat, strict=True))
        for (name, j), labels in zip(idx.items(), self.labels, strict=True):
            if not 0 <= j < len(labels):
                raise ValueError(f"choice {j} out of range for layer {name!r}")
        found = set()

        def put(path, leaf):
            name = path_str(path)
            if name not in idx:
                return leaf, None
            found.add(name)
            k = self.kernels[name][idx[name]]
            if tuple(k.shape) != tuple(np.shape(leaf)):
                raise ValueError(f"layer {name!r}: database shape {k.shape} != {np.shape(leaf)}")
            return jnp.asarray(k, dtype=leaf.dtype), jnp.asarray(self.masks[name][idx[name]])

        pairs = jax.tree_util.tree_map_with_path(put, params)
        is_pair = lambda t: isinstance(t, tuple) and len(t) == 2  # noqa: E731
        missing = sorted(set(self.names) - found)
        if missing:
            raise ValueError(f"params has no leaves named {missing}")
        new_params = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
        masks = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
        return new_params, masks

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.npz`` (arrays only; loaded with ``allow_pickle=False``)."""
        arrays = {
            "names": np.array(self.names),
            "num_options": np.array([len(x) for x in self.labels]),
        }
        arrays["labels"] = np.array([lab for labels in self.labels for lab in labels])
        for i, n in enumerate(self.names):
            arrays[f"kernels_{i}"] = np.asarray(self.kernels[n])
            arrays[f"masks_{i}"] = np.asarray(self.masks[n])
            arrays[f"errors_{i}"] = np.asarray(self.errors[n])
            arrays[f"raw_errors_{i}"] = np.asarray(self.raw_errors[n])
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Database:
        """Read a database written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            names = tuple(str(n) for n in f["names"])
            counts = [int(c) for c in f["num_options"]]
            flat = [str(x) for x in f["labels"]]
            labels, start = [], 0
            for c in counts:
                labels.append(tuple(flat[start : start + c]))
                start += c
            get = lambda key: {n: f[f"{key}_{i}"] for i, n in enumerate(names)}  # noqa: E731
            return cls(
                names,
                tuple(labels),
                get("kernels"),
                get("masks"),
                get("errors"),
                get("raw_errors"),
            )


@dataclasses.dataclass
class Entries:
    """A :class:`Database` as its layers are built (:func:`build_database`, ``obs_database``).

    ``tag`` prefixes the progress line printed per layer when ``progress``; ``raw`` names the
    plain magnitude-pruned kernel's error in it."""

    tag: str
    raw: str
    progress: bool
    labels: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    kernels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    errors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    raw_errors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, name: str, labels: tuple[str, ...], ks, ms, es, rs) -> None:
        """One layer's options: kernels, masks, errors and raw errors (lists, one per option)."""
        self.labels.append(labels)
        self.kernels[name], self.masks[name] = np.stack(ks), np.stack(ms)
        self.errors[name], self.raw_errors[name] = np.asarray(es), np.asarray(rs)
        if self.progress:
            print(
                f"[{self.tag}] {name}: {len(labels)} options, error {es[-1]:.4f} "
                f"({self.raw} {rs[-1]:.4f}) at {labels[-1]}",
                flush=True,
            )

    def database(self, names: tuple[str, ...]) -> Database:
        return Database(
            names, tuple(self.labels), self.kernels, self.masks, self.errors, self.raw_errors
        )


def _default_label(o: Any) -> str:
    return f"{o:.4f}" if isinstance(o, (float, int, np.floating, np.integer)) else str(o)


def _kernel_leaves(params: Any, names: Sequence[str]) -> dict[str, Any]:
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if name in names:
            found[name] = leaf
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"params has no leaves named {missing}")
    return found


def build_database(
    params: Any,
    layer_fns: Mapping[str, LayerFn],
    inputs: Mapping[str, Any],
    options: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    mask_fn: MaskFn = unstructured_mask,
    label_fn: Callable[[Any], str] | None = None,
    reconstruct: bool = True,
    lr: float = 1e-3,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> Database:
    """Build SPDY's reconstruction database with layer-wise AdaPrune.

    For each layer in ``layer_fns`` order and each option ``o_j`` (``o_0`` must leave the layer
    dense), ``M_j = mask_fn(W_{j-1}, o_j, M_{j-1})`` on the previous reconstruction
    ``W_{j-1}`` (cumulative), then ``W_j = adaprune_layer(f, W_d, M_j, x, init=W_{j-1})``.

    Args:
      params: the dense params pytree.
      layer_fns: ``name -> (kernel, x) -> y``, in model order; ``name`` is a kernel leaf's
        :func:`jaxcompress.masks.path_str`. Each must be hashable (module-level or partial).
      inputs: ``name -> x``: the dense model's calibration inputs to that layer (capture them
        with a ``taps_fn``; see the module docstring).
      options: options shared by all layers or ``name -> options``, in increasing compression.
      mask_fn: ``(kernel, option, prev_mask) -> bool mask``: :func:`unstructured_mask`
        (default), :func:`channel_mask`, or any other.
      label_fn: option -> label; default ``f"{o:.4f}"`` for numbers.
      reconstruct: False stores the plain magnitude-pruned kernels (no AdaPrune).
      lr, epochs, batch_size, seed: AdaPrune settings (reference: 1e-3, 10, 32).
      progress: print one line per layer.

    Returns:
      A :class:`Database`.
    """
    if not isinstance(layer_fns, Mapping) or not layer_fns:
        raise ValueError("layer_fns must be a non-empty mapping name -> (kernel, x) -> y")
    if not isinstance(inputs, Mapping) or set(inputs) != set(layer_fns):
        raise ValueError(
            f"inputs must map exactly the layers of layer_fns {list(layer_fns)}; "
            f"got {list(inputs) if isinstance(inputs, Mapping) else inputs!r}"
        )
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable; got {mask_fn!r}")
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    _check_lr("lr", lr)
    label_fn = label_fn or _default_label
    names = tuple(layer_fns)
    leaves = _kernel_leaves(params, names)
    entries = Entries("database", "magnitude only", progress)
    for li, name in enumerate(names):
        opts = options[name] if isinstance(options, Mapping) else options
        if len(opts) == 0:
            raise ValueError(f"layer {name!r} has no options")
        fn = layer_fns[name]
        w_dense = jnp.asarray(leaves[name])
        x = jnp.asarray(inputs[name])
        prev_w, prev_m = np.asarray(w_dense), np.ones(w_dense.shape, bool)
        ks, ms, es, rs = [], [], [], []
        for j, opt in enumerate(opts):
            m = np.asarray(mask_fn(prev_w, opt, prev_m), bool)
            if m.shape != w_dense.shape:
                raise ValueError(f"mask_fn returned shape {m.shape} for kernel {w_dense.shape}")
            if j == 0 and not m.all():
                raise ValueError(f"layer {name!r}: option 0 ({opt!r}) must keep the layer dense")
            if np.any(m & ~prev_m):
                raise ValueError(f"layer {name!r}: mask of option {opt!r} is not cumulative")
            raw = jnp.where(m, w_dense, 0)
            rs.append(layer_error(fn, raw, w_dense, x))
            start = jnp.where(m, jnp.asarray(prev_w), 0)
            if reconstruct and not m.all() and m.any():
                w, _ = adaprune_layer(
                    fn,
                    w_dense,
                    jnp.asarray(m),
                    x,
                    init=start,
                    lr=lr,
                    epochs=epochs,
                    batch_size=min(batch_size, x.shape[0]),
                    seed=seed * 1_000_003 + li * 1000 + j,
                )
            else:
                w = start if reconstruct else raw
            es.append(layer_error(fn, w, w_dense, x))
            prev_w, prev_m = np.asarray(w), m
            ks.append(prev_w)
            ms.append(m)
        entries.add(name, tuple(label_fn(o) for o in opts), ks, ms, es, rs)
    return entries.database(names)


# --------------------------------------------------------------------------------------
# Global AdaPrune.
# --------------------------------------------------------------------------------------


class _Static:
    """Hashable-by-identity bundle of the user's functions (a static jit argument)."""

    def __init__(self, taps_fn: TapsFn, layer_fns: Mapping[str, LayerFn]):
        self.taps_fn = taps_fn
        self.layer_fns = tuple(layer_fns.items())
        self._key = (id(taps_fn), tuple((n, id(f)) for n, f in self.layer_fns))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _layer_outputs(static: _Static, params: Any, x: jax.Array) -> dict[str, jax.Array]:
    taps = static.taps_fn(params, x)
    leaves = {
        path_str(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if path_str(p) in taps
    }
    return {name: fn(leaves[name], taps[name]) for name, fn in static.layer_fns}


def global_loss(static: _Static, params: Any, dense_params: Any, x: jax.Array) -> jax.Array:
    ours = _layer_outputs(static, params, x)
    ref = jax.lax.stop_gradient(_layer_outputs(static, dense_params, x))
    return jnp.sum(jnp.stack([_normalised_sq_error(ours[n], ref[n]) for n, _ in static.layer_fns]))


@jax.jit(static_argnames=("static",))
def _global_step(static, params, opt, dense_params, masks, trainable, xb, lr):
    """One global AdaPrune step: Adam on the summed normalised errors, masks re-applied."""
    loss, g = jax.value_and_grad(global_loss, argnums=1)(static, params, dense_params, xb)
    g = jax.tree.map(lambda gi, t: gi * t, g, trainable)
    upd, opt = optax.adam(lr).update(g, opt, params)
    return apply_masks(optax.apply_updates(params, upd), masks), opt, loss


def global_adaprune(
    params: Any,
    masks: Any,
    dense_params: Any,
    taps_fn: TapsFn,
    layer_fns: Mapping[str, LayerFn],
    x: Any,
    *,
    lr: float = 1e-5,
    epochs: int = 100,
    batch_size: int = 32,
    trainable: Callable[[Any, Any], bool] | None = None,
    seed: int = 0,
) -> tuple[Any, jax.Array]:
    """Global AdaPrune: jointly fit all parameters to the dense model's layer outputs.

    Loss per mini-batch: ``sum_l ||f_l(W_l, x_l^p) - f_l(W_l^d, x_l^d)||^2 /
    ||f_l(W_l^d, x_l^d)||^2`` (module docstring); Adam with ``lr`` (reference: 1e-5, 100
    passes, batch 32); ``masks`` re-applied after every step. One jitted step, compiled
    once per ``(taps_fn, layer_fns, shapes)``, driven by a Python loop (see ``_fit_layer``).

    Args:
      params: the stitched (compressed) params pytree.
      masks: mask tree mirroring ``params`` (``None`` where not pruned), e.g. from
        :meth:`Database.stitch`.
      dense_params: the dense params (targets).
      taps_fn: ``(params, x) -> {name: layer input}`` for every name in ``layer_fns``;
        differentiable in ``params`` (eval-mode BatchNorm: running statistics are constants
        closed over by ``taps_fn``).
      layer_fns: ``name -> (kernel, x) -> y``.
      x: calibration inputs, leading axis = samples.
      lr, epochs, batch_size, seed: Adam learning rate, passes, mini-batch, shuffling seed.
      trainable: ``(path, leaf) -> bool``; leaves it rejects get zero gradient. Default: every
        floating leaf.

    Returns:
      ``(params, loss_per_epoch)``.
    """
    if not callable(taps_fn):
        raise TypeError(f"taps_fn must be callable; got {taps_fn!r}")
    if not isinstance(layer_fns, Mapping) or not layer_fns:
        raise ValueError("layer_fns must be a non-empty mapping name -> (kernel, x) -> y")
    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size)
    lr = _check_lr("lr", lr)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < batch_size:
        raise ValueError(
            f"x must hold at least batch_size={batch_size} samples; got shape {tuple(x.shape)}"
        )
    _kernel_leaves(params, tuple(layer_fns))
    if trainable is None:
        trainable = lambda path, leaf: jnp.issubdtype(jnp.result_type(leaf), jnp.floating)  # noqa: E731
    train_tree = jax.tree_util.tree_map_with_path(
        lambda p, leaf: jnp.asarray(1.0 if trainable(p, leaf) else 0.0, jnp.result_type(leaf)),
        params,
    )
    static = _Static(taps_fn, layer_fns)
    params = apply_masks(params, masks)
    opt = _adam_state(params)
    lr_arr = jnp.float32(lr)
    x_host = np.asarray(x)
    losses = []
    for idx in _batches(x_host.shape[0], batch_size, epochs, seed):
        params, opt, loss = _global_step(
            static, params, opt, dense_params, masks, train_tree, x_host[idx], lr_arr
        )
        losses.append(loss)
    steps = x_host.shape[0] // batch_size
    return params, jnp.stack(losses).reshape(epochs, steps).mean(axis=1)

"""Public N:M matmul with ``implementation=`` dispatch and a custom VJP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.kernels._common import MetaLayout, check_array, resolve_implementation
from jaxcompress.kernels._nm_matmul.config import MIN_GPU_DOT, NMMatmulConfig
from jaxcompress.kernels._nm_matmul.kernel import nm_matmul_pallas
from jaxcompress.kernels._nm_matmul.reference import nm_matmul_reference
from jaxcompress.kernels._nm_pack.format import PackedNM, check_packed
from jaxcompress.kernels._nm_pack.reference import unpack_reference, unpack_words

_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def check_config(config: object) -> NMMatmulConfig | None:
    """``config`` if it is ``None`` or an :class:`NMMatmulConfig`, else a ``TypeError``."""
    if config is not None and not isinstance(config, NMMatmulConfig):
        raise TypeError(
            f"config: expected an NMMatmulConfig (tile sizes, e.g. NMMatmulConfig(block_k=128)) "
            f"or None, got {type(config).__name__} {config!r}"
        )
    return config


def resolve_config(
    config: NMMatmulConfig | None,
    batch: int,
    shape: tuple[int, int],
    n: int,
    m: int,
    impl: str,
    itemsize: int = 2,
) -> NMMatmulConfig | None:
    """The checked tile config for ``impl``; ``None`` for ``'xla'``, which has no tiles.

    The type is checked on every path; the tiles only where they are used.
    """
    config = check_config(config)
    if impl == "xla":
        return None
    layout = MetaLayout(n, m)
    min_dot = MIN_GPU_DOT if impl == "pallas" else 1
    if config is None:
        config = NMMatmulConfig.default(
            batch, shape[0], shape[1], layout, min_dot=min_dot, itemsize=itemsize
        )
    config.check(shape[0], shape[1], layout, min_dot=min_dot)
    return config


def _forward(x, values, meta, shape, n, m, impl, config):
    if impl == "xla":
        return nm_matmul_reference(x, values, meta, shape, n, m)
    return nm_matmul_pallas(
        x, values, meta, shape=shape, n=n, m=m, config=config, interpret=impl == "interpret"
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _nm_matmul_2d(x, values, meta, shape, n, m, impl, config):
    return _forward(x, values, meta, shape, n, m, impl, config)


def _nm_matmul_fwd(x, values, meta, shape, n, m, impl, config):
    return _forward(x, values, meta, shape, n, m, impl, config), (x, values, meta)


@functools.partial(jax.jit, static_argnames=("shape", "n", "m"))
def _backward(x, values, meta, dy, shape, n, m):
    k, cols = shape
    w = unpack_reference(values, meta, shape, n, m)
    dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(x.T, dy, preferred_element_type=jnp.float32)
    idx = unpack_words(meta, k // m * n, MetaLayout(n, m)).reshape(k // m, n, cols)
    dvalues = jnp.take_along_axis(dw.reshape(k // m, m, cols), idx, axis=1)
    return dx, dvalues.reshape(values.shape).astype(values.dtype)


def _nm_matmul_bwd(shape, n, m, impl, config, residuals, dy):
    """Cotangents of ``y = x @ W(values)``.

    ``dx = dy @ W^T`` and ``dvalues[g*n+t, j] = (x^T dy)[g*m + idx[g,t,j], j]``: the dense
    weight gradient restricted to the kept positions. ``meta`` is integer data (float0).
    """
    x, values, meta = residuals
    dx, dvalues = _backward(x, values, meta, dy, shape, n, m)
    dmeta = np.zeros(meta.shape, dtype=jax.dtypes.float0)
    return dx, dvalues, dmeta


_nm_matmul_2d.defvjp(_nm_matmul_fwd, _nm_matmul_bwd)
_nm_matmul_2d_jit = jax.jit(_nm_matmul_2d, static_argnums=(3, 4, 5, 6, 7))


def check_operands(x, packed) -> tuple[jax.Array, PackedNM]:
    """Type/shape/dtype checks shared by :func:`nm_matmul` and :func:`nm_linear`."""
    packed = check_packed("packed", packed)
    x = check_array("x", x, min_ndim=1)
    dtype = jnp.dtype(x.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got dtype {dtype}")
    if jnp.dtype(packed.values.dtype) != dtype:
        raise TypeError(
            f"x.dtype ({dtype}) must equal packed.dtype ({packed.values.dtype}); cast one of them"
        )
    if x.shape[-1] != packed.shape[0]:
        raise ValueError(
            f"x.shape[-1]={x.shape[-1]} must equal K={packed.shape[0]} of the packed weight "
            f"(shape {packed.shape}); got x of shape {tuple(x.shape)}"
        )
    return x, packed


def nm_matmul(
    x: jax.Array,
    packed: PackedNM,
    *,
    implementation: str | None = None,
    config: NMMatmulConfig | None = None,
) -> jax.Array:
    """``y = x @ W`` with an N:M-sparse ``W`` given packed (:func:`pack_nm`).

    .. math:: y_{\\dots j} = \\sum_{g}\\sum_{t<n} x_{\\dots,\\,gm + \\mathrm{idx}_{gtj}}\\,
       v_{gn+t,\\,j}

    Accumulation is float32; the output has ``x.dtype``. Differentiable in ``x`` and
    ``packed.values`` through a ``jax.custom_vjp`` (``pallas_call`` has no autodiff):
    ``dx = dy W^T`` and ``dvalues`` = ``x^T dy`` at the kept positions; the backward uses
    dense XLA ops.

    Args:
      x: ``(..., K)`` float32/bfloat16/float16, same dtype as ``packed``; any leading dims.
      packed: the weight, ``K x N``.
      implementation: ``'xla'`` (reference: unpack + ``jnp.dot``), ``'pallas'`` (GPU
        Triton kernel), ``'interpret'`` (that kernel in Pallas interpret mode) or ``None``
        (``'pallas'`` on GPU, else ``'xla'``).
      config: an :class:`NMMatmulConfig` with the tiles of the Pallas paths, or ``None``
        (:meth:`NMMatmulConfig.default` for this shape). Any other type is a ``TypeError``
        on every path. ``'pallas'``/``'interpret'`` check that the tiles fit the weight;
        ``'xla'`` has no tiles and does not use them, so portable code may pass one config
        for every platform.

    Returns:
      ``(..., N)`` array of ``x.dtype``.

    Raises:
      TypeError: ``config`` not an ``NMMatmulConfig`` or ``None``; operand types/dtypes.
      ValueError: on the Pallas paths, a config whose tiles do not fit the weight;
        mismatched shapes; an unknown ``implementation``.
    """
    config = check_config(config)
    x, packed = check_operands(x, packed)
    impl = resolve_implementation(implementation)
    k, cols = packed.shape
    lead = x.shape[:-1]
    batch = int(np.prod(lead)) if lead else 1
    if batch == 0 or cols == 0 or k == 0:
        return jnp.zeros((*lead, cols), x.dtype)
    config = resolve_config(config, batch, packed.shape, packed.n, packed.m, impl, x.dtype.itemsize)
    y = _nm_matmul_2d_jit(
        x.reshape(batch, k),
        packed.values,
        packed.meta,
        packed.shape,
        packed.n,
        packed.m,
        impl,
        config,
    )
    return y.reshape(*lead, cols)

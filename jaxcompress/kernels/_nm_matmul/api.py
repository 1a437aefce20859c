"""Public N:M matmul with ``implementation=`` dispatch and a custom VJP."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.kernels._common import (
    FLOAT_DTYPES,
    MetaLayout,
    check_array,
    resolve_implementation,
)
from jaxcompress.kernels._nm_matmul.config import NMMatmulConfig, check_problem
from jaxcompress.kernels._nm_matmul.kernel import nm_matmul_mosaic
from jaxcompress.kernels._nm_matmul.reference import nm_matmul_reference
from jaxcompress.kernels._nm_pack.format import PackedNM, check_packed
from jaxcompress.kernels._nm_pack.reference import unpack_fields, unpack_reference

INTERPRETER_TAKES_REGISTER_A = jax.__version_info__ >= (0, 12)
"""Whether the Mosaic GPU interpreter runs ``wgmma`` with its A operand in registers."""


def check_config(config: object) -> NMMatmulConfig | None:
    """``config`` if it is ``None`` or an :class:`NMMatmulConfig`, else a ``TypeError``."""
    if config is not None and not isinstance(config, NMMatmulConfig):
        raise TypeError(
            f"config: expected an NMMatmulConfig (tile sizes, e.g. NMMatmulConfig(block_k=128)) "
            f"or None, got {type(config).__name__} {config!r}"
        )
    return config


def resolve_config(
    config: NMMatmulConfig | None, batch: int, packed: PackedNM, impl: str
) -> NMMatmulConfig | None:
    """The checked tile config for ``impl``; ``None`` for ``'xla'``, which has no tiles.

    The type is checked on every path; the tiles only where they are used.
    """
    config = check_config(config)
    if impl == "xla":
        return None
    k, cols = packed.shape
    layout = packed.layout
    if config is None:
        check_problem(batch, k, layout, packed.stride)
        config = NMMatmulConfig.default(batch, k, cols, layout)
        if impl == "interpret" and not INTERPRETER_TAKES_REGISTER_A:
            config = dataclasses.replace(config, expand="smem")
    config.check(batch, k, cols, layout, packed.stride)
    if impl == "interpret" and config.expand == "registers" and not INTERPRETER_TAKES_REGISTER_A:
        raise ValueError(
            f"the Mosaic GPU interpreter of jax {jax.__version__} reads wgmma's A operand only "
            "from shared memory; use NMMatmulConfig(expand='smem') for "
            "implementation='interpret' (jax >= 0.12 interprets both)"
        )
    return config


def _forward(x, values, meta, shape, n, m, stride, impl, config):
    if impl == "xla":
        return nm_matmul_reference(x, values, meta, shape, n, m, stride)
    return nm_matmul_mosaic(
        x, values, meta, shape=shape, n=n, m=m, config=config, interpret=impl == "interpret"
    )


_STATIC = (3, 4, 5, 6, 7, 8)


@functools.partial(jax.custom_vjp, nondiff_argnums=_STATIC)
def _nm_matmul_2d(x, values, meta, shape, n, m, stride, impl, config):
    return _forward(x, values, meta, shape, n, m, stride, impl, config)


def _nm_matmul_fwd(x, values, meta, shape, n, m, stride, impl, config):
    return _forward(x, values, meta, shape, n, m, stride, impl, config), (x, values, meta)


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "stride"))
def _backward(x, values, meta, dy, shape, n, m, stride):
    k, cols = shape
    w = unpack_reference(values, meta, shape, n, m, stride)
    dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(x.T, dy, preferred_element_type=jnp.float32)  # (K, N)
    idx = unpack_fields(meta, k // m, MetaLayout(n, m, values.dtype.itemsize), stride)
    dw_groups = dw.reshape(k // m, m, cols).transpose(2, 0, 1)  # (N, G, m)
    dvalues = jnp.take_along_axis(dw_groups[None], idx[..., None], axis=-1)[..., 0]
    return dx, dvalues.astype(values.dtype)


def _nm_matmul_bwd(shape, n, m, stride, impl, config, residuals, dy):
    """Cotangents of ``y = x @ W(values)``.

    ``dx = dy @ W^T`` and ``dvalues[t, j, g] = (x^T dy)[g*m + idx[t, j, g], j]``: the dense
    weight gradient restricted to the kept positions. ``meta`` is integer data (float0).
    """
    x, values, meta = residuals
    dx, dvalues = _backward(x, values, meta, dy, shape, n, m, stride)
    dmeta = np.zeros(meta.shape, dtype=jax.dtypes.float0)
    return dx, dvalues, dmeta


_nm_matmul_2d.defvjp(_nm_matmul_fwd, _nm_matmul_bwd)
_nm_matmul_2d_jit = jax.jit(_nm_matmul_2d, static_argnums=_STATIC)


def check_operands(x, packed) -> tuple[jax.Array, PackedNM]:
    """Type/shape/dtype checks shared by :func:`nm_matmul` and :func:`nm_linear`."""
    packed = check_packed("packed", packed)
    x = check_array("x", x, min_ndim=1)
    dtype = jnp.dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
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
      implementation: ``'xla'`` (reference: unpack + ``jnp.dot``, fused by XLA),
        ``'mosaic'`` (the Mosaic GPU kernel, sm90 only), ``'interpret'`` (that kernel in the
        Mosaic GPU interpreter, any machine) or ``None`` (``'mosaic'`` on an H100/H200,
        else ``'xla'``). To choose by measured speed use :func:`nm_linear`.
      config: an :class:`NMMatmulConfig` with the tiles of the kernel, or ``None``
        (:meth:`NMMatmulConfig.default` for this shape). Any other type is a ``TypeError``
        on every path. ``'mosaic'``/``'interpret'`` check that the tiles fit the problem;
        ``'xla'`` has no tiles and does not use them, so portable code may pass one config
        for every platform.

    Returns:
      ``(..., N)`` array of ``x.dtype``.

    Raises:
      TypeError: ``config`` not an ``NMMatmulConfig`` or ``None``; operand types/dtypes.
      ValueError: on the kernel paths, a problem the kernel cannot run (16-bit operands
        only, ``K`` a multiple of the layout period, 512 for 2:4, at most 64 rows) or a
        config whose tiles do not fit it; mismatched shapes; an unknown
        ``implementation``; ``'mosaic'`` on a device that is not an sm90 GPU. All raised
        before any launch.
    """
    config = check_config(config)
    x, packed = check_operands(x, packed)
    impl = resolve_implementation(implementation)
    k, cols = packed.shape
    lead = x.shape[:-1]
    batch = int(np.prod(lead)) if lead else 1
    if batch == 0 or cols == 0 or k == 0:
        return jnp.zeros((*lead, cols), x.dtype)
    config = resolve_config(config, batch, packed, impl)
    y = _nm_matmul_2d_jit(
        x.reshape(batch, k),
        packed.values,
        packed.meta,
        packed.shape,
        packed.n,
        packed.m,
        packed.stride,
        impl,
        config,
    )
    return y.reshape(*lead, cols)

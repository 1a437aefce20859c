"""Mosaic GPU (sm90) N:M matmul: stream packed planes, expand on chip, dense ``wgmma``.

No JAX path reaches Hopper's 2:4 sparse tensor cores (Mosaic GPU's ``wgmma`` has no sparse
form), so the kernel saves memory traffic instead: it reads the value planes and index
words of :class:`~jaxcompress.kernels.PackedNM` (9/16 of the dense bytes for bf16 2:4) and
expands them to dense tiles next to the tensor cores.

The product is computed transposed, ``y^T = W^T x^T`` ("swap AB"): a block owns
``block_n`` output units (the ``wgmma`` M side) and the padded batch is the ``wgmma`` N
side, so a decode step uses the tensor cores with no padding of the weight side. ``K`` is
visited in sub-tiles of ``KERNEL_STRIDE`` (16) groups; for sub-tile ``q`` the indices of
slot ``t`` are field ``q mod per_word`` of one 16-wide tile of index words, so

.. math:: W^T_c = \\sum_{t<n} [\\mathrm{idx}_t = c]\\, V_t,\\qquad
   y^T \\mathrel{+}= \\sum_{c<m} W^T_c\\, X_c

where ``V_t`` is the ``(block_n, 16)`` tile of value plane ``t``, ``W^T_c`` holds the dense
rows ``g*m + c`` of the 16 groups and ``X_c`` the matching rows of ``x^T``. Every operation
of the expansion is elementwise on tiles of one shape and bit width (16-bit values and
16-bit words), so no in-register reshape or layout change is needed. ``x`` is permuted once
per call (:func:`x_planes`) so that each ``X_c`` is a contiguous tile.

A ``max_concurrent_steps``-deep ``emit_pipeline`` streams ``block_k`` dense rows per step
with TMA; ``split_k`` blocks share an output tile and their float32 partial sums are added
after the kernel. Any N:M pattern of the layout runs (the loops are over ``n`` slots and
``m`` members; 2:4 is the target). The semantics are tested on CPU through the Mosaic GPU
interpreter (``implementation='interpret'``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

try:  # Pallas is public as jax.pallas in newer JAX; jax 0.10 has only jax.experimental.pallas.
    from jax import pallas as pl  # pyrefly: ignore[missing-module-attribute]
except ImportError:
    from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxcompress.kernels._common import KERNEL_STRIDE, MetaLayout
from jaxcompress.kernels._nm_matmul.config import NMMatmulConfig, padded_batch

_S = KERNEL_STRIDE


def interpret_params():
    """The Mosaic GPU interpreter's parameters (a private jax API, present since 0.10)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _mma_transforms(minor: int, itemsize: int) -> tuple:
    """Tiling + swizzle for a tile whose rows hold ``minor`` elements of ``itemsize``."""
    swizzle = next(s for s in (128, 64, 32) if (minor * itemsize) % s == 0)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def x_planes(x: jax.Array, m: int) -> jax.Array:
    """``x (B, K)`` -> ``(K/(m*16), m*16, padded_batch(B))`` with
    ``planes[q, c*16 + p, b] = x[b, (q*16 + p)*m + c]``: sub-tile ``q``'s rows for member
    ``c`` are the contiguous rows ``c*16 .. c*16+15``."""
    batch, k = x.shape
    q = k // (m * _S)
    planes = x.reshape(batch, q, _S, m).transpose(1, 3, 2, 0).reshape(q, m * _S, batch)
    return jnp.pad(planes, ((0, 0), (0, 0), (0, padded_batch(batch) - batch)))


def _body(
    x_gmem,
    values_gmem,
    meta_gmem,
    out_gmem,
    out_smem,
    *expand_smem,
    layout: MetaLayout,
    config: NMMatmulConfig,
    groups: int,
):
    n, m, per, bits = layout.n, layout.m, layout.per_word, layout.bits
    bn, sk = config.block_n, config.split_k
    step_groups = config.block_k // m
    split_groups = groups // sk
    steps = split_groups // step_groups
    i, s = lax.axis_index("n"), lax.axis_index("s")
    rows = pl.ds(i * bn, bn)
    value_cols = pl.ds(s * split_groups, split_groups)
    word_cols = pl.ds(s * (split_groups // per), split_groups // per)
    subtiles = pl.ds(s * (split_groups // _S), split_groups // _S)

    value_spec = plgpu.BlockSpec(
        (bn, step_groups), lambda k: (0, k), transforms=_mma_transforms(_S, layout.itemsize)
    )
    word_spec = plgpu.BlockSpec(
        (bn, step_groups // per), lambda k: (0, k), transforms=_mma_transforms(_S, 2)
    )
    x_spec = plgpu.BlockSpec(
        (step_groups // _S, m * _S, x_gmem.shape[-1]),
        lambda k: (k, 0, 0),
        transforms=_mma_transforms(_S, layout.itemsize),  # wgmma: K=16 rows -> 32B swizzle
    )

    def compute(acc_ref):
        def step(_, *tiles):
            v_tiles, w_tiles, x_tile = tiles[:n], tiles[n : 2 * n], tiles[2 * n]
            words = []
            for q in range(step_groups // _S):
                period, field = divmod(q, per)
                if field == 0:  # one load of the words serves the period's per_word sub-tiles
                    words = [w[:, pl.ds(period * _S, _S)] for w in w_tiles]
                idx = [(word >> (field * bits)) & layout.field_mask for word in words]
                vals = [v[:, pl.ds(q * _S, _S)] for v in v_tiles]
                tiles_q = []
                for c in range(m):
                    dense = jnp.zeros_like(vals[0])
                    for t in range(n):
                        dense = jnp.where(idx[t] == c, vals[t], dense)
                    tiles_q.append(dense)
                if config.expand == "smem":
                    for c in range(m):
                        expand_smem[0][c] = tiles_q[c]
                    plgpu.commit_smem()
                    tiles_q = [expand_smem[0].at[c] for c in range(m)]
                for c in range(m):
                    plgpu.wgmma(acc_ref, tiles_q[c], x_tile.at[q, pl.ds(c * _S, _S), :])
                # every operand (registers or the shared-memory slots) is reused only after
                # the wgmmas that read it have completed: race-free by construction
                plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            step,
            grid=(steps,),
            in_specs=[value_spec] * n + [word_spec] * n + [x_spec],
            max_concurrent_steps=config.max_concurrent_steps,
        )(
            *[values_gmem.at[t, rows, value_cols] for t in range(n)],
            *[meta_gmem.at[t, rows, word_cols] for t in range(n)],
            x_gmem.at[subtiles],
        )
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((bn, x_gmem.shape[-1]), jnp.float32))
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s, rows])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "config", "interpret"))
def nm_matmul_mosaic(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    *,
    shape: tuple[int, int],
    n: int,
    m: int,
    config: NMMatmulConfig,
    interpret: bool,
) -> jax.Array:
    """``x (B, K) @ W (K, N)`` with ``W`` packed at stride 16; float32 accumulation,
    ``x.dtype`` output. ``config`` must already be checked for this problem
    (:meth:`NMMatmulConfig.check`)."""
    layout = MetaLayout(n, m, x.dtype.itemsize)
    k, cols = shape
    batch = x.shape[0]
    planes = x_planes(x, m)
    bp = planes.shape[-1]
    scratch = [plgpu.SMEM((config.block_n, bp), jnp.float32)]
    if config.expand == "smem":
        scratch.append(
            plgpu.SMEM(
                (m, config.block_n, _S), x.dtype, transforms=_mma_transforms(_S, x.dtype.itemsize)
            )
        )
    kernel = plgpu.kernel(
        functools.partial(_body, layout=layout, config=config, groups=k // m),
        out_type=jax.ShapeDtypeStruct((config.split_k, cols, bp), jnp.float32),
        scratch_types=scratch,
        grid=(cols // config.block_n, config.split_k),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )
    partials = kernel(planes, values, meta)
    return jnp.sum(partials, axis=0)[:, :batch].T.astype(x.dtype)

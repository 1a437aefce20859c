"""Tests for jaxcompress.kernels: N:M mask, pack/unpack (layout v2), matmul, dispatch.

The Mosaic GPU kernel runs on CPU through the Mosaic GPU interpreter
(``implementation='interpret'``) and is checked bit for bit against the float32 product;
its lowering to Mosaic GPU for an abstract H100 is checked without a GPU; tests marked
``gpu`` run the compiled kernel and are excluded by default.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import count_compiles, jit_counting
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxcompress import kernels as K
from jaxcompress.kernels import (
    MetaLayout,
    NMMatmulConfig,
    PackedNM,
    nm_linear,
    nm_mask,
    nm_matmul,
    nm_violations,
    pack_nm,
    select_implementation,
    unpack_nm,
)
from jaxcompress.kernels._nm_matmul.api import INTERPRETER_TAKES_REGISTER_A
from jaxcompress.kernels._nm_matmul.config import MAX_BATCH, SMEM_BYTES, period

PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2), (3, 4)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SETTINGS = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _weight(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def _nm_weight(key, k, cols, n, m, dtype=jnp.float32):
    w = _weight(key, (k, cols), dtype)
    return jnp.where(nm_mask(w, n, m), w, 0)


def _dense_mm(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _close(a, b, dtype):
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}[dtype]
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


# --------------------------------------------------------------------------- nm_mask


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_keeps_the_n_largest_of_every_group(n, m):
    w = _weight(0, (4 * m, 6))
    mask = np.asarray(nm_mask(w, n, m))
    groups = np.abs(np.asarray(w)).reshape(4, m, 6)
    kept = mask.reshape(4, m, 6)
    assert (kept.sum(axis=1) == n).all()
    lowest_kept = np.where(kept, groups, np.inf).min(axis=1)
    highest_dropped = np.where(kept, -np.inf, groups).max(axis=1)
    assert (lowest_kept >= highest_dropped).all()


def test_mask_groups_along_the_contracting_axis_of_conv_kernels():
    w = _weight(1, (3, 3, 8, 5))
    mask = np.asarray(nm_mask(w))  # axis=-2: the `in` axis
    assert mask.shape == w.shape
    assert (mask.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2).all()
    other = np.asarray(nm_mask(jnp.swapaxes(w, 0, 2), axis=0))
    np.testing.assert_array_equal(np.swapaxes(other, 0, 2), mask)


def test_mask_ties_go_to_the_lowest_index_and_nan_ranks_first():
    w = jnp.ones((8, 3))
    mask = np.asarray(nm_mask(w))
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
    w = jnp.array([[1.0], [jnp.inf], [jnp.nan], [-5.0]])
    np.testing.assert_array_equal(np.asarray(nm_mask(w))[:, 0], [0, 1, 1, 0])


def test_mask_agrees_with_library_masks_nm():
    masks = pytest.importorskip("jaxcompress.masks")
    rng = np.random.default_rng(0)
    # quantised values make many ties, so the tie rule is exercised
    params = {
        "dense": {"kernel": jnp.asarray(rng.integers(-3, 4, (16, 12)), jnp.float32)},
        "conv": {"kernel": jnp.asarray(rng.integers(-2, 3, (3, 3, 8, 4)), jnp.bfloat16)},
    }
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        lib = masks.nm(params, n, m)
        for name in params:
            w = params[name]["kernel"]
            np.testing.assert_array_equal(np.asarray(nm_mask(w, n, m)), lib[name]["kernel"])


def test_violations_counts_groups_with_too_many_nonzeros():
    w = _nm_weight(2, 16, 4, 2, 4)
    assert int(nm_violations(w)) == 0
    w = w.at[0, 0].set(7.0).at[1, 0].set(7.0).at[2, 0].set(7.0).at[4, 3].set(1.0)
    bad = int(((np.asarray(w).reshape(4, 4, 4) != 0).sum(axis=1) > 2).sum())
    assert int(nm_violations(w)) == bad >= 1
    assert int(jax.jit(nm_violations)(w)) == bad


# --------------------------------------------------------------------------- pack/unpack


def _pack_oracle(w: np.ndarray, n: int, m: int, per: int, bits: int, stride: int):
    """Independent statement of layout v2 with Python loops: ``(values, words)``."""
    k, cols = w.shape
    groups = k // m
    values = np.zeros((n, cols, groups), w.dtype)
    words = np.zeros((n, cols, -(-groups // (per * stride)) * stride), np.uint64)
    for j in range(cols):
        for g in range(groups):
            members = w[g * m : (g + 1) * m, j]
            order = sorted(range(m), key=lambda c: (-abs(float(members[c])), c))
            kept = sorted(order[:n])
            b, r = divmod(g, per * stride)
            f, p = divmod(r, stride)
            for t, c in enumerate(kept):
                values[t, j, g] = members[c]
                words[t, j, b * stride + p] |= np.uint64(c) << np.uint64(f * bits)
    return values, words


def test_pack_bit_layout_2_4():
    # groups (rows 0-3, rows 4-7) keep in-group indices (1, 3) and (0, 2)
    w = jnp.array([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0])[:, None]
    packed = pack_nm(w)
    np.testing.assert_array_equal(np.asarray(packed.values)[:, 0], [[1, 3], [2, 4]])
    assert packed.meta.dtype == jnp.uint32 and packed.meta.shape == (2, 1, 1)
    assert packed.stride == 1
    assert int(packed.meta[0, 0, 0]) == 1 | 0 << 2  # slot 0 of groups 0, 1
    assert int(packed.meta[1, 0, 0]) == 3 | 2 << 2  # slot 1
    bf16 = pack_nm(w.astype(jnp.bfloat16))
    assert bf16.meta.dtype == jnp.uint16 and int(bf16.meta[1, 0, 0]) == 11


def test_pack_interleaves_fields_at_the_kernel_stride():
    layout = MetaLayout(2, 4, 2)
    assert (layout.bits, layout.per_word, layout.stride(256)) == (2, 8, 16)
    assert (layout.stride(64), layout.stride(196)) == (8, 1)
    # group g keeps members (g mod 3, 3): slot 0 holds g mod 3 at field (g // 16) % 8 of
    # word (g // 128) * 16 + g % 16
    k = 1024
    g = np.arange(k // 4)
    w = np.zeros((k, 2), np.float32)
    w[g * 4 + g % 3, :] = 1.0
    w[g * 4 + 3, :] = -2.0
    packed = pack_nm(jnp.asarray(w, jnp.bfloat16))
    assert packed.stride == 16 and packed.meta.shape == (2, 2, 32)
    word = np.asarray(packed.meta[0, 0], np.int64)
    for gi in (0, 17, 130, 255):
        field = (word[(gi // 128) * 16 + gi % 16] >> (2 * ((gi // 16) % 8))) & 3
        assert field == gi % 3
    assert (np.asarray(packed.meta[1]) == 0xFFFF).all()  # slot 1 is index 3 everywhere


def test_pack_bit_layout_4_bit_fields_for_m_8():
    layout = MetaLayout(2, 8, 4)
    assert (layout.bits, layout.per_word) == (4, 8)
    w = jnp.zeros((8, 1)).at[2, 0].set(1.0).at[5, 0].set(-1.0)
    packed = pack_nm(w, 2, 8)
    assert int(packed.meta[0, 0, 0]) == 2 and int(packed.meta[1, 0, 0]) == 5


def test_pack_zero_fills_groups_and_unused_fields():
    w = jnp.zeros((4, 3)).at[3, 1].set(2.0)  # one group
    packed = pack_nm(w)
    meta = np.asarray(packed.meta)
    assert meta.shape == (2, 3, 1)
    # column 0: no nonzeros -> lowest-index zeros (0, 1); column 1: (0, 3)
    np.testing.assert_array_equal(meta[:, :, 0], [[0, 0, 0], [1, 3, 1]])
    np.testing.assert_array_equal(unpack_nm(packed), w)


@SETTINGS
@given(
    pattern=st.sampled_from(PATTERNS),
    groups=st.sampled_from([1, 3, 8, 24, 256]),
    cols=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
)
def test_pack_matches_the_oracle_and_round_trips(pattern, groups, cols, dtype):
    n, m = pattern
    w = _nm_weight(groups * 17 + cols, groups * m, cols, n, m, dtype)
    packed = pack_nm(w, n, m)
    layout = packed.layout
    values, words = _pack_oracle(np.asarray(w), n, m, layout.per_word, layout.bits, packed.stride)
    np.testing.assert_array_equal(np.asarray(packed.values), values)
    np.testing.assert_array_equal(np.asarray(packed.meta).astype(np.uint64), words)
    assert packed.values.shape == (n, cols, groups) and packed.dtype == dtype
    back = unpack_nm(packed)
    assert back.dtype == dtype
    np.testing.assert_array_equal(np.asarray(back), np.asarray(w))


def test_round_trip_is_bitwise_including_negative_zero():
    # group 0 keeps 3.0 and its lowest-index zero (-0.0); group 1 drops its -0.0
    w = jnp.array([-0.0, 3.0, 0.0, 0.0, 1.0, -0.0, 0.0, -2.0])[:, None]
    back = np.asarray(unpack_nm(pack_nm(w)))
    np.testing.assert_array_equal(back, np.asarray(w))
    np.testing.assert_array_equal(np.signbit(back[:, 0]), [1, 0, 0, 0, 0, 0, 0, 1])


def test_packed_is_a_pytree_with_static_shape():
    packed = pack_nm(_nm_weight(3, 8, 4, 2, 4))
    leaves, treedef = jax.tree_util.tree_flatten(packed)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.shape, rebuilt.n, rebuilt.m, rebuilt.stride) == ((8, 4), 2, 4, 1)
    doubled = jax.tree.map(lambda x: x, packed)
    assert isinstance(doubled, PackedNM)
    out = jax.jit(lambda p: unpack_nm(p))(packed)
    np.testing.assert_array_equal(out, unpack_nm(packed))
    assert packed.nbytes == 2 * 4 * 2 * 4 + 2 * 4 * 1 * 4 and packed.dense_nbytes == 8 * 4 * 4


def test_packed_bytes_are_nine_sixteenths_of_dense_for_bf16_2_4():
    packed = pack_nm(_nm_weight(4, 2048, 64, 2, 4, jnp.bfloat16))
    assert packed.nbytes * 16 == packed.dense_nbytes * 9


@pytest.mark.parametrize("src,dst", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_astype_re_lays_out_the_index_words(src, dst):
    w = _nm_weight(5, 2048, 8, 2, 4, src)
    cast = pack_nm(w).astype(dst)
    direct = pack_nm(w.astype(dst))
    assert cast.stride == direct.stride and cast.meta.dtype == direct.meta.dtype
    np.testing.assert_array_equal(cast.meta, direct.meta)
    np.testing.assert_array_equal(unpack_nm(cast), w.astype(dst))


def test_pack_rejects_non_nm_weights_with_a_count():
    w = _weight(4, (16, 4))  # dense: every group violates 2:4
    with pytest.raises(ValueError, match=r"16 of 16 groups"):
        pack_nm(w)
    w2 = _nm_weight(4, 16, 4, 2, 4).at[0, 0].set(1.0).at[1, 0].set(1.0).at[2, 0].set(1.0)
    with pytest.raises(ValueError, match=r"1 of 16 groups of 4 have more than 2 nonzeros"):
        pack_nm(w2)


def test_pack_under_jit_projects_by_magnitude():
    w = _weight(5, (16, 4))
    packed = jax.jit(pack_nm)(w)
    np.testing.assert_array_equal(unpack_nm(packed), w * nm_mask(w))


# --------------------------------------------------------------------------- nm_matmul

# jax < 0.12's Mosaic GPU interpreter reads wgmma's A operand only from shared memory
_EXPANSIONS = ["smem"] + (["registers"] if INTERPRETER_TAKES_REGISTER_A else [])


def _int_weight(key, k, cols, dtype=jnp.bfloat16):
    """Small integers: every product and partial sum is exact in float32, so any order of
    accumulation gives the same float32 result (bit-exact comparisons)."""
    rng = np.random.default_rng(key)
    w = jnp.asarray(rng.integers(-4, 5, (k, cols)), dtype)
    return jnp.where(nm_mask(w), w, 0)


def _int_x(key, batch, k, dtype=jnp.bfloat16):
    """Dense small-integer activations."""
    return jnp.asarray(np.random.default_rng(key).integers(-4, 5, (batch, k)), dtype)


def _exact(x, w):
    """``x @ w`` in float32 (exact for small integers), rounded once to ``x.dtype``."""
    y = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    return np.asarray(jnp.asarray(y).astype(x.dtype), np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_reference_equals_dense(dtype):
    w = _nm_weight(6, 32, 24, 2, 4, dtype)
    x = _weight(7, (2, 3, 32), dtype)
    y = nm_matmul(x, pack_nm(w), implementation="xla")
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    _close(y, _dense_mm(x, w), dtype)


@pytest.mark.parametrize("expand", _EXPANSIONS)
@pytest.mark.parametrize(
    "k,cols,batch,split_k,dtype",
    [
        (512, 64, 1, 1, jnp.bfloat16),
        (1024, 128, 5, 2, jnp.bfloat16),
        (1536, 64, 17, 1, jnp.float16),
    ],
)
def test_kernel_is_bit_exact_in_the_interpreter(k, cols, batch, split_k, dtype, expand):
    w = _int_weight(k + cols, k, cols, dtype)
    x = _int_x(batch, batch, k, dtype)
    config = NMMatmulConfig(split_k=split_k, max_concurrent_steps=2, expand=expand)
    y = nm_matmul(x, pack_nm(w), implementation="interpret", config=config)
    assert y.dtype == dtype and y.shape == (batch, cols)
    np.testing.assert_array_equal(np.asarray(y, np.float32), _exact(x, w))


@settings(max_examples=5, deadline=None, derandomize=True, phases=[Phase.generate])
@given(
    pattern=st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    periods=st.sampled_from([1, 2]),
    blocks=st.integers(1, 2),
    batch=st.integers(1, MAX_BATCH),
    split_k=st.sampled_from([1, 2]),
    depth=st.integers(1, 3),
    block_n=st.sampled_from([64, 128]),
    expand=st.sampled_from(_EXPANSIONS),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float16]),
)
def test_kernel_is_bit_exact_on_random_problems(
    pattern, periods, blocks, batch, split_k, depth, block_n, expand, dtype
):
    n, m = pattern
    layout = MetaLayout(n, m, 2)
    block_k = period(layout)  # 512 for every pattern here
    k, cols = block_k * periods * split_k, block_n * blocks
    rng = np.random.default_rng(k * cols + batch)
    w = jnp.asarray(rng.integers(-4, 5, (k, cols)), dtype)
    w = jnp.where(nm_mask(w, n, m), w, 0)
    x = _int_x(batch + k, batch, k, dtype)
    config = NMMatmulConfig(block_n, block_k, split_k, depth, expand)
    assume(config.smem_bytes(batch, layout) <= SMEM_BYTES)
    y = nm_matmul(x, pack_nm(w, n, m), implementation="interpret", config=config)
    np.testing.assert_array_equal(np.asarray(y, np.float32), _exact(x, w))


def test_kernel_default_config_in_the_interpreter_on_a_3d_batch():
    w = _int_weight(30, 1024, 64)
    x = _int_x(31, 6, 1024).reshape(2, 3, 1024)
    y = nm_matmul(x, pack_nm(w), implementation="interpret")
    assert y.shape == (2, 3, 64)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32).reshape(6, 64), _exact(x.reshape(6, 1024), w)
    )


def test_matmul_handles_vector_and_empty_batches():
    w = _nm_weight(10, 16, 8, 2, 4)
    packed = pack_nm(w)
    x = _weight(11, (16,))
    assert nm_matmul(x, packed).shape == (8,)
    _close(nm_matmul(x, packed), _dense_mm(x, w), jnp.float32)
    assert nm_matmul(jnp.zeros((0, 16)), packed).shape == (0, 8)


@pytest.mark.parametrize(
    "implementation,dtype",
    [("xla", jnp.float32), ("xla", jnp.bfloat16), ("interpret", jnp.bfloat16)],
)
def test_matmul_gradients_match_dense(implementation, dtype):
    k = 512 if implementation == "interpret" else 16
    cols = 64 if implementation == "interpret" else 16
    w = _int_weight(12, k, cols, dtype)
    packed = pack_nm(w)
    x = _int_x(13, 3, k, dtype)
    config = NMMatmulConfig(max_concurrent_steps=1, expand="smem")

    def loss_sparse(x, values):
        p = PackedNM(values, packed.meta, packed.shape, packed.n, packed.m, packed.stride)
        y = nm_matmul(x, p, implementation=implementation, config=config)
        return jnp.sum(y.astype(jnp.float32) ** 2) / 1e3

    def loss_dense(x, w):
        return jnp.sum(_dense_mm(x, w).astype(jnp.float32) ** 2) / 1e3

    gx, gv = jax.grad(loss_sparse, argnums=(0, 1))(x, packed.values)
    gx_ref, gw_ref = jax.grad(loss_dense, argnums=(0, 1))(x, w)
    _close(gx, gx_ref, dtype)
    gw = unpack_nm(PackedNM(gv, packed.meta, packed.shape, 2, 4, packed.stride))
    _close(gw, jnp.where(nm_mask(w), gw_ref, 0), dtype)
    # and through the pytree: the cotangent of PackedNM carries values only
    gp = jax.grad(
        lambda p: jnp.sum(nm_matmul(x, p, implementation="xla").astype(jnp.float32)),
        allow_int=True,
    )(packed)
    assert isinstance(gp, PackedNM) and gp.meta.dtype == jax.dtypes.float0


def test_matmul_jit_does_not_recompile():
    packed = pack_nm(_nm_weight(14, 16, 8, 2, 4))
    f = jit_counting(lambda x, p: nm_matmul(x, p, implementation="xla"))
    f(_weight(15, (2, 16)), packed)
    with count_compiles() as counter:
        f(_weight(16, (2, 16)), packed)
    assert f.traces == 1 and counter.compiles == 0


_BENCH_SHAPES = [(4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]


def test_default_config_fits_the_benchmark_shapes_and_shared_memory():
    layout = MetaLayout(2, 4, 2)
    for k, cols in _BENCH_SHAPES:
        for batch in (1, 2, 4, 8, 16, 64):
            cfg = NMMatmulConfig.default(batch, k, cols, layout)
            cfg.check(batch, k, cols, layout, layout.stride(k // 4))
            assert cfg.smem_bytes(batch, layout) <= SMEM_BYTES
            assert (cols // cfg.block_n) * cfg.split_k >= 132 or k // cfg.split_k == 512
    with pytest.raises(ValueError, match="must be a multiple of 512"):
        NMMatmulConfig.default(1, 1000, 64, layout)


@pytest.mark.parametrize(
    "k,cols,batch,dtype,expand",
    [(4096, 14336, 1, jnp.bfloat16, "registers"), (14336, 4096, 64, jnp.float16, "smem")],
)
def test_kernel_lowers_to_mosaic_gpu_for_an_h100(k, cols, batch, dtype, expand):
    """Without a GPU, check the kernel passes the whole Pallas -> Mosaic GPU lowering for an
    abstract H100 (layout inference, TMA descriptors, shared-memory budget, and the PTX of
    ``wgmma`` with the A operand from registers or shared memory)."""
    from jaxcompress.kernels._nm_matmul.kernel import nm_matmul_mosaic

    layout = MetaLayout(2, 4, 2)
    cfg = NMMatmulConfig.default(batch, k, cols, layout)
    cfg = NMMatmulConfig(cfg.block_n, cfg.block_k, cfg.split_k, cfg.max_concurrent_steps, expand)
    spec = jax.ShapeDtypeStruct
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    target = AbstractMesh((1,), ("x",), abstract_device=h100)

    def fn(x, v, meta):
        return nm_matmul_mosaic(x, v, meta, shape=(k, cols), n=2, m=4, config=cfg, interpret=False)

    with use_abstract_mesh(target):
        traced = jax.jit(fn).trace(
            spec((batch, k), dtype),
            spec((2, cols, k // 4), dtype),
            spec((2, cols, k // 32), jnp.uint16),
        )
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "wgmma.mma_async" in text


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "n,m,match",
    [
        (4, 4, "n must satisfy 1 <= n < m"),
        (5, 4, "got n=5"),
        (1, 0, "got m=0"),
        (0, 4, "n=0"),
        (1, 17, "m must be a group size <= 16"),
    ],
)
def test_bad_patterns_are_rejected(n, m, match):
    w = jnp.zeros((8, 4))
    for fn in (nm_mask, pack_nm):
        with pytest.raises(ValueError, match=match):
            fn(w, n, m)


def test_bad_inputs_are_rejected_with_clear_messages():
    with pytest.raises(TypeError, match="n must be an int"):
        nm_mask(jnp.zeros((8, 4)), 2.0, 4)
    with pytest.raises(ValueError, match=r"divisible by m=4"):
        nm_mask(jnp.zeros((6, 4)))
    with pytest.raises(ValueError, match=r"w.shape\[0\]=6 .* divisible by m=4"):
        pack_nm(jnp.zeros((6, 4)))
    with pytest.raises(ValueError, match="ndim == 2"):
        pack_nm(jnp.zeros((2, 8, 4)))
    with pytest.raises(TypeError, match="floating"):
        nm_mask(jnp.zeros((8, 4), jnp.int32))
    packed = pack_nm(jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="implementation must be one of"):
        nm_matmul(jnp.zeros((2, 8)), packed, implementation="pallas")
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=16 must equal K=8"):
        nm_matmul(jnp.zeros((2, 16)), packed)
    with pytest.raises(TypeError, match=r"x.dtype \(bfloat16\) must equal packed.dtype"):
        nm_matmul(jnp.zeros((2, 8), jnp.bfloat16), packed)
    with pytest.raises(TypeError, match="packed must be a PackedNM"):
        nm_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="packed.values must have shape"):
        bad = PackedNM(jnp.zeros((3, 4, 2)), packed.meta, (8, 4), 2, 4, 1)
        nm_matmul(jnp.zeros((2, 8)), bad)
    with pytest.raises(ValueError, match="packed.stride=4 does not match"):
        nm_matmul(jnp.zeros((2, 8)), PackedNM(packed.values, packed.meta, (8, 4), 2, 4, 4))
    with pytest.raises(ValueError, match="block_n must be 64 or 128"):
        NMMatmulConfig(block_n=48)
    with pytest.raises(ValueError, match="expand must be one of"):
        NMMatmulConfig(expand="tmem")


def test_kernel_limits_are_clear_errors_before_any_launch():
    run = lambda x, p, **kw: nm_matmul(x, p, implementation="interpret", **kw)
    w = _int_weight(40, 512, 64)
    packed = pack_nm(w)
    with pytest.raises(ValueError, match="bfloat16 or float16 operands"):
        run(jnp.zeros((1, 512)), pack_nm(w.astype(jnp.float32)))
    with pytest.raises(ValueError, match="stride 16.*K=96"):
        run(jnp.zeros((1, 96), jnp.bfloat16), pack_nm(_int_weight(41, 96, 64)))
    with pytest.raises(ValueError, match=f"at most {MAX_BATCH} rows"):
        run(jnp.zeros((MAX_BATCH + 1, 512), jnp.bfloat16), packed)
    with pytest.raises(ValueError, match="block_k=256 must be a multiple of the layout period 512"):
        run(jnp.zeros((1, 512), jnp.bfloat16), packed, config=NMMatmulConfig(block_k=256))
    with pytest.raises(ValueError, match=r"K=512 must be divisible by block_k\*split_k"):
        run(jnp.zeros((1, 512), jnp.bfloat16), packed, config=NMMatmulConfig(split_k=2))
    with pytest.raises(ValueError, match="N=64 must be divisible by NMMatmulConfig.block_n=128"):
        run(jnp.zeros((1, 512), jnp.bfloat16), packed, config=NMMatmulConfig(block_n=128))
    with pytest.raises(ValueError, match="bytes of shared memory"):
        big = NMMatmulConfig(max_concurrent_steps=8)
        run(jnp.zeros((64, 512), jnp.bfloat16), packed, config=big)
    with pytest.raises(TypeError, match="expected an NMMatmulConfig"):
        run(jnp.zeros((1, 512), jnp.bfloat16), packed, config={"block_k": 512})
    if not INTERPRETER_TAKES_REGISTER_A:
        with pytest.raises(ValueError, match="expand='smem'"):
            run(jnp.zeros((1, 512), jnp.bfloat16), packed, config=NMMatmulConfig())


@pytest.mark.skipif(K._common.is_hopper(), reason="checks the error off an sm90 GPU")
def test_mosaic_without_an_sm90_gpu_is_a_clear_error():
    packed = pack_nm(_int_weight(42, 512, 64))
    with pytest.raises(ValueError, match="implementation='mosaic' needs an sm90 NVIDIA GPU"):
        nm_matmul(jnp.zeros((2, 512), jnp.bfloat16), packed, implementation="mosaic")


# --------------------------------------------------------------------------- dispatch


def _table(*entries):
    """A policy with one GPU kind, ``Fake GPU``, and bf16 2:4 entries ``(k, n, max_batch)``."""
    rows = [dict(k=k, n=n, dtype="bfloat16", nm="2:4", max_batch=b) for k, n, b in entries]
    return {"devices": {"Fake GPU": {"mode": "table", "entries": rows}}}


_TABLE = _table((4096, 4096, 16), (8192, 8192, 64))


def _device(kind, capability="9.0"):
    return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)


def test_select_implementation_on_cpu_is_dense():
    assert select_implementation(1, (4096, 4096), jnp.bfloat16) == "dense"
    # every GPU entry of the shipped policy is a measurement (experiments/benchmarks/results)
    assert set(K.load_policy()["devices"]) == {"cpu"}


def test_unmeasured_hopper_stays_dense():
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        for batch in (1, 16, 64):
            assert select_implementation(batch, (4096, 4096), jnp.bfloat16, _device(kind)) == (
                "dense"
            )


def test_select_implementation_follows_the_measured_table():
    gpu = _device("Fake GPU")
    pick = lambda b, s, dt=jnp.bfloat16: select_implementation(b, s, dt, gpu, policy=_TABLE)
    assert pick(16, (4096, 4096)) == "mosaic"
    assert pick(17, (4096, 4096)) == "dense"
    assert pick(64, (8192, 8192)) == "mosaic"
    assert pick(1, (4096, 4096), jnp.float16) == "dense"  # no fp16 measurement
    table = _table((4096, 14336, 0), (14336, 4096, 16))
    # same K*N: the exact shape decides, and a tie elsewhere takes the cautious entry
    assert select_implementation(8, (14336, 4096), jnp.bfloat16, gpu, policy=table) == "mosaic"
    assert select_implementation(8, (4096, 14336), jnp.bfloat16, gpu, policy=table) == "dense"
    assert select_implementation(8, (7168, 8192), jnp.bfloat16, gpu, policy=table) == "dense"
    assert pick(1, (4096, 4100)) == "dense"  # N not a multiple of block_n: no kernel tiling
    assert pick(1, (4000, 4096)) == "dense"  # K not a multiple of 512: no kernel tiling
    assert pick(1, (4096, 4096), jnp.float32) == "dense"  # the kernel takes 16-bit only
    ampere = _device("Fake GPU", capability="8.0")  # no wgmma: dense whatever the table says
    assert select_implementation(1, (4096, 4096), jnp.bfloat16, ampere, policy=_TABLE) == "dense"
    other = _device("Unmeasured GPU")
    assert select_implementation(1, (4096, 4096), jnp.bfloat16, other, policy=_TABLE) == "dense"
    with pytest.raises(ValueError, match="mode must be 'dense' or 'table'"):
        select_implementation(1, (8, 8), jnp.float32, gpu, policy={"devices": {"x": {}}})


def test_nm_linear_equals_dense_with_bias_and_gradients():
    w = _nm_weight(17, 16, 8, 2, 4)
    packed = pack_nm(w)
    x = _weight(18, (4, 16))
    b = _weight(19, (8,))
    _close(nm_linear(x, packed, b), _dense_mm(x, w) + b, jnp.float32)
    g = jax.grad(lambda b: jnp.sum(nm_linear(x, packed, b) ** 2))(b)
    _close(g, jax.grad(lambda b: jnp.sum((_dense_mm(x, w) + b) ** 2))(b), jnp.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        nm_linear(x, packed, jnp.zeros(4))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("expand", ["registers", "smem"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_gpu_mosaic_is_bit_exact(dtype, batch, expand):
    assert K._common.is_hopper(), "the gpu tests need an H100/H200"
    k, cols = 2048, 1024
    w = _int_weight(20, k, cols, dtype)
    x = _int_x(21, batch, k, dtype)
    packed = pack_nm(w)
    cfg = NMMatmulConfig.default(batch, k, cols, packed.layout)
    cfg = NMMatmulConfig(cfg.block_n, cfg.block_k, cfg.split_k, cfg.max_concurrent_steps, expand)
    y = nm_matmul(x, packed, implementation="mosaic", config=cfg)
    np.testing.assert_array_equal(np.asarray(y, np.float32), _exact(x, w))
    gx = jax.grad(lambda x: jnp.sum(nm_matmul(x, packed).astype(jnp.float32)))(x)
    gx_ref = jax.grad(lambda x: jnp.sum(_dense_mm(x, w).astype(jnp.float32)))(x)
    _close(gx, gx_ref, dtype)


@pytest.mark.gpu
def test_gpu_default_implementation_is_mosaic():
    assert K._common.resolve_implementation(None) == "mosaic"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "block_n,split_k,depth,expand",
    [(64, 1, 4, "registers"), (128, 2, 2, "registers"), (64, 4, 3, "smem"), (128, 8, 1, "smem")],
)
def test_gpu_configs_are_bit_exact(block_n, split_k, depth, expand):
    assert K._common.is_hopper(), "the gpu tests need an H100/H200"
    k, cols, batch = 4096, 1024, 8
    w = _int_weight(22, k, cols)
    x = _int_x(23, batch, k)
    config = NMMatmulConfig(block_n, 512, split_k, depth, expand)
    y = nm_matmul(x, pack_nm(w), implementation="mosaic", config=config)
    np.testing.assert_array_equal(np.asarray(y, np.float32), _exact(x, w))

"""Tests for jaxcompress.kernels: N:M mask, pack/unpack, matmul, dispatch.

Every Pallas kernel is checked against its pure-jnp reference in interpret mode (CPU);
tests marked ``gpu`` run the compiled Triton path and are excluded by default.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import count_compiles, jit_counting
from hypothesis import HealthCheck, given, settings
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
    return w * nm_mask(w, n, m, implementation="xla")


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
    np.testing.assert_array_equal(
        np.asarray(nm_mask(w, implementation="interpret"))[:, 0], [0, 1, 1, 0]
    )


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
    lib = masks.nm(params, 2, 4)["dense"]["kernel"]
    kernel = nm_mask(params["dense"]["kernel"], implementation="interpret")
    np.testing.assert_array_equal(np.asarray(kernel), lib)


def _tiles(max_groups: int):
    """Hypothesis: an N:M ``pattern``, 1..``max_groups`` groups, 1..9 columns, a dtype."""
    return given(
        pattern=st.sampled_from(PATTERNS),
        groups=st.integers(1, max_groups),
        cols=st.integers(1, 9),
        dtype=st.sampled_from(DTYPES),
    )


@SETTINGS
@_tiles(max_groups=6)
def test_mask_kernel_matches_reference(pattern, groups, cols, dtype):
    n, m = pattern
    w = _weight(groups * 31 + cols, (groups * m, cols), dtype)
    np.testing.assert_array_equal(
        nm_mask(w, n, m, implementation="interpret"), nm_mask(w, n, m, implementation="xla")
    )


def test_violations_counts_groups_with_too_many_nonzeros():
    w = _nm_weight(2, 16, 4, 2, 4)
    assert int(nm_violations(w)) == 0
    w = w.at[0, 0].set(7.0).at[1, 0].set(7.0).at[2, 0].set(7.0).at[4, 3].set(1.0)
    bad = int(((np.asarray(w).reshape(4, 4, 4) != 0).sum(axis=1) > 2).sum())
    assert int(nm_violations(w)) == bad >= 1
    assert int(jax.jit(nm_violations)(w)) == bad


# --------------------------------------------------------------------------- pack/unpack


def test_pack_bit_layout_2_4():
    # groups (rows 0-3, rows 4-7) keep in-group indices (1, 3) and (0, 2)
    w = jnp.array([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0])[:, None]
    packed = pack_nm(w)
    np.testing.assert_array_equal(np.asarray(packed.values)[:, 0], [1, 2, 3, 4])
    assert packed.meta.dtype == jnp.uint8 and packed.meta.shape == (1, 1)
    assert int(packed.meta[0, 0]) == 1 | 3 << 2 | 0 << 4 | 2 << 6
    assert int(pack_nm(w, implementation="interpret").meta[0, 0]) == 141


def test_pack_bit_layout_4_bit_fields_for_m_8():
    layout = MetaLayout(2, 8)
    assert (layout.bits, layout.per_word) == (4, 2)
    w = jnp.zeros((8, 1)).at[2, 0].set(1.0).at[5, 0].set(-1.0)
    packed = pack_nm(w, 2, 8)
    assert int(packed.meta[0, 0]) == 2 | 5 << 4


def test_pack_zero_fills_groups_and_unused_fields():
    w = jnp.zeros((4, 3)).at[3, 1].set(2.0)  # one group, 2 of 4 fields used
    for impl in ("xla", "interpret"):
        packed = pack_nm(w, implementation=impl)
        meta = np.asarray(packed.meta)
        assert meta.shape == (1, 3)
        # column 0: no nonzeros -> lowest-index zeros (0, 1); column 1: (0, 3)
        np.testing.assert_array_equal(meta[0], [0 | 1 << 2, 0 | 3 << 2, 0 | 1 << 2])
        np.testing.assert_array_equal(unpack_nm(packed), w)


@SETTINGS
@_tiles(max_groups=7)
def test_pack_kernels_match_reference_and_round_trip(pattern, groups, cols, dtype):
    n, m = pattern
    w = _nm_weight(groups * 17 + cols, groups * m, cols, n, m, dtype)
    ref = pack_nm(w, n, m, implementation="xla")
    ker = pack_nm(w, n, m, implementation="interpret")
    np.testing.assert_array_equal(ker.values, ref.values)
    np.testing.assert_array_equal(ker.meta, ref.meta)
    assert ref.values.shape == (groups * n, cols) and ref.dtype == dtype
    dense = np.asarray(w)
    for impl in ("xla", "interpret"):
        back = unpack_nm(ref, implementation=impl)
        assert back.dtype == dtype
        np.testing.assert_array_equal(np.asarray(back), dense)


def test_round_trip_is_bitwise_including_negative_zero():
    # group 0 keeps 3.0 and its lowest-index zero (-0.0); group 1 drops its -0.0
    w = jnp.array([-0.0, 3.0, 0.0, 0.0, 1.0, -0.0, 0.0, -2.0])[:, None]
    for impl in ("xla", "interpret"):
        back = np.asarray(unpack_nm(pack_nm(w, implementation=impl), implementation=impl))
        np.testing.assert_array_equal(back, np.asarray(w))
        np.testing.assert_array_equal(np.signbit(back[:, 0]), [1, 0, 0, 0, 0, 0, 0, 1])


def test_packed_is_a_pytree_with_static_shape():
    packed = pack_nm(_nm_weight(3, 8, 4, 2, 4))
    leaves, treedef = jax.tree_util.tree_flatten(packed)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.shape, rebuilt.n, rebuilt.m) == ((8, 4), 2, 4)
    doubled = jax.tree.map(lambda x: x, packed)
    assert isinstance(doubled, PackedNM)
    out = jax.jit(lambda p: unpack_nm(p))(packed)
    np.testing.assert_array_equal(out, unpack_nm(packed))
    assert packed.nbytes == 4 * 4 * 4 + 1 * 4 and packed.dense_nbytes == 8 * 4 * 4


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_reference_equals_dense(dtype):
    w = _nm_weight(6, 32, 24, 2, 4, dtype)
    x = _weight(7, (2, 3, 32), dtype)
    y = nm_matmul(x, pack_nm(w), implementation="xla")
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    _close(y, _dense_mm(x, w), dtype)


@SETTINGS
@given(
    pattern=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]),
    rows=st.integers(1, 5),
    periods=st.integers(1, 3),
    cols_log=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
)
def test_matmul_kernel_matches_reference(pattern, rows, periods, cols_log, dtype):
    n, m = pattern
    k = MetaLayout(n, m).period_dense * periods
    cols = 3 << cols_log  # not a power of two: exercises the column tile choice
    w = _nm_weight(rows + periods, k, cols, n, m, dtype)
    x = _weight(rows * 7 + cols, (rows, k), dtype)
    packed = pack_nm(w, n, m)
    ref = nm_matmul(x, packed, implementation="xla")
    got = nm_matmul(x, packed, implementation="interpret")
    assert got.dtype == dtype and got.shape == (rows, cols)
    _close(got, ref, dtype)


def test_matmul_kernel_with_split_k_and_padded_rows():
    w = _nm_weight(8, 64, 32, 2, 4)
    x = _weight(9, (5, 64))
    packed = pack_nm(w)
    config = NMMatmulConfig(block_m=4, block_n=16, block_k=16, split_k=2)
    got = nm_matmul(x, packed, implementation="interpret", config=config)
    _close(got, _dense_mm(x, w), jnp.float32)


def test_matmul_handles_vector_and_empty_batches():
    w = _nm_weight(10, 16, 8, 2, 4)
    packed = pack_nm(w)
    x = _weight(11, (16,))
    assert nm_matmul(x, packed).shape == (8,)
    _close(nm_matmul(x, packed), _dense_mm(x, w), jnp.float32)
    assert nm_matmul(jnp.zeros((0, 16)), packed).shape == (0, 8)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_match_dense(implementation, dtype):
    w = _nm_weight(12, 16, 16, 2, 4, dtype)
    packed = pack_nm(w)
    x = _weight(13, (3, 16), dtype)

    def loss_sparse(x, values):
        p = PackedNM(values, packed.meta, packed.shape, packed.n, packed.m)
        y = nm_matmul(x, p, implementation=implementation).astype(jnp.float32)
        return jnp.sum(jnp.sin(y))

    def loss_dense(x, w):
        return jnp.sum(jnp.sin(_dense_mm(x, w).astype(jnp.float32)))

    gx, gv = jax.grad(loss_sparse, argnums=(0, 1))(x, packed.values)
    gx_ref, gw_ref = jax.grad(loss_dense, argnums=(0, 1))(x, w)
    _close(gx, gx_ref, dtype)
    gw = unpack_nm(PackedNM(gv, packed.meta, packed.shape, 2, 4))
    _close(gw, jnp.where(nm_mask(w), gw_ref, 0), dtype)
    # and through the pytree: the cotangent of PackedNM carries values only
    gp = jax.grad(
        lambda p: jnp.sum(nm_matmul(x, p, implementation=implementation)), allow_int=True
    )(packed)
    assert isinstance(gp, PackedNM) and gp.meta.dtype == jax.dtypes.float0


def test_matmul_jit_does_not_recompile():
    packed = pack_nm(_nm_weight(14, 16, 8, 2, 4))
    f = jit_counting(lambda x, p: nm_matmul(x, p, implementation="interpret"))
    f(_weight(15, (2, 16)), packed)
    with count_compiles() as counter:
        f(_weight(16, (2, 16)), packed)
    assert f.traces == 1 and counter.compiles == 0


def test_default_config_tiles_fit_the_gpu_shapes_of_the_benchmark():
    layout = MetaLayout(2, 4)
    for k, cols in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]:
        for batch in (1, 4, 16, 64, 256, 1024, 4096):
            cfg = NMMatmulConfig.default(batch, k, cols, layout)
            cfg.check(k, cols, layout, min_dot=16)
            assert cfg.block_k // layout.period_dense >= 16
    with pytest.raises(ValueError, match="no Pallas N:M matmul tiling"):
        NMMatmulConfig.default(1, 24, 16, layout)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_kernels_lower_to_triton_for_cuda(n, m):
    """Without a GPU, check every kernel passes the Pallas -> Triton (TTIR) lowering for the
    benchmark shapes (op coverage, power-of-two tensor sizes, Triton backend selected).

    The lowering targets an abstract H100 (``jax.sharding.AbstractDevice`` on an abstract
    mesh): jax >= 0.12 asks the device for its compute capability and refuses to lower for
    CUDA on a machine without one unless the target is named this way.
    """
    from jaxcompress.kernels._nm_mask.kernel import nm_mask_pallas
    from jaxcompress.kernels._nm_matmul.kernel import nm_matmul_pallas
    from jaxcompress.kernels._nm_pack.kernel import pack_pallas, unpack_pallas

    layout = MetaLayout(n, m)
    spec = jax.ShapeDtypeStruct

    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    target = AbstractMesh((1,), ("x",), abstract_device=h100)

    def lowered(fn, *args):
        with use_abstract_mesh(target):
            traced = jax.jit(fn).trace(*args)
            return traced.lower(lowering_platforms=("cuda",)).as_text()

    cases = [(4096, 11008, 1, jnp.bfloat16), (11008, 4096, 16, jnp.float16)]
    cases += [(4096, 4096, 4096, jnp.float32)]
    for k, cols, batch, dtype in cases:
        cfg = NMMatmulConfig.default(batch, k, cols, layout)
        text = lowered(
            lambda x, v, meta, k=k, cols=cols, cfg=cfg: nm_matmul_pallas(
                x, v, meta, shape=(k, cols), n=n, m=m, config=cfg, interpret=False
            ),
            spec((batch, k), dtype),
            spec((layout.value_rows(k), cols), dtype),
            spec((layout.meta_rows(k), cols), jnp.uint8),
        )
        assert "xla.gpu.triton" in text
    w = spec((96, 40), jnp.bfloat16)
    for fn, args in [
        (lambda w: nm_mask_pallas(w, n, m, interpret=False), (w,)),
        (lambda w: pack_pallas(w, n, m, interpret=False), (w,)),
        (
            lambda v, meta: unpack_pallas(v, meta, shape=(96, 40), n=n, m=m, interpret=False),
            (
                spec((layout.value_rows(96), 40), jnp.bfloat16),
                spec((layout.meta_rows(96), 40), jnp.uint8),
            ),
        ),
    ]:
        assert "xla.gpu.triton" in lowered(fn, *args)


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
    with pytest.raises(ValueError, match="implementation must be one of"):
        nm_mask(jnp.zeros((8, 4)), implementation="cuda")
    packed = pack_nm(jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=16 must equal K=8"):
        nm_matmul(jnp.zeros((2, 16)), packed)
    with pytest.raises(TypeError, match=r"x.dtype \(bfloat16\) must equal packed.dtype"):
        nm_matmul(jnp.zeros((2, 8), jnp.bfloat16), packed)
    with pytest.raises(TypeError, match="packed must be a PackedNM"):
        nm_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="packed.values must have shape"):
        nm_matmul(jnp.zeros((2, 8)), PackedNM(jnp.zeros((3, 4)), packed.meta, (8, 4), 2, 4))
    with pytest.raises(ValueError, match="block_k=12"):
        nm_matmul(
            jnp.zeros((2, 8)),
            packed,
            implementation="interpret",
            config=NMMatmulConfig(block_k=12, block_n=4, block_m=2),
        )
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        NMMatmulConfig(block_n=48)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off GPU")
def test_pallas_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
        nm_mask(jnp.zeros((8, 4)), implementation="pallas")
    packed = pack_nm(jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="needs a GPU"):
        nm_matmul(jnp.zeros((2, 8)), packed, implementation="pallas")


# --------------------------------------------------------------------------- dispatch

_TABLE = {
    "devices": {
        "Fake GPU": {
            "mode": "table",
            "entries": [
                {"k": 4096, "n": 4096, "dtype": "bfloat16", "nm": "2:4", "max_batch": 16},
                {"k": 8192, "n": 8192, "dtype": "bfloat16", "nm": "2:4", "max_batch": 64},
            ],
        }
    }
}


def test_select_implementation_on_cpu_is_dense():
    assert select_implementation(1, (4096, 4096), jnp.bfloat16) == "dense"
    # every GPU entry of the shipped policy is a measurement (experiments/benchmarks/results)
    assert set(K.load_policy()["devices"]) == {"cpu", "NVIDIA H100 80GB HBM3"}


def test_shipped_policy_keeps_the_h100_dense():
    """The H100 entry comes from experiments/benchmarks/results/nm_kernels_h100: the kernel
    lost to dense jnp.dot at every measured point, so every batch must stay dense."""
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    for dtype in (jnp.bfloat16, jnp.float16):
        for shape in [(4096, 4096), (11008, 4096), (8192, 8192), (1024, 1024)]:
            for batch in (1, 16, 4096):
                assert select_implementation(batch, shape, dtype, h100) == "dense"


def test_select_implementation_follows_the_measured_table():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="Fake GPU")
    pick = lambda b, s, dt=jnp.bfloat16: select_implementation(b, s, dt, gpu, policy=_TABLE)
    assert pick(16, (4096, 4096)) == "pallas"
    assert pick(17, (4096, 4096)) == "dense"
    assert pick(64, (8192, 8192)) == "pallas"
    assert pick(1, (4096, 4096), jnp.float16) == "dense"  # no fp16 measurement
    assert pick(1, (4096, 4100)) == "dense"  # no tiling for N=4100
    other = types.SimpleNamespace(platform="gpu", device_kind="Unmeasured GPU")
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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 16, 300])
def test_gpu_pallas_matches_reference(dtype, batch):
    assert jax.default_backend() == "gpu"
    # XLA's float32 GEMMs on GPU default to TF32 (~1e-3 relative): make the references exact
    with jax.default_matmul_precision("highest"):
        _check_gpu_pallas_against_reference(dtype, batch)


def _check_gpu_pallas_against_reference(dtype, batch):
    k, cols = 1024, 768
    w = _nm_weight(20, k, cols, 2, 4, dtype)
    x = _weight(21, (batch, k), dtype)
    packed = pack_nm(w, implementation="pallas")
    ref = pack_nm(w, implementation="xla")
    np.testing.assert_array_equal(packed.values, ref.values)
    np.testing.assert_array_equal(packed.meta, ref.meta)
    np.testing.assert_array_equal(unpack_nm(packed, implementation="pallas"), w)
    np.testing.assert_array_equal(
        nm_mask(w, implementation="pallas"), nm_mask(w, implementation="xla")
    )
    _close(nm_matmul(x, packed), nm_matmul(x, packed, implementation="xla"), dtype)
    gx = jax.grad(lambda x: jnp.sum(nm_matmul(x, packed).astype(jnp.float32)))(x)
    gx_ref = jax.grad(lambda x: jnp.sum(_dense_mm(x, w).astype(jnp.float32)))(x)
    _close(gx, gx_ref, dtype)


@pytest.mark.gpu
def test_gpu_default_implementation_is_pallas():
    assert K._common.resolve_implementation(None) == "pallas"

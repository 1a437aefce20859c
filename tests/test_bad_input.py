"""Bad input to masks, optim compressors, SPDY tables and the N:M kernels: every case raises a
clear error (argument, value, expectation; file and line for files) before any work, or,
where an empty selection can be legitimate, warns with EmptySelectionWarning (strict=True
raises)."""

import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress.masks as jm
from jaxcompress import kernels, spdy
from jaxcompress.optim._compressors import make_compressor

TIMINGS = os.path.join(os.environ.get("JAXCOMPRESS_DATA_DIR", ""), "spdy_timings")
RN18 = os.path.join(TIMINGS, "rn18_unstr.txt")
needs_timings = pytest.mark.skipif(not os.path.isfile(RN18), reason="no spdy_timings data")


# ----------------------------------------------------------------------------- empty selections


EMPTY_CASES = [
    ("empty tree", {}, "an empty tree"),
    ("unknown name", {"fc": {"wt": jnp.ones((4, 4))}}, r"not one of .*'fc/wt'"),
    ("integer kernel", {"q": {"kernel": jnp.ones((4, 4), jnp.int8)}}, r"q/kernel \(int8\)"),
    ("only vectors", {"bn": {"scale": jnp.ones(4)}}, "no leaf has ndim >= 2"),
]


@pytest.mark.parametrize("fn", ["magnitude", "erk", "nm"])
@pytest.mark.parametrize("case,params,reason", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_selection_warns_with_the_reason_and_strict_raises(fn, case, params, reason):
    call = {
        "magnitude": lambda **kw: jm.magnitude(params, 0.9, **kw),
        "erk": lambda **kw: jm.erk(params, 0.9, **kw),
        "nm": lambda **kw: jm.nm(params, 2, 4, **kw),
    }[fn]
    with pytest.warns(jm.EmptySelectionWarning, match=rf"^{fn}: no leaf selected.*{reason}"):
        out = call()
    assert all(x is None for x in jax.tree.leaves(out, is_leaf=lambda x: x is None))
    with pytest.raises(ValueError, match=rf"^{fn}: no leaf selected.*{reason}"):
        call(strict=True)
    with pytest.raises(TypeError, match="strict"):
        call(strict="yes")


def test_empty_selection_by_a_custom_selector_or_none_sparsities():
    params = {"a": {"kernel": jnp.ones((4, 4))}}
    with pytest.warns(jm.EmptySelectionWarning, match=r"where selected none of its 1 leaves"):
        jm.magnitude(params, 0.5, where=jm.select(include="nothing"))
    with pytest.warns(jm.EmptySelectionWarning, match="every selected leaf has a None"):
        jm.magnitude(params, {"a": {"kernel": None}}, scope="layer")


def test_a_non_empty_selection_does_not_warn():
    params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"wt": jnp.ones((4, 4))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = jm.magnitude(params, 0.5, strict=True)
    assert masks["b"]["wt"] is None and int(masks["a"]["kernel"].sum()) == 8


# ----------------------------------------------------------------------------- sparsity values


@pytest.mark.parametrize(
    "n,s,exc,match",
    [
        (10, 1.5, ValueError, r"sparsity: expected a value in \[0, 1\), got 1.5"),
        (10, 1.0, ValueError, r"got 1.0"),
        (10, -0.1, ValueError, r"got -0.1"),
        (10, float("nan"), ValueError, "got nan"),
        (10, np.float32("nan"), ValueError, "got nan"),
        (10, jnp.float32(jnp.nan), ValueError, "got nan"),
        (10, "0.5", TypeError, "sparsity"),
        (10, None, TypeError, "sparsity"),
        (10, jnp.ones(2) * 0.5, ValueError, "scalar"),
        (-5, 0.5, ValueError, r"n: expected an int >= 0 .*got -5"),
        (2.5, 0.5, TypeError, r"n: expected an int"),
        (True, 0.5, TypeError, r"n: expected an int"),
    ],
)
def test_keep_count_rejects_bad_values(n, s, exc, match):
    with pytest.raises(exc, match=match):
        jm.keep_count(n, s)


def test_keep_count_edges_and_array_sparsities():
    assert jm.keep_count(0, 0.5) == 0
    assert jm.keep_count(10, 0) == 10
    assert jm.keep_count(np.int64(10), 0.7) == 3
    # float32 sparsities count as the decimal that was written, on host and device alike
    for s in (np.float32(0.7), jnp.float32(0.7), jnp.asarray(0.7)):
        assert jm.keep_count(10, s) == 3
    w = {"k": {"kernel": jnp.arange(1.0, 11.0).reshape(10, 1)}}
    for s in (0.7, np.float32(0.7), jnp.float32(0.7)):
        assert int(jm.magnitude(w, s)["k"]["kernel"].sum()) == 3
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda s: jm.keep_count(10, s))(0.5)


@pytest.mark.parametrize("bad", [float("nan"), np.float64("nan"), jnp.asarray(jnp.nan), 1, -0.0001])
def test_magnitude_and_erk_reject_nan_and_out_of_range_sparsity(bad):
    params = {"a": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="sparsity"):
        jm.magnitude(params, bad)
    if not isinstance(bad, jax.Array):
        with pytest.raises(ValueError, match="sparsity"):
            jm.erk(params, bad)


def test_magnitude_odd_but_valid_inputs():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    # a jax-array sparsity outside jit counts like the Python float
    a = jm.magnitude({"k": {"kernel": w}}, jnp.asarray(0.5))["k"]["kernel"]
    b = jm.magnitude({"k": {"kernel": w}}, 0.5)["k"]["kernel"]
    np.testing.assert_array_equal(a, b)
    # a 1-D leaf explicitly selected is pruned like any other
    v = {"v": jnp.asarray(rng.normal(size=10), jnp.float32)}
    m = jm.magnitude(v, 0.7, where=lambda p, x: True)["v"]
    assert int(m.sum()) == 3
    np.testing.assert_array_equal(np.flatnonzero(m), np.sort(np.argsort(-np.abs(v["v"]))[:3]))
    # zero-size kernels are selected and keep nothing
    empty = jm.magnitude({"k": {"kernel": jnp.ones((0, 4))}}, 0.5)["k"]["kernel"]
    assert empty.shape == (0, 4)


def test_bool_and_integer_kernels_explicitly_selected_are_type_errors():
    everything = lambda p, x: True  # noqa: E731
    for dtype in (jnp.bool_, jnp.int32):
        params = {"a": {"kernel": jnp.ones((4, 4), dtype)}}
        for call in (
            lambda p=params: jm.magnitude(p, 0.5, where=everything),
            lambda p=params: jm.nm(p, 2, 4, where=everything),
            lambda p=params: jm.erk(p, 0.5, where=everything),
        ):
            with pytest.raises(TypeError, match=r"a/kernel.*floating-point"):
                call()


def test_other_bad_arguments():
    params = {"a": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(TypeError, match="reference_ties"):
        jm.magnitude(params, 0.5, reference_ties="no")
    with pytest.raises(ValueError, match="power_scale"):
        jm.erk(params, 0.5, power_scale=float("nan"))
    with pytest.raises(ValueError, match="power_scale"):
        jm.erk(params, 0.5, power_scale=float("inf"))
    with pytest.raises(TypeError, match="where"):
        jm.nm(params, 2, 4, where="kernel")


# ----------------------------------------------------------------------------- N:M everywhere


@pytest.mark.parametrize(
    "n,m,exc,match",
    [
        (0, 4, ValueError, r"n must satisfy 1 <= n < m .*got n=0"),
        (4, 4, ValueError, r"got n=4"),
        (1, 1, ValueError, "m must be a group size >= 2, got m=1"),
        (2.0, 4, TypeError, "n must be an int"),
        (2, True, TypeError, "m must be an int"),
    ],
)
def test_one_nm_rule_for_masks_kernels_and_compressors(n, m, exc, match):
    w = jnp.ones((8, 4))
    with pytest.raises(exc, match=match):
        jm.nm({"kernel": w}, n, m)
    with pytest.raises(exc, match=match):
        kernels.nm_mask(w, n, m)
    with pytest.raises(exc, match=rf"nm_patterns\[0\]: .*{match}"):
        make_compressor("nm", nm_patterns=((n, m),))


def test_nm_shape_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"'v' with shape \(8,\).*ndim >= 2"):
        jm.nm({"v": jnp.ones(8)}, 2, 4, where=lambda p, x: True)
    with pytest.raises(ValueError, match=r"'a/kernel' .*dimension 6 .*not divisible by m=4"):
        jm.nm({"a": {"kernel": jnp.ones((6, 4))}}, 2, 4)
    # masks.nm has no kernel limit on m; the kernels do (4-bit index fields)
    assert jm.nm({"kernel": jnp.ones((40, 2))}, 20, 40)["kernel"].sum() == 40
    with pytest.raises(ValueError, match="m must be a group size <= 16"):
        kernels.nm_mask(jnp.ones((32, 2)), 2, 32)


def test_kernel_masks_are_the_library_masks_on_nan_inf_and_ties():
    w = jnp.asarray(
        [
            [jnp.nan, 1.0],
            [jnp.inf, 1.0],
            [-jnp.inf, 1.0],
            [0.0, 1.0],
            [-0.0, 2.0],
            [0.0, -2.0],
            [1.0, 2.0],
            [-1.0, 0.5],
        ],
        jnp.float32,
    )
    lib = jm.nm({"kernel": w}, 2, 4)["kernel"]
    np.testing.assert_array_equal(kernels.nm_mask(w, 2, 4), lib)
    np.testing.assert_array_equal(lib[:4, 0], [True, True, False, False])  # NaN > inf


# ----------------------------------------------------------------------------- nm_matmul config


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("batch", [2, 0])
def test_nm_matmul_rejects_a_config_that_is_not_an_nm_matmul_config(implementation, batch):
    packed = kernels.pack_nm(jnp.zeros((16, 16)))
    x = jnp.ones((batch, 16))
    for bad in ("fast", {"block_k": 16}, 3):
        with pytest.raises(TypeError, match=r"config: expected an NMMatmulConfig .*got"):
            kernels.nm_matmul(x, packed, implementation=implementation, config=bad)


def test_nm_matmul_config_on_xla_is_accepted_and_unused_and_checked_on_interpret():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)
    packed = kernels.pack_nm(w * kernels.nm_mask(w))
    x = jnp.ones((2, 16))
    too_big = kernels.NMMatmulConfig()  # block_k=512 cannot tile K=16
    y = kernels.nm_matmul(x, packed, implementation="xla", config=too_big)
    np.testing.assert_allclose(y, x @ kernels.unpack_nm(packed), rtol=1e-6)
    with pytest.raises(ValueError, match=r"Mosaic GPU N:M kernel takes bfloat16 or float16"):
        kernels.nm_matmul(x, packed, implementation="interpret", config=too_big)
    wide = kernels.pack_nm(jnp.zeros((512, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"K=512 must be divisible by block_k\*split_k"):
        config = kernels.NMMatmulConfig(split_k=2, expand="smem")
        kernels.nm_matmul(
            x[:, :1].repeat(512, 1).astype(jnp.bfloat16),
            wide,
            config=config,
            implementation="interpret",
        )


def test_nm_policy_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text('{"devices": {\n  "cpu": }')
    with pytest.raises(ValueError, match=rf"^{bad}:2: not a valid JSON policy file"):
        kernels.load_policy(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"^{binary}: not a UTF-8 JSON policy file"):
        kernels.load_policy(binary)
    entry = {"k": 8, "n": 8, "dtype": "bfloat16", "nm": "2:4", "max_batch": -1}
    with pytest.raises(ValueError, match=r"entries\[0\]\.max_batch must be an int >= 0"):
        kernels.load_policy({"devices": {"gpu": {"mode": "table", "entries": [entry]}}})


# ----------------------------------------------------------------------------- SPDY tables


def _truncate(src, dst, at):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:at])
    return data[:at]


@needs_timings
def test_truncated_table_names_file_and_line(tmp_path):
    data = open(RN18, "rb").read()
    # cut 4 bytes into line 500 ('0.002109 0.9225' becomes '0.00')
    cut = sum(len(x) + 1 for x in data.split(b"\n")[:499]) + 4
    path = tmp_path / "rn18_cut.txt"
    _truncate(RN18, path, cut)
    with pytest.raises(ValueError, match=rf"^{path}:500: the file ends in the middle of a line"):
        spdy.TimingTable.load(path)
    # the same text without the newline check: a lone number is a cut-off entry
    text = data[:cut].decode() + "\n"
    with pytest.raises(ValueError, match=r"^<string>:500: a time without a label"):
        spdy.TimingTable.loads(text)


@needs_timings
def test_table_cut_at_a_line_end_warns(tmp_path):
    lines = open(RN18, "rb").read().split(b"\n")
    path = tmp_path / "rn18_cut.txt"
    path.write_bytes(b"\n".join(lines[:-10]) + b"\n")
    with pytest.warns(UserWarning, match=rf"{path}:\d+: the last layer .* may be truncated"):
        table = spdy.TimingTable.load(path)
    assert len(table) == 21


@needs_timings
def test_binary_garbage_and_nul_bytes_are_value_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"^{garbage}: not a text timing table: byte 128"):
        spdy.TimingTable.load(garbage)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"base\n1.0\nprunable\n\x00\x00\n")
    with pytest.raises(ValueError, match=rf"^{nul}:4: not a text timing table: .*NUL"):
        spdy.TimingTable.load(nul)
    with pytest.raises(ValueError, match=rf"^{garbage}: not a JSON timing table"):
        spdy.TimingTable.from_json(garbage)


def test_prunable_above_base_names_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("base\n1.0\nprunable\n2.5\nl1\n0.3 0.0000\n")
    with pytest.raises(ValueError, match=rf"^{path}:4: prunable time 2.5 exceeds the base time"):
        spdy.TimingTable.load(path)
    doc = json.loads(
        spdy.TimingTable(1.0, 0.5, (spdy.LayerOptions("l1", ("a",), [0.3]),)).to_json()
    )
    doc["prunable"] = 2.5
    jpath = tmp_path / "t.json"
    jpath.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"^{jpath}: prunable \(2.5\) exceeds base"):
        spdy.TimingTable.from_json(jpath)
    jpath.write_text("{\n\n  bad")
    with pytest.raises(ValueError, match=rf"^{jpath}:3: not valid JSON"):
        spdy.TimingTable.from_json(jpath)


@needs_timings
def test_real_tables_still_load_and_json_writes_atomically(tmp_path):
    copy = tmp_path / "rn18.txt"
    shutil.copy(RN18, copy)
    table = spdy.TimingTable.load(copy)
    assert len(table) == 21
    out = tmp_path / "rn18.json"
    table.to_json(out)
    assert spdy.TimingTable.from_json(out) == table
    assert sorted(os.listdir(tmp_path)) == ["rn18.json", "rn18.txt"]  # no temp file left


def test_dumps_refuses_what_loads_cannot_read_back():
    ok = spdy.LayerOptions("l1", ("a",), [0.3])
    for layer, match in (
        (spdy.LayerOptions("12", ("a",), [0.3]), "numeric name"),
        (spdy.LayerOptions("l2", ("2 : 4", "b"), [0.3, 0.2]), "white space"),
    ):
        table = spdy.TimingTable(1.0, 0.5, (ok, layer))
        with pytest.raises(ValueError, match=match):
            table.dumps()
        assert spdy.TimingTable.from_json(table.to_json()) == table


# ----------------------------------------------------------------------------- optim update calls


def _transforms():
    import optax

    from jaxcompress import optim

    params = {"d": {"kernel": jnp.arange(16.0).reshape(4, 4) - 7.5}}
    schedule = optim.AcdcSchedule(1, 1, 1, final_compressed_start=3, total_steps=4)
    return params, {
        "acdc()": optim.acdc(optax.sgd(0.1), sparsity=0.5, schedule=schedule),
        "gmp()": optim.gmp(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, every=1),
        "fixed_mask()": optim.fixed_mask(optax.sgd(0.1), jm.magnitude(params, 0.5)),
        "cram()": optim.cram(optax.sgd(0.1), rho=0.05, sparsities=(0.5,)),
    }


@pytest.mark.parametrize("name", ["acdc()", "gmp()", "fixed_mask()", "cram()"])
def test_update_names_a_foreign_state_and_missing_params(name):
    params, transforms = _transforms()
    tx = transforms[name]
    state = tx.init(params)
    kw = {"grad_fn": lambda p: p} if name == "cram()" else {}
    want = (
        rf"{re.escape(name)}: state must be the {type(state).__name__} returned by init, got tuple"
    )
    with pytest.raises(TypeError, match=want):
        tx.update(params, tuple(state), params, **kw)
    with pytest.raises(
        ValueError, match=rf"{re.escape(name)}: update\(\) needs the current params"
    ):
        tx.update(params, state, None, **kw)

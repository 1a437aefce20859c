"""Trace an NNX model's forward pass to a jaxpr and propagate channel identity through it.

The model is split into its graph definition and state; ``jax.make_jaxpr`` traces a pure
function of the state's leaves and the inputs, so every jaxpr input is either a model variable
(known by its path) or a model input. Each equation relates the axes of its operands and results
(see :class:`_Walker`); the relations are recorded in an :class:`~._atoms.Atoms` store.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from jaxcompress.structure._atoms import Atoms, Seq

Path = tuple[Any, ...]

# Primitives that act elementwise: operands of the result's rank relate axis by axis (lax makes
# broadcasting explicit; rank-0 operands are scalars).
_ELEMENTWISE = frozenset(
    """
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1
    floor ge gt igamma imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne
    neg nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt
    square stop_gradient sub tan tanh xor shift_left shift_right_logical shift_right_arithmetic
    population_count clz sharding_constraint mesh_cast pvary
    """.split()
)
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor "
    "argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_CALLS = frozenset(
    "pjit jit closed_call core_call remat checkpoint custom_jvp_call custom_vjp_call "
    "custom_vjp_call_jaxpr".split()
)


@dataclasses.dataclass
class _Val:
    """What the walker knows about one traced value."""

    axes: list[Seq]
    dep: bool  # depends on a model input (an activation), not only on variables
    origin: Path | None  # the model variable it is a reshaped/converted copy of, if any


@dataclasses.dataclass
class OpRecord:
    """One contraction of the traced forward pass, to re-run it at other widths."""

    primitive: Any  # the jax primitive (dot_general or conv_general_dilated)
    params: dict[str, Any]
    operands: list[list[Seq]]  # per operand: the atom sequence of each axis
    dtypes: list[Any]
    feature_groups: Seq | None  # conv feature_group_count atoms (None: not grouped)
    # per operand: the path of the model variable it is computed from alone (through layout
    # ops such as transpose, reshape, convert_element_type, or ops with constants), None for
    # an operand that depends on a model input or on several variables
    variables: list[Path | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Trace:
    """The propagated structure of one model on one set of example inputs."""

    atoms: Atoms
    variables: dict[Path, tuple[type, tuple[int, ...], list[Seq]]]  # path -> (type, shape, axes)
    producers: list[tuple[Seq, Path]]  # free axes of a variable in dot_general/conv, in order
    consumers: list[tuple[Seq, Path]]  # variable axes contracted with an activation
    grouped_convs: dict[Path, Seq]  # kernel path -> its feature-group atom sequence
    mac_terms: list[list[Any]]  # per dot_general/conv: atom sequences or constant ints
    ops: list[OpRecord]  # per dot_general/conv, in the order of mac_terms
    unsupported_macs: list[str]
    out_shapes: Any


def eval_view(model: nnx.Module) -> nnx.Module:
    """The model in inference mode (BatchNorm running statistics, dropout off)."""
    return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def key_path(keys: tuple) -> Path:
    """NNX variable path from a ``tree_flatten_with_path`` key path of an ``nnx.State``."""
    out = []
    for k in keys:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def variable_types(state: nnx.State) -> dict[Path, type]:
    return {tuple(p): type(v) for p, v in nnx.to_flat_state(state)}


def forward_fn(model: nnx.Module):
    """``(fn, leaves, paths)``: ``fn(leaves, *inputs)`` runs the model in inference mode."""
    graphdef, state = nnx.split(eval_view(model))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [key_path(kp) for kp, _ in with_path]
    leaves = [leaf for _, leaf in with_path]

    def fn(leaves, *inputs):
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))(*inputs)

    return fn, leaves, paths, variable_types(state)


def trace(model: nnx.Module, inputs: tuple) -> Trace:
    """Trace ``model(*inputs)`` and propagate channel identity; raises ``ValueError`` if the
    forward pass cannot be traced with these inputs."""
    fn, leaves, paths, types = forward_fn(model)
    try:
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(leaves, *inputs)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
        shapes = jax.tree_util.tree_map(lambda x: getattr(x, "shape", type(x).__name__), inputs)
        raise ValueError(
            f"could not trace {type(model).__name__}(*inputs) with inputs of shapes {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e
    jaxpr = closed.jaxpr
    walker = _Walker()
    atoms = walker.atoms
    n_vars = len(leaves)
    in_vals = []
    variables = {}
    for i, var in enumerate(jaxpr.invars):
        shape = tuple(var.aval.shape)
        axes = [atoms.seq(d) for d in shape]
        if i < n_vars:
            in_vals.append(_Val(axes, False, paths[i]))
            variables[paths[i]] = (types.get(paths[i], nnx.Variable), shape, axes)
        else:
            in_vals.append(_Val(axes, True, None))
            for seq in axes:
                atoms.block(seq, "it is an axis of the model input")
    consts = [_Val([atoms.seq(d) for d in np.shape(c)], False, None) for c in closed.consts]
    outs = walker.run(jaxpr, in_vals, consts)
    for val in outs:
        for seq in val.axes:
            atoms.block(seq, "it is an axis of the model output")
    atoms.settle()
    return Trace(
        atoms=atoms,
        variables=variables,
        producers=walker.producers,
        consumers=walker.consumers,
        grouped_convs=walker.grouped_convs,
        mac_terms=walker.mac_terms,
        ops=walker.ops,
        unsupported_macs=walker.unsupported_macs,
        out_shapes=out_shapes,
    )


def _sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, list] | None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


class _Walker:
    """Walks a jaxpr, relating the axes of each equation's operands and results.

    Rules (``why`` strings name the primitive in reports):

    * elementwise primitives, ``broadcast_in_dim`` (non-broadcast axes), ``transpose``,
      ``squeeze``, ``reshape`` (atom alignment), sub-jaxpr calls: identity of indices;
    * ``dot_general``: batch and contracting axes unified (a contraction between two
      activations blocks the axis: its removal is not a zero contribution of a weight);
      ``conv_general_dilated``: input features with the kernel's input axis, the kernel's output
      axis with the result's features; ``feature_group_count`` splits both feature axes into
      ``(groups, per group)`` atoms, so depthwise and grouped convolutions couple input and
      output channels group by group;
    * ``concatenate``, ``split`` and contiguous ``slice``: sum atoms (index offsets);
    * ``reduce_*``, ``argmax``, cumulative ops, ``sort``, ``top_k``, ``pad``, pooling windows,
      strided or dynamic slices, gathers on an axis: the axis is blocked;
    * anything else (control flow, scatter, FFT, ...): every operand and result axis is
      blocked with the primitive's name.
    """

    def __init__(self) -> None:
        self.atoms = Atoms()
        self.producers: list[tuple[Seq, Path]] = []
        self.consumers: list[tuple[Seq, Path]] = []
        self.grouped_convs: dict[Path, Seq] = {}
        self.mac_terms: list[list[Any]] = []
        self.ops: list[OpRecord] = []
        self.unsupported_macs: list[str] = []

    # ---------------------------------------------------------------- helpers

    def fresh(self, aval, dep: bool) -> _Val:
        return _Val([self.atoms.seq(d) for d in aval.shape], dep, None)

    def run(self, jaxpr: jcore.Jaxpr, in_vals: list[_Val], consts: list[_Val]) -> list[_Val]:
        env: dict[Any, _Val] = {}
        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, in_vals, strict=True):
            env[var] = val

        def read(v) -> _Val:
            if isinstance(v, jcore.Literal):
                return self.fresh(v.aval, False)
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, ins)
            for var, val in zip(eqn.outvars, outs, strict=True):
                if val.dep:
                    for seq in val.axes:
                        self.atoms.mark_active(seq)
                if not isinstance(var, jcore.DropVar):
                    env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list[_Val]) -> list[_Val]:
        name = eqn.primitive.name
        dep = any(v.dep for v in ins)
        rule = getattr(self, f"_rule_{name}", None)
        if name in _ELEMENTWISE:
            outs = [self._elementwise(eqn, ins, dep)]
        elif name in _REDUCE:
            outs = [self._reduce(eqn, ins[0], eqn.params["axes"], dep, name)]
        elif name in _CUMULATIVE:
            val = ins[0]
            self.atoms.block(val.axes[eqn.params["axis"]], f"{name} accumulates along it")
            outs = [_Val(list(val.axes), dep, None)]
        elif name in _CALLS and (found := _sub_jaxpr(eqn)) is not None:
            sub, sub_consts = found
            if len(sub.invars) != len(ins):
                return self._unsupported(eqn, ins, dep)
            consts = [
                _Val([self.atoms.seq(d) for d in np.shape(c)], False, None) for c in sub_consts
            ]
            outs = self.run(sub, ins, consts)
        elif rule is not None:
            outs = rule(eqn, ins, dep)
        else:
            outs = self._unsupported(eqn, ins, dep)
        if not dep and len(outs) == 1 and outs[0].origin is None:
            origins = {v.origin for v in ins if v.origin is not None}
            if len(origins) == 1 and name not in ("dot_general", "conv_general_dilated"):
                outs[0].origin = origins.pop()
        return outs

    def _unsupported(self, eqn, ins: list[_Val], dep: bool) -> list[_Val]:
        name = eqn.primitive.name
        why = f"unsupported primitive {name!r} uses it"
        for val in ins:
            for seq in val.axes:
                self.atoms.block(seq, why)
        outs = [self.fresh(v.aval, dep) for v in eqn.outvars]
        for val in outs:
            for seq in val.axes:
                self.atoms.block(seq, why)
        if name in ("cond", "while", "scan"):
            self.unsupported_macs.append(name)
        return outs

    def _elementwise(self, eqn, ins: list[_Val], dep: bool) -> _Val:
        shape = tuple(eqn.outvars[0].aval.shape)
        axes: list[Seq | None] = [None] * len(shape)
        why = eqn.primitive.name
        for val, var in zip(ins, eqn.invars, strict=True):
            in_shape = tuple(var.aval.shape)
            if len(in_shape) != len(shape):
                continue
            for i, (a, b) in enumerate(zip(in_shape, shape, strict=True)):
                if a != b:
                    continue
                current = axes[i]
                if current is None:
                    axes[i] = val.axes[i]
                else:
                    self.atoms.unify(current, val.axes[i], why)
        return _Val(
            [s if s is not None else self.atoms.seq(d) for s, d in zip(axes, shape, strict=True)],
            dep,
            None,
        )

    def _reduce(self, eqn, val: _Val, axes, dep: bool, name: str) -> _Val:
        for a in axes:
            self.atoms.block(val.axes[a], f"{name} reduces it")
        return _Val([s for i, s in enumerate(val.axes) if i not in set(axes)], dep, None)

    # ---------------------------------------------------------------- shape rules

    def _rule_broadcast_in_dim(self, eqn, ins, dep):
        val, shape = ins[0], eqn.params["shape"]
        axes = [None] * len(shape)
        for i, j in enumerate(eqn.params["broadcast_dimensions"]):
            if eqn.invars[0].aval.shape[i] == shape[j]:
                axes[j] = val.axes[i]
        return [
            _Val(
                [
                    s if s is not None else self.atoms.seq(d)
                    for s, d in zip(axes, shape, strict=True)
                ],
                dep,
                None,
            )
        ]

    def _rule_reshape(self, eqn, ins, dep):
        if eqn.params.get("dimensions") is not None or len(ins) != 1:
            return self._unsupported(eqn, ins, dep)
        val = ins[0]
        out = self.fresh(eqn.outvars[0].aval, dep)
        self.atoms.unify(
            [a for s in val.axes for a in s], [a for s in out.axes for a in s], "reshape"
        )
        return [out]

    def _rule_squeeze(self, eqn, ins, dep):
        dims = {d % len(ins[0].axes) for d in eqn.params["dimensions"]}
        return [_Val([s for i, s in enumerate(ins[0].axes) if i not in dims], dep, None)]

    def _rule_transpose(self, eqn, ins, dep):
        return [_Val([ins[0].axes[p] for p in eqn.params["permutation"]], dep, None)]

    def _rule_optimization_barrier(self, eqn, ins, dep):
        return [_Val(list(v.axes), v.dep, v.origin) for v in ins]

    def _rule_rev(self, eqn, ins, dep):
        for d in eqn.params["dimensions"]:
            self.atoms.block(ins[0].axes[d], "rev reverses it")
        return [_Val(list(ins[0].axes), dep, None)]

    def _rule_iota(self, eqn, ins, dep):
        return [self.fresh(eqn.outvars[0].aval, dep)]

    def _rule_sort(self, eqn, ins, dep):
        d = eqn.params["dimension"]
        first = ins[0]
        for val in ins[1:]:
            for i in range(len(first.axes)):
                self.atoms.unify(first.axes[i], val.axes[i], "sort")
        self.atoms.block(first.axes[d], "sort permutes it")
        return [_Val(list(first.axes), dep, None) for _ in eqn.outvars]

    def _rule_top_k(self, eqn, ins, dep):
        val = ins[0]
        outs = [self.fresh(v.aval, dep) for v in eqn.outvars]
        last = len(val.axes) - 1
        self.atoms.block(val.axes[last], "top_k selects along it")
        for out in outs:
            self.atoms.block(out.axes[last], "top_k selects along it")
            for i in range(last):
                self.atoms.unify(val.axes[i], out.axes[i], "top_k")
        return outs

    def _rule_concatenate(self, eqn, ins, dep):
        d = eqn.params["dimension"]
        shape = eqn.outvars[0].aval.shape
        axes = []
        for i in range(len(shape)):
            if i == d:
                axes.append((self.atoms.make_sum([v.axes[d] for v in ins]),))
                continue
            first = ins[0].axes[i]
            for v in ins[1:]:
                self.atoms.unify(first, v.axes[i], "concatenate")
            axes.append(first)
        return [_Val(axes, dep, None)]

    def _rule_split(self, eqn, ins, dep):
        d = eqn.params["axis"]
        outs = [self.fresh(v.aval, dep) for v in eqn.outvars]
        for i in range(len(ins[0].axes)):
            for o in outs:
                if i != d:
                    self.atoms.unify(ins[0].axes[i], o.axes[i], "split")
        whole = self.atoms.make_sum([o.axes[d] for o in outs])
        self.atoms.unify(ins[0].axes[d], (whole,), "split")
        return outs

    def _rule_slice(self, eqn, ins, dep):
        val = ins[0]
        in_shape = eqn.invars[0].aval.shape
        strides = eqn.params["strides"] or (1,) * len(in_shape)
        out = self.fresh(eqn.outvars[0].aval, dep)
        for i, (lo, hi, st) in enumerate(
            zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides, strict=True)
        ):
            n = in_shape[i]
            if lo == 0 and hi == n and st == 1:
                self.atoms.unify(val.axes[i], out.axes[i], "slice")
            elif st == 1:
                parts = []
                if lo:
                    parts.append((self.atoms.new(lo),))
                parts.append(out.axes[i])
                if hi < n:
                    parts.append((self.atoms.new(n - hi),))
                self.atoms.unify(val.axes[i], (self.atoms.make_sum(parts),), "slice")
            else:
                self.atoms.block(val.axes[i], "a strided slice takes part of it")
        return [out]

    def _rule_pad(self, eqn, ins, dep):
        val = ins[0]
        out = self.fresh(eqn.outvars[0].aval, dep)
        for i, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            if lo == hi == interior == 0:
                self.atoms.unify(val.axes[i], out.axes[i], "pad")
            else:
                self.atoms.block(val.axes[i], "pad pads it")
                self.atoms.block(out.axes[i], "pad pads it")
        return [out]

    def _rule_reduce_window_max(self, eqn, ins, dep):
        p = eqn.params
        val = ins[0]
        out = self.fresh(eqn.outvars[0].aval, dep)
        name = eqn.primitive.name
        for i, (w, st, pad, bd, wd) in enumerate(
            zip(
                p["window_dimensions"],
                p["window_strides"],
                p["padding"],
                p["base_dilation"],
                p["window_dilation"],
                strict=True,
            )
        ):
            if w == st == bd == wd == 1 and tuple(pad) == (0, 0):
                self.atoms.unify(val.axes[i], out.axes[i], name)
            else:
                self.atoms.block(val.axes[i], f"{name} pools over it")
                self.atoms.block(out.axes[i], f"{name} pools over it")
        return [out]

    _rule_reduce_window_min = _rule_reduce_window_max
    _rule_reduce_window_sum = _rule_reduce_window_max

    def _rule_dynamic_slice(self, eqn, ins, dep):
        val = ins[0]
        out = self.fresh(eqn.outvars[0].aval, dep)
        for i, size in enumerate(eqn.params["slice_sizes"]):
            if size == eqn.invars[0].aval.shape[i]:
                self.atoms.unify(val.axes[i], out.axes[i], "dynamic_slice")
            else:
                self.atoms.block(val.axes[i], "dynamic_slice takes part of it")
        return [out]

    def _rule_dynamic_update_slice(self, eqn, ins, dep):
        op, upd = ins[0], ins[1]
        for i, (a, b) in enumerate(
            zip(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, strict=True)
        ):
            if a == b:
                self.atoms.unify(op.axes[i], upd.axes[i], "dynamic_update_slice")
            else:
                self.atoms.block(op.axes[i], "dynamic_update_slice writes part of it")
                self.atoms.block(upd.axes[i], "dynamic_update_slice writes part of it")
        return [_Val(list(op.axes), dep, None)]

    def _rule_gather(self, eqn, ins, dep):
        op, idx = ins[0], ins[1]
        dn = eqn.params["dimension_numbers"]
        op_shape = eqn.invars[0].aval.shape
        out = self.fresh(eqn.outvars[0].aval, dep)
        indexed = (
            set(dn.collapsed_slice_dims)
            | set(dn.start_index_map)
            | set(getattr(dn, "operand_batching_dims", ()))
        )
        passthrough = [
            i
            for i in range(len(op_shape))
            if i not in set(dn.collapsed_slice_dims)
            and i not in set(getattr(dn, "operand_batching_dims", ()))
        ]
        if len(passthrough) != len(dn.offset_dims) or getattr(dn, "operand_batching_dims", ()):
            return self._unsupported(eqn, ins, dep)
        for i, j in zip(passthrough, dn.offset_dims, strict=True):
            if i in indexed or eqn.params["slice_sizes"][i] != op_shape[i]:
                self.atoms.block(op.axes[i], "gather indexes it")
                self.atoms.block(out.axes[j], "gather indexes it")
            else:
                self.atoms.unify(op.axes[i], out.axes[j], "gather")
                if not op.dep and op.origin is not None:
                    self.producers.append((op.axes[i], op.origin))
        for i in dn.collapsed_slice_dims:
            self.atoms.block(op.axes[i], "gather indexes it")
        batch_out = [j for j in range(len(out.axes)) if j not in set(dn.offset_dims)]
        idx_axes = idx.axes[:-1]  # the index vector is the last axis of the indices
        if len(idx_axes) == len(batch_out):
            for s, j in zip(idx_axes, batch_out, strict=True):
                self.atoms.unify(s, out.axes[j], "gather")
        return [out]

    # ---------------------------------------------------------------- contractions

    def _rule_dot_general(self, eqn, ins, dep):
        lhs, rhs = ins[0], ins[1]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        both = lhs.dep and rhs.dep
        for i, j in zip(lc, rc, strict=True):
            self.atoms.unify(lhs.axes[i], rhs.axes[j], "dot_general")
            if both:
                self.atoms.block(lhs.axes[i], "dot_general contracts it between two activations")
            for act, var, k in ((lhs, rhs, j), (rhs, lhs, i)):
                if act.dep and not var.dep and var.origin is not None:
                    self.consumers.append((var.axes[k], var.origin))
        for i, j in zip(lb, rb, strict=True):
            self.atoms.unify(lhs.axes[i], rhs.axes[j], "dot_general")
        lfree = [lhs.axes[i] for i in range(len(lhs.axes)) if i not in set(lc) | set(lb)]
        rfree = [rhs.axes[i] for i in range(len(rhs.axes)) if i not in set(rc) | set(rb)]
        for val, free in ((lhs, lfree), (rhs, rfree)):
            if not val.dep and val.origin is not None:
                for seq in free:
                    self.producers.append((seq, val.origin))
        out = _Val([lhs.axes[i] for i in lb] + lfree + rfree, dep, None)
        self.mac_terms.append(list(out.axes) + [lhs.axes[i] for i in lc])
        self._record(eqn, ins, None)
        return [out]

    def _record(self, eqn, ins: list[_Val], groups: Seq | None) -> None:
        self.ops.append(
            OpRecord(
                eqn.primitive,
                dict(eqn.params),
                [list(v.axes) for v in ins],
                [v.aval.dtype for v in eqn.invars],
                groups,
                [None if v.dep else v.origin for v in ins],
            )
        )

    def _rule_conv_general_dilated(self, eqn, ins, dep):
        lhs, rhs = ins[0], ins[1]
        if eqn.params.get("batch_group_count", 1) != 1:
            return self._unsupported(eqn, ins, dep)
        dn = eqn.params["dimension_numbers"]
        lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = eqn.params["feature_group_count"]
        out = self.fresh(eqn.outvars[0].aval, dep)
        atoms = self.atoms
        grouped: Seq | None = None
        lf, ri, ro = lhs.axes[lspec[1]], rhs.axes[rspec[1]], rhs.axes[rspec[0]]
        if groups == 1:
            atoms.unify(lf, ri, "conv_general_dilated")
        else:
            c_in = eqn.invars[0].aval.shape[lspec[1]]
            c_out = eqn.invars[1].aval.shape[rspec[0]]
            g = atoms.seq(groups)
            per_in = atoms.seq(c_in // groups)
            atoms.unify(lf, g + per_in, "conv_general_dilated")
            atoms.unify(ri, per_in, "conv_general_dilated")
            atoms.unify(ro, g + atoms.seq(c_out // groups), "conv_general_dilated")
            grouped = g
            if rhs.origin is not None:
                self.grouped_convs[rhs.origin] = g
        if lhs.dep and rhs.dep:
            atoms.block(lf, "conv_general_dilated contracts it between two activations")
        if lhs.dep and not rhs.dep and rhs.origin is not None:
            # The feature groups pass through (a depthwise conv reads and writes the same
            # channel); only the per-group input axis is read in the sense of a contraction.
            self.consumers.append((ri, rhs.origin))
        atoms.unify(lhs.axes[lspec[0]], out.axes[ospec[0]], "conv_general_dilated")
        atoms.unify(ro, out.axes[ospec[1]], "conv_general_dilated")
        if not rhs.dep and rhs.origin is not None:
            self.producers.append((ro, rhs.origin))
        spatial = [int(eqn.invars[1].aval.shape[i]) for i in rspec[2:]]
        self.mac_terms.append(list(out.axes) + [ri, math.prod(spatial)])
        self._record(eqn, ins, grouped)
        return [out]

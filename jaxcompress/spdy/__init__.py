"""SPDY: speedup-constrained layer-wise compression (Frantar & Alistarh, ICML 2022).

* :func:`solve` / :func:`solve_batch` / :func:`prepare`: the exact, jit-compiled DP that picks
  one option per layer minimising total cost under a time budget (reference semantics).
* :class:`TimingTable`: per-layer option times (reference text format, JSON, analytic
  ``from_flops``, measured with :func:`measure`).
* :func:`time_callables` / :func:`time_callable`: interleaved repeats of jitted calls on a
  wall or process-CPU clock (``CLOCKS``), each reported as a :class:`Timing` (median and
  IQR/median noise); :func:`null_call` is the trivial call whose time is the per-call
  overhead that :func:`measure` subtracts.
* :func:`budget`, :func:`max_speedup`, :func:`modelled_speedup`, :func:`prior_errors`: the
  reference's budget and error-prior accounting.
* :func:`group_options`: structured options of any NNX model from its dependency groups
  (:mod:`jaxcompress.structure`): a :class:`GroupOptions` with kept channel counts per group,
  an exact MAC table, a measured table, per-option errors and the pruned model of a profile.
* :func:`search`: the reference's random-restart plus local search over per-layer error
  coefficients, scored by the calibration loss of the stitched model (seeded, reproducible).
* :func:`build_database`, :func:`adaprune_layer`, :func:`global_adaprune`: the layer-wise
  reconstruction database (AdaPrune) and global AdaPrune after stitching.
* :func:`obs_database`: the database with OBS (SparseGPT) reconstruction from layer Hessians,
  every option of a layer from one factorisation; :func:`sparsegpt_layer` is its solver;
  :func:`stitcher` stitches profiles on the device inside a jitted calibration loss;
  :func:`hessian_error` is the normalised output error from a Hessian.

Float64 is the default DP dtype (needed for bit-parity with the reference); it runs under a
local ``jax.enable_x64(True)`` and never flips the global flag.
"""

from typing import TYPE_CHECKING

from jaxcompress import _lazy
from jaxcompress._timing import CLOCKS, Timing, null_call, time_callable, time_callables
from jaxcompress.spdy._dp import (
    InfeasibleBudgetError,
    PreparedDP,
    Solution,
    bucketize,
    prepare,
    solve,
    solve_batch,
)
from jaxcompress.spdy._measure import measure
from jaxcompress.spdy._obs import (
    NotPositiveDefiniteError,
    Stitcher,
    hessian_error,
    obs_database,
    sparsegpt_layer,
    stitcher,
)
from jaxcompress.spdy._reconstruct import (
    Database,
    adaprune_layer,
    build_database,
    channel_mask,
    global_adaprune,
    layer_error,
    unstructured_mask,
)
from jaxcompress.spdy._search import SearchResult, search
from jaxcompress.spdy._tables import (
    LayerOptions,
    TimingTable,
    budget,
    max_speedup,
    modelled_speedup,
    prior_errors,
)

if TYPE_CHECKING:  # pragma: no cover
    from jaxcompress.spdy._groups import GroupOptions, group_options

# Structured options need Flax (they trace NNX models); loaded on first use so that
# ``import jaxcompress.spdy`` stays Flax-free.
_FLAX_NAMES = ("GroupOptions", "group_options")

__all__ = [
    "CLOCKS",
    "Database",
    "GroupOptions",
    "SearchResult",
    "Timing",
    "adaprune_layer",
    "build_database",
    "channel_mask",
    "global_adaprune",
    "group_options",
    "layer_error",
    "search",
    "unstructured_mask",
    "hessian_error",
    "obs_database",
    "sparsegpt_layer",
    "stitcher",
    "InfeasibleBudgetError",
    "LayerOptions",
    "NotPositiveDefiniteError",
    "PreparedDP",
    "Solution",
    "Stitcher",
    "TimingTable",
    "bucketize",
    "budget",
    "max_speedup",
    "measure",
    "modelled_speedup",
    "null_call",
    "prepare",
    "prior_errors",
    "solve",
    "solve_batch",
    "time_callable",
    "time_callables",
]

__getattr__, __dir__ = _lazy.attributes(__name__, "jaxcompress.spdy._groups", _FLAX_NAMES, __all__)

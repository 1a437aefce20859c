"""Tile configuration of the N:M matmul kernel."""

from __future__ import annotations

import dataclasses

from jaxcompress.kernels._common import MetaLayout, largest_pow2_divisor, next_power_of_2

MIN_GPU_DOT = 16
"""Smallest dot dimension Triton's ``tl.dot`` accepts on tensor cores."""


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class NMMatmulConfig:
    """Tiles and launch parameters of the Pallas N:M matmul ``y = x @ W``.

    Attributes:
      block_m: rows of ``x`` per program (power of two; ``x`` is zero-padded to a multiple).
      block_n: columns of ``W`` per program (power of two dividing ``N``).
      block_k: rows of ``W`` consumed per inner-loop step; a multiple of the layout period
        ``period_dense`` (8 for 2:4) whose quotient is a power of two (at least 16 on GPU,
        the Triton dot minimum); ``K`` must be divisible by ``block_k * split_k``.
      split_k: programs sharing one output tile along ``K`` (partial sums in float32 are
        added afterwards); raises parallelism for small batches (decode).
      num_warps, num_stages: Triton launch parameters (ignored in interpret mode).

    ``NMMatmulConfig.default(...)`` gives per-shape defaults; to tune for another GPU, run
    ``experiments/benchmarks/nm_kernels.py --sweep``.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NMMatmulConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n", "split_k", "num_warps"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(
                    f"NMMatmulConfig.{name} must be a power of two, got {getattr(self, name)}"
                )

    def check(self, k: int, n_cols: int, layout: MetaLayout, *, min_dot: int) -> None:
        """Raises ``ValueError`` unless the tiles fit a ``(K, N)`` weight in ``layout``."""
        pd = layout.period_dense
        rows = self.block_k // pd
        if self.block_k % pd or not _is_pow2(rows) or rows < min_dot:
            raise ValueError(
                f"NMMatmulConfig.block_k={self.block_k} must be {pd} (the {layout.n}:"
                f"{layout.m} layout period) times a power of two >= {min_dot}"
            )
        if k % (self.block_k * self.split_k):
            raise ValueError(
                f"K={k} must be divisible by block_k*split_k={self.block_k}*{self.split_k}; "
                "pick another NMMatmulConfig or implementation='xla'"
            )
        if n_cols % self.block_n:
            raise ValueError(
                f"N={n_cols} must be divisible by NMMatmulConfig.block_n={self.block_n}; pick "
                "another NMMatmulConfig or implementation='xla'"
            )
        if self.block_n < min_dot or self.block_m < min_dot:
            raise ValueError(
                f"NMMatmulConfig.block_m={self.block_m} and block_n={self.block_n} must be >= "
                f"{min_dot} for the Triton dot"
            )

    @classmethod
    def default(
        cls,
        batch: int,
        k: int,
        n_cols: int,
        layout: MetaLayout,
        *,
        min_dot: int = MIN_GPU_DOT,
        itemsize: int = 2,
    ) -> NMMatmulConfig:
        """Per-shape defaults for ``x (batch, K) @ W (K, N)``.

        Small batches are bandwidth bound: ``block_n`` 64, ``block_k`` 16 rows per phase and
        ``split_k`` up to 16 so that ~512 programs are in flight, as long as the float32
        partial sums stay under ~40% of the weight bytes (tuned with
        ``experiments/benchmarks/nm_kernels.py --sweep``; its results are in
        ``experiments/benchmarks/results``).
        Large batches are compute bound: square 128x128 output tiles, ``block_k`` 32 per
        phase. 4-byte (float32) operands take half the ``block_k`` so that the pipelined
        tiles fit the shared memory of an H100 (a 128x256 float32 ``x`` tile in 3 stages
        does not). Raises ``ValueError`` if no tile fits (e.g. ``N`` not a multiple of 16 on
        GPU).
        """
        pd = layout.period_dense
        if batch <= 64:
            block_m = max(min_dot, min(64, next_power_of_2(batch)))
            want_n, rows_cap, warps = 64, 16, 4
        else:
            block_m = 128 if min_dot > 1 else min(128, next_power_of_2(batch))
            want_n, rows_cap, warps = 128, 32, 8
        block_n = largest_pow2_divisor(n_cols, want_n)
        if min_dot == 1:
            block_m = min(block_m, next_power_of_2(batch))
        if itemsize > 2:
            rows_cap = max(min_dot, rows_cap // 2)
        if k % pd:
            raise ValueError(f"K={k} must be divisible by the layout period {pd}")
        rows = largest_pow2_divisor(k // pd, rows_cap)
        if block_n < min_dot or rows < min_dot:
            raise ValueError(
                f"no Pallas N:M matmul tiling for K={k}, N={n_cols} ({layout.n}:{layout.m}): "
                f"needs K divisible by {pd * min_dot} and N by {min_dot}; use "
                "implementation='xla' (or nm_linear, which falls back automatically)"
            )
        block_k = rows * pd
        split_k = 1
        if batch <= 64:
            programs = -(-batch // block_m) * (n_cols // block_n)
            steps = k // block_k
            # float32 partials move 8*batch*N*split_k bytes; keep them under ~40% of the
            # 16-bit packed values (2*K*N*n/m bytes): split_k <= K*n / (10*m*batch)
            cap = min(16, k * layout.n // (10 * layout.m * max(batch, 1)))
            while split_k * 2 <= cap and programs * split_k < 512 and steps % (split_k * 2) == 0:
                split_k *= 2
        return cls(
            block_m=block_m,
            block_n=block_n,
            block_k=block_k,
            split_k=split_k,
            num_warps=warps,
            num_stages=3,
        )

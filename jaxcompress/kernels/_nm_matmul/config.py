"""Tile configuration of the Mosaic GPU N:M matmul kernel."""

from __future__ import annotations

import dataclasses

from jaxcompress.kernels._common import KERNEL_STRIDE, MetaLayout

SMEM_BYTES = 227 * 1024
"""Shared memory one block may use on an H100/H200 (sm90)."""

MAX_BATCH = 64
"""Most rows of ``x`` the kernel takes: the padded batch is the ``wgmma`` N side and its
activation tile (``block_k`` rows of it per stage) must fit two pipeline stages in shared
memory. Larger batches are compute bound, where dense ``jnp.dot`` is the right path."""

EXPANSIONS = ("registers", "smem")


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def padded_batch(batch: int) -> int:
    """The batch rounded up to a power of two ``>= 16`` (the ``wgmma`` N side; 16 bf16 are
    the 32-byte rows of the smallest swizzle)."""
    return max(16, 1 << max(0, int(batch) - 1).bit_length())


def period(layout: MetaLayout) -> int:
    """Dense rows of ``K`` covered by one period of index words at the kernel's stride."""
    return layout.m * layout.per_word * KERNEL_STRIDE


def check_problem(batch: int, k: int, layout: MetaLayout, stride: int) -> None:
    """Raises ``ValueError`` unless the kernel takes this problem with some tiles."""
    if layout.itemsize != 2:
        raise ValueError(
            f"the Mosaic GPU N:M kernel takes bfloat16 or float16 operands, got "
            f"{8 * layout.itemsize}-bit values (x.dtype = packed.dtype = float32); use "
            "implementation='xla'"
        )
    if stride != KERNEL_STRIDE:
        raise ValueError(
            f"the Mosaic GPU N:M kernel reads index words of stride {KERNEL_STRIDE}, this "
            f"weight has stride {stride} (K={k} is not a multiple of {period(layout)}); use "
            "implementation='xla'"
        )
    if batch > MAX_BATCH:
        raise ValueError(
            f"the Mosaic GPU N:M kernel takes at most {MAX_BATCH} rows of x (decode "
            f"batches), got {batch}; use implementation='xla'"
        )


@dataclasses.dataclass(frozen=True)
class NMMatmulConfig:
    """Tiles and pipeline of the Mosaic GPU N:M matmul ``y = x @ W`` (sm90).

    The kernel computes ``y^T = W^T x^T`` ("swap AB"): the expanded weight is the ``wgmma``
    A operand (``block_n`` output units, a multiple of 64) and the batch, padded to
    :func:`padded_batch`, is its N side. Block ``(i, s)`` of the grid owns output units
    ``i*block_n ...`` and the ``s``-th of ``split_k`` slices of ``K``, which it streams in
    steps of ``block_k`` dense rows through a ``max_concurrent_steps``-deep TMA pipeline.

    Attributes:
      block_n: output units per block (64 or 128: one ``wgmma`` M).
      block_k: dense rows of ``K`` per pipeline step, a multiple of the layout period
        (:func:`period`: ``m * per_word * 16``; 512 for 16-bit 2:4, 1:4, 4:8, 2:8 and
        1:2, 1024 for m = 16).
      split_k: blocks sharing an output tile along ``K`` (float32 partial sums added
        afterwards): raises the number of blocks in flight at decode batch sizes.
      max_concurrent_steps: pipeline depth (TMA stages in flight).
      expand: where the dense tile is built: ``'registers'`` (fed to ``wgmma`` as the A
        operand from registers, as jax's mixed-type Hopper matmul does) or ``'smem'``
        (written to a shared-memory tile that ``wgmma`` reads).

    :meth:`default` gives per-shape defaults; ``experiments/benchmarks/nm_kernels.py
    --sweep`` measures the alternatives on a GPU.
    """

    block_n: int = 64
    block_k: int = 512
    split_k: int = 1
    max_concurrent_steps: int = 4
    expand: str = "registers"

    def __post_init__(self):
        for name in ("block_n", "block_k", "split_k", "max_concurrent_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NMMatmulConfig.{name} must be a positive int, got {value!r}")
        if self.block_n not in (64, 128):
            raise ValueError(f"NMMatmulConfig.block_n must be 64 or 128, got {self.block_n}")
        if not _is_pow2(self.split_k):
            raise ValueError(f"NMMatmulConfig.split_k must be a power of two, got {self.split_k}")
        if self.expand not in EXPANSIONS:
            raise ValueError(
                f"NMMatmulConfig.expand must be one of {EXPANSIONS}, got {self.expand!r}"
            )

    def stage_bytes(self, batch: int, layout: MetaLayout) -> int:
        """Shared-memory bytes of one pipeline stage (values, index words, activations)."""
        groups = self.block_k // layout.m
        item = layout.itemsize
        values = layout.n * self.block_n * groups * item
        words = layout.n * self.block_n * groups // layout.per_word * item
        return values + words + self.block_k * padded_batch(batch) * item

    def smem_bytes(self, batch: int, layout: MetaLayout) -> int:
        """Shared-memory bytes of the whole kernel (pipeline, expansion and output tiles)."""
        expand = layout.m * self.block_n * KERNEL_STRIDE * layout.itemsize
        out = self.block_n * padded_batch(batch) * 4
        return (
            self.max_concurrent_steps * self.stage_bytes(batch, layout)
            + (expand if self.expand == "smem" else 0)
            + out
        )

    def check(self, batch: int, k: int, n_cols: int, layout: MetaLayout, stride: int) -> None:
        """Raises ``ValueError`` unless the kernel can run this problem with these tiles."""
        check_problem(batch, k, layout, stride)
        if self.block_k % period(layout):
            raise ValueError(
                f"NMMatmulConfig.block_k={self.block_k} must be a multiple of the layout period "
                f"{period(layout)} ({layout.n}:{layout.m}, {8 * layout.itemsize}-bit)"
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
        need = self.smem_bytes(batch, layout)
        if need > SMEM_BYTES:
            raise ValueError(
                f"NMMatmulConfig {self} needs {need} bytes of shared memory at batch {batch}, "
                f"more than the {SMEM_BYTES} of an sm90 block; lower max_concurrent_steps or "
                "block_k"
            )

    @classmethod
    def default(
        cls, batch: int, k: int, n_cols: int, layout: MetaLayout, *, num_sms: int = 132
    ) -> NMMatmulConfig:
        """Per-shape defaults for ``x (batch, K) @ W (K, N)``.

        ``block_n`` 64 and one period per step; ``split_k`` doubles while the grid has
        fewer than two blocks per SM, ``K`` still divides, and the float32 partial sums
        (``4*split_k*N*padded_batch`` bytes) stay under a tenth of the packed weight. The
        pipeline depth keeps two blocks resident per SM when two stages or more fit in half
        the shared memory (each block is one warpgroup that both expands and issues
        ``wgmma``, so a second block hides its ALU latency; 2-4 stages of 36-52 KB keep
        enough bytes in flight), else as many stages as fit one block (at most 4).
        Unmeasured on hardware: ``experiments/benchmarks/nm_kernels.py --sweep`` measures
        the alternatives.
        """
        block_n, block_k = 64, period(layout)
        if k % block_k:
            raise ValueError(
                f"no Mosaic GPU N:M tiling for K={k}: K must be a multiple of {block_k}; use "
                "implementation='xla' (nm_linear falls back automatically)"
            )
        bp = padded_batch(batch)
        packed_bytes = k * n_cols * layout.n / layout.m * layout.itemsize * 1.125
        split_k = 1
        while (
            (n_cols // block_n) * split_k < 2 * num_sms
            and k % (block_k * split_k * 2) == 0
            and 4 * split_k * 2 * n_cols * bp <= 0.1 * packed_bytes
        ):
            split_k *= 2
        steps = k // (block_k * split_k)
        depth = max(1, min(4, steps))
        config = cls(block_n, block_k, split_k, depth, "registers")
        for budget in (SMEM_BYTES // 2, SMEM_BYTES):
            fits = [
                d
                for d in range(depth, 0, -1)
                if dataclasses.replace(config, max_concurrent_steps=d).smem_bytes(batch, layout)
                <= budget
            ]
            if fits and (fits[0] >= min(2, depth) or budget == SMEM_BYTES):
                return dataclasses.replace(config, max_concurrent_steps=fits[0])
        return dataclasses.replace(config, max_concurrent_steps=1)

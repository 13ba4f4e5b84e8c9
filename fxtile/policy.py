"""How a tiled call runs: how many shards, whether at all, and in which precision weight gradients sum.

The trade: more shards mean a smaller per-shard intermediate (``rows/shards x intermediate`` elements
alive at once instead of ``rows x intermediate``), fewer shards mean bigger, more efficient matmuls and
less per-shard overhead. ``ShardPolicy`` states both limits; ``shards="auto"`` is ``ShardPolicy()``.

Why tiling is not always a saving: the tiled backward sums each weight's gradient over the shards in a
workspace the untiled step does not need (fp32 sums for bf16/fp16 weights), and that workspace is
weight-sized while the saving is token-sized. So ``"auto"`` compares, for each call, the region's peak
untiled and tiled at that call's token count (:class:`MemoryProfile`, measured once per region by
replaying its kernels, see :mod:`fxtile.memory`) and runs the call untiled where tiling would not lower
it. Where fp32 sums would eat much of the saving, the gradients sum in the weights' own dtype instead.
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["ACCUMULATE", "CallPlan", "MemoryProfile", "ShardPolicy", "Thresholds", "as_policy"]

ACCUMULATE = ("auto", "fp32", "param")


@dataclass(frozen=True)
class MemoryProfile:
    """A region's training peak in bytes (forward and backward, above its input, output and their
    gradients), as linear functions of the call's rows: ``untiled(rows)`` and ``tiled(rows, shards,
    fp32)``. Fitted from replays of the region's own kernels (:func:`fxtile.memory.profile`); exact for
    code whose allocations grow linearly with the rows, which the kernels' are."""

    untiled_fixed: float  # bytes independent of the rows (weight-gradient transients)
    untiled_per_row: float
    tiled_fixed: tuple[float, float]  # (param-dtype sums, fp32 sums): the weight-gradient workspace
    tiled_per_row: tuple[float, float]  # buffers over every row (the input gradient the op fills, ...)
    tiled_per_shard_row: tuple[float, float]  # the working set of one shard, per row of the shard

    def untiled(self, rows: int) -> float:
        return self.untiled_fixed + self.untiled_per_row * rows

    def tiled(self, rows: int, shards: int, fp32: bool) -> float:
        i = int(fp32)
        shard_rows = -(-rows // shards)
        return self.tiled_fixed[i] + self.tiled_per_row[i] * rows + self.tiled_per_shard_row[i] * shard_rows


@dataclass(frozen=True)
class CallPlan:
    """What one call runs: ``shards`` (1: the region untiled, at full speed) and whether weight gradients
    are summed in fp32 (``fp32_sums``; only matters for bf16/fp16 weights)."""

    shards: int
    fp32_sums: bool = True


@dataclass(frozen=True)
class ShardPolicy:
    """Shard rule for a tiled region; validated at construction.

    ``shards``: a fixed count (clamped to the number of rows), or ``None`` for the automatic rule:

    * memory: each shard's intermediate (``shard_rows x intermediate``) is at most ``budget`` times the
      MLP input (``rows x hidden``), i.e. ``ceil(intermediate / (budget * hidden))`` shards;
    * speed: no shard smaller than ``min_tokens`` rows, so short inputs run in one untiled call;
    * worth it: a call whose tiled peak (workspace included) would not be at least ``min_saving`` below
      the untiled peak runs untiled (see the module docstring).

    ``accumulate``: the precision of the weight-gradient sums of bf16/fp16 weights. ``"fp32"`` sums in
    float32 (as close to an fp64 reference as the untiled step; costs 4 bytes per weight while the
    backward runs), ``"param"`` in the weights' own dtype (no workspace; each shard's partial sum is
    rounded, so the error grows with the square root of the shard count, as in DeepSpeed's and Axolotl's
    ``TiledMLP``), ``"auto"`` fp32 where its workspace costs at most a quarter of what tiling saves at
    that call, else the weights' dtype. A fixed ``shards`` count is always honoured, with fp32 sums
    unless ``accumulate="param"``.

    Why these defaults (benchmarks/mlp.py, S=16384, H=512, I=2048, fp32, CPU): a shard's backward
    holds about four ``shard x intermediate`` tensors, so ``budget=0.125`` adds about half an input's
    size on top of the floor (input, output and their grads: 4 x S x H); measured peak 151 MiB =
    1.18x the floor with 32 shards, against 213 MiB (1.67x) with 16. 512-row tiles keep the matmuls
    large enough to run at full speed. ``min_saving=0.05``: a saving smaller than that is within the
    profile's own error and does not pay for the recompute.
    """

    shards: int | None = None
    min_tokens: int = 512
    budget: float = 0.125
    accumulate: str = "auto"
    min_saving: float = 0.05
    loss_budget: float = 0.24  # a loss shard's logits: at most this share of the loss's memory floor

    def __post_init__(self) -> None:
        if self.shards is not None:
            _check_shards(self.shards, "ShardPolicy.shards must be a positive int, or None for the automatic rule")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"ShardPolicy.min_tokens must be a positive int, got {self.min_tokens!r}")
        for name in ("budget", "loss_budget"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"ShardPolicy.{name} must be a positive number, got {value!r}")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"ShardPolicy.accumulate must be one of {', '.join(map(repr, ACCUMULATE))}, "
                             f"got {self.accumulate!r}")
        if not isinstance(self.min_saving, (int, float)) or isinstance(self.min_saving, bool) or not 0 <= self.min_saving < 1:
            raise ValueError(f"ShardPolicy.min_saving must be a number in [0, 1), got {self.min_saving!r}")

    def count(self, rows: int, hidden: int, intermediate: int) -> int:
        """Shards for ``rows`` tokens by the memory and speed rules alone (works with symbolic ``rows``
        under ``torch.compile``)."""
        if self.shards is not None:
            return self.shards
        by_memory = max(1, -(-intermediate // max(1, int(self.budget * hidden))))
        by_speed = torch.sym_max(1, rows // self.min_tokens)
        return torch.sym_min(by_memory, by_speed)

    def loss_count(self, rows: int, hidden: int, vocab: int, itemsize: int = 4) -> int:
        """Shards for a projection + cross-entropy over ``rows`` tokens, sized from the memory floor.

        The floor is what any implementation holds: the hidden states and their gradient and the head
        weight's gradient, ``(2 x rows x hidden + vocab x hidden) x itemsize`` bytes. A shard holds its
        logits in fp32 (plus their gradient in the weights' dtype for bf16/fp16), so shards get as many rows
        as keep that under ``loss_budget`` of the floor, and never fewer than ``min_tokens // 8``: each shard
        reads the whole head weight three times (logits, input gradient, weight gradient), so larger shards
        are faster. Why 0.24: the op's peak is then about 1.24x the floor (its target: at most 1.25x), and
        its time at most torch's chunked ``linear_cross_entropy``'s (benchmarks/loss.py, S=16384, H=512,
        V=32000: 0.2 gave 205-row shards at 1.01x torch's time, 0.24 gives 245 rows at 0.98x)."""
        if self.shards is not None:
            return self.shards
        floor = (2 * rows * hidden + vocab * hidden) * itemsize
        per_row = vocab * (4 + (itemsize if itemsize < 4 else 0))
        share = fractions.Fraction(self.loss_budget).limit_denominator(1000)
        shard_rows = torch.sym_max(max(1, self.min_tokens // 8), (floor * share.numerator) // (per_row * share.denominator))
        return torch.sym_max(1, -(-rows // shard_rows))

    def plan(self, rows: int, shards: int, profile: Optional[MemoryProfile]) -> CallPlan:
        """The call plan for ``rows`` rows, given the shard count the rules chose and the region's memory
        profile (None: not profiled, the rules decide alone)."""
        fp32 = self.accumulate != "param"
        if self.shards is not None or profile is None or shards <= 1:
            return CallPlan(shards, fp32)
        untiled = profile.untiled(rows)
        options = {f: profile.tiled(rows, shards, f) for f in (False, True)}
        if self.accumulate == "auto":
            fp32 = options[True] - options[False] <= (untiled - options[False]) / 4
        if options[fp32] > untiled * (1 - self.min_saving):
            return CallPlan(1, True)  # tiling would not lower this call's peak: run it untiled
        return CallPlan(shards, fp32)

    def thresholds(self, count: Callable[[int], int], profile: Optional[MemoryProfile],
                   limit: int = 1 << 26) -> "Thresholds":
        """Where :meth:`plan`'s answer changes, for a region whose rules give ``count(rows)`` shards: from how
        many rows a call runs tiled, and from how many its sums are fp32. Both are thresholds because the
        saving grows with the rows while the workspace does not; found once, on plain ints (doubling, then
        bisecting), so a call compares its rows with two numbers (under ``torch.compile`` with symbolic
        sizes: at most one guard each, not one per length)."""
        def first(holds: Callable[[int], bool]) -> Optional[int]:
            rows, below = 2, 1
            while rows <= limit and not holds(rows):
                below, rows = rows, rows * 2
            if rows > limit:
                return None
            while rows - below > 1:
                mid = (rows + below) // 2
                below, rows = (below, mid) if holds(mid) else (mid, rows)
            return rows

        tiled_from = first(lambda rows: self.plan(rows, int(count(rows)), profile).shards > 1)
        fp32_from = first(lambda rows: (p := self.plan(rows, int(count(rows)), profile)).shards > 1 and p.fp32_sums)
        return Thresholds(tiled_from, fp32_from)

    def describe(self) -> str:
        return str(self.shards) if self.shards is not None else "auto"


@dataclass(frozen=True)
class Thresholds:
    """A region's :meth:`ShardPolicy.thresholds`: the rows from which a call runs tiled, and from which its
    weight-gradient sums are fp32 (None: never, within the search's limit)."""

    tiled_from: Optional[int]
    fp32_from: Optional[int]

    def plan(self, rows: int, shards: int) -> CallPlan:
        if self.tiled_from is None or rows < self.tiled_from:
            return CallPlan(1, True)
        return CallPlan(shards, self.fp32_from is not None and rows >= self.fp32_from)


def _check_shards(shards: object, what: str = "shards must be 'auto', a positive int or a ShardPolicy") -> None:
    """The one check of a shard count (``transform``'s ``shards``, ``ShardPolicy.shards``, ``--shards``)."""
    wrong = f"{what}, got {type(shards).__name__} {shards!r}"
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise (ValueError if isinstance(shards, str) else TypeError)(wrong)
    if shards < 1:
        raise ValueError(f"{wrong}; pass shards=1 to run untiled or shards='auto'")


def as_policy(shards: object) -> ShardPolicy:
    """The user's ``shards`` argument as a policy: ``"auto"``, a positive ``int`` or a ``ShardPolicy``."""
    if isinstance(shards, ShardPolicy):
        return shards
    if isinstance(shards, str) and shards == "auto":
        return ShardPolicy()
    _check_shards(shards)  # None is no count either: only ShardPolicy(shards=None) means "auto"
    return ShardPolicy(shards=shards)

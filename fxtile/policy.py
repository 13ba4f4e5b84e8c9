"""How many shards a tiled MLP call is split into.

The trade: more shards mean a smaller per-shard intermediate (``rows/shards x intermediate``
elements alive at once instead of ``rows x intermediate``), fewer shards mean bigger, more efficient
matmuls and less per-shard overhead. ``ShardPolicy`` states both limits; ``shards="auto"`` is
``ShardPolicy()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShardPolicy", "as_policy"]


@dataclass(frozen=True)
class ShardPolicy:
    """Shard rule for a tiled region; validated at construction.

    ``shards``: a fixed count (clamped to the number of rows), or ``None`` for the automatic rule:

    * memory: each shard's intermediate (``shard_rows x intermediate``) is at most ``budget`` times the
      MLP input (``rows x hidden``), i.e. ``ceil(intermediate / (budget * hidden))`` shards;
    * speed: no shard smaller than ``min_tokens`` rows, so short inputs run in one untiled call.

    Why these defaults (benchmarks/mlp.py, S=16384, H=512, I=2048, fp32, CPU): a shard's backward
    holds about four ``shard x intermediate`` tensors, so ``budget=0.125`` adds about half an input's
    size on top of the floor (input, output and their grads: 4 x S x H); measured peak 151 MiB =
    1.18x the floor with 32 shards, against 213 MiB (1.67x) with 16. 512-row tiles keep the matmuls
    large enough to run at full speed.
    """

    shards: int | None = None
    min_tokens: int = 512
    budget: float = 0.125

    def __post_init__(self) -> None:
        if self.shards is not None and (isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1):
            raise ValueError(f"shards must be a positive int, 'auto' or a ShardPolicy, got {self.shards!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"ShardPolicy.min_tokens must be a positive int, got {self.min_tokens!r}")
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not self.budget > 0:
            raise ValueError(f"ShardPolicy.budget must be a positive number, got {self.budget!r}")

    def count(self, rows: int, hidden: int, intermediate: int) -> int:
        """Shards for ``rows`` tokens (works with symbolic ``rows`` under ``torch.compile``)."""
        if self.shards is not None:
            return self.shards
        by_memory = max(1, -(-intermediate // max(1, int(self.budget * hidden))))
        by_speed = torch.sym_max(1, rows // self.min_tokens)
        return torch.sym_min(by_memory, by_speed)

    def loss_count(self, rows: int, hidden: int, vocab: int) -> int:
        """Shards for a projection + cross-entropy over ``rows`` tokens.

        Memory: the same rule as an MLP's (a shard's ``rows x vocab`` logits at most ``budget`` times the
        input). Speed: each shard reads the whole ``[vocab, hidden]`` head weight three times (logits,
        input gradient, weight gradient), so shards are kept at ``min_tokens // 4`` rows or more (128 by
        default): benchmarks/loss.py at S=16384, H=512 measured 128 rows at 1.12x (V=32000) and 1.20x
        (V=128256) the memory floor; 256 rows run about 10% faster at V=32000 but hold 125 MiB of logits
        per shard at V=128256."""
        if self.shards is not None:
            return self.shards
        by_memory = max(1, -(-vocab // max(1, int(self.budget * hidden))))
        by_speed = torch.sym_max(1, rows // max(1, self.min_tokens // 4))
        return torch.sym_min(by_memory, by_speed)

    def describe(self) -> str:
        return str(self.shards) if self.shards is not None else "auto"


def as_policy(shards: object) -> ShardPolicy:
    """Validate the user's ``shards`` argument: ``"auto"``, a positive ``int`` or a ``ShardPolicy``."""
    if isinstance(shards, ShardPolicy):
        return shards
    if isinstance(shards, str):
        if shards != "auto":
            raise ValueError(f"shards must be 'auto', a positive int or a ShardPolicy, got the string {shards!r}")
        return ShardPolicy()
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise TypeError(f"shards must be 'auto', a positive int or a ShardPolicy, got {type(shards).__name__} {shards!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}; pass shards=1 to run untiled or shards='auto'")
    return ShardPolicy(shards=shards)

"""What ``fxtile.find`` and ``fxtile.transform`` report: plain, typed values.

Why plain values: a record outlives the graph it was found in (``transform`` rewrites it, ``restore`` drops
it), so a :class:`Match` holds names, sizes and verdicts, never an fx node; a :class:`Skipped` holds a
:class:`Why` that callers (the report, the CLI, the tests) branch on, and a reason in words for people.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from .policy import ShardPolicy

__all__ = ["Match", "Matches", "Skipped", "Why"]


@dataclass(frozen=True)
class Match:
    """One tiled (or tileable) region.

    ``path`` is the qualified name of the module whose forward (or ``method``) holds the region ("" for
    the root); ``pattern`` is ``"gated"``, ``"gated_fused"``, ``"plain"``, ``"routed_experts"`` or
    ``"linear_cross_entropy"``; ``roles`` maps gate/up/down/act, gate_up/down/act, fc1/fc2/act, experts or
    head to submodule names relative to ``path`` (``act`` is absent for functional activations); ``nodes``
    names the fx nodes the tiled call replaces. An MLP or expert bank has an ``intermediate_size``, a loss
    head a ``vocab_size`` (the other is None). ``policy`` is the :class:`~fxtile.ShardPolicy` it is tiled
    with (None: not tiled). ``verified`` is the self-check's verdict (None: not run, ``check`` says why) and
    ``check`` its detail, with the measured error. ``tiled_from`` is about the smallest number of tokens a
    call needs to run tiled: below it ``shards="auto"`` runs the region untiled, because one untiled call
    holds less memory (the tiled backward's weight-gradient workspace outweighs the saving) or the rules
    ask for one shard (None: never within 2**26 tokens, or not tiled).
    """

    path: str
    pattern: str
    roles: dict[str, str]
    activation: str
    hidden_size: int
    intermediate_size: Optional[int]
    vocab_size: Optional[int]
    nodes: tuple[str, ...]
    policy: Optional[ShardPolicy] = None
    method: str = "forward"
    verified: Optional[bool] = None
    check: str = ""
    tiled_from: Optional[int] = None

    @property
    def tiled(self) -> bool:
        return self.policy is not None


class Why(enum.Enum):
    """Why a block was left untouched (the kind of a refusal)."""

    EXCLUDED = "excluded by filter_fn"
    WRAPPED = "an instance-level forward that a tiled forward would bypass"
    UNTRACED = "no graph of it holds a region: it does not trace, or traces without one"
    REFUSED = "a region was found in its graph and refused"
    SELF_CHECK = "the self-check measured the tiled region against the untiled one and refused it"
    NOT_FOUND = "a region looked for was not found anywhere"


@dataclass(frozen=True)
class Skipped:
    """A block that looked like it holds a region but was left untouched: ``why`` (typed), ``reason`` (in
    words, with the measured error or the node that refused it) and, where one was found or looked for,
    the ``pattern``."""

    path: str
    why: Why
    reason: str
    pattern: Optional[str] = None


class Matches(list):
    """``list[Match]`` with ``.skipped``: the blocks left untouched, each with its reason."""

    def __init__(self, matches: list[Match], skipped: list[Skipped]) -> None:
        super().__init__(matches)
        self.skipped = skipped

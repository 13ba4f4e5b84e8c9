"""The install state: what fxtile installs on a tiled module, and what the last transform refused there.

Its own module because everything that installs, reads or removes a tiling reads it (the API, the block
kinds, the per-call cache, ``fxtile.testing``), and none of them should import another for it: it imports
the records, the policy and the region callables it holds, nothing that installs.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, fields
from typing import Callable, Optional, Protocol

from torch import nn

from .policy import ShardPolicy
from .records import Match, Skipped
from .region import TiledRegion

__all__ = ["CHECK_REFUSALS", "CallGraphs", "STATE", "TileState"]


class CallGraphs(Protocol):
    """What the install state reads of a block traced per call signature (:class:`fxtile.percall.PerCall`)."""

    untiled_calls: int

    def entries(self) -> list: ...

    def regions(self) -> list[TiledRegion]: ...


STATE = "_fxtile"  # the instance attribute holding a tiled module's TileState

# Regions the self-check refused at the last transform, by block (weak: the record goes with the module).
CHECK_REFUSALS: "weakref.WeakKeyDictionary[nn.Module, list[Skipped]]" = weakref.WeakKeyDictionary()


@dataclass
class TileState:
    """What fxtile installs on a tiled module (a plain attribute: not in ``state_dict``)."""

    kind: str
    attr: str  # the instance attribute replaced: "forward" or a method name
    function: Callable  # installed as ``types.MethodType(function, module)``
    matches: list[Match]
    regions: list[TiledRegion]  # one per match (for a block traced per call: its default call's graph)
    policy: ShardPolicy
    per_call: Optional[CallGraphs] = None
    owner: Optional[nn.Module] = None  # what the regions' tensor paths are relative to (default: the module)

    def __deepcopy__(self, memo: dict) -> "TileState":  # deep copies share regions (structure only)
        return TileState(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})

    def __reduce__(self):
        raise TypeError(
            "a model tiled by fxtile cannot be pickled (its regions live in this process); "
            "call fxtile.restore(model) first, or save its state_dict()"
        )

"""What matching finds in a graph: a region to tile (:class:`Candidate`) or an instance refused (:class:`Rejection`).

Internal to the graph package: a Candidate holds live fx nodes of the traced block; the public, plain
view of one is ``fxtile.Match``, built once the region is tiled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch.fx as fx

__all__ = ["Candidate", "FoundBy", "Rejection"]


class FoundBy(Protocol):
    """What a candidate reads of the pattern that found it (every :class:`~.patterns.Pattern` is one): its
    name and rank among overlapping finds, what its width is called, and the region's probe and plan,
    which the pattern owns. A protocol, so that this module, which patterns import, imports none of them."""

    name: str
    priority: int
    width_name: str  # "intermediate_size" for an MLP, "vocab_size" for a loss head

    def probe(self, cand: "Candidate") -> tuple: ...

    def plan(self, template: fx.GraphModule, cand: "Candidate", names: dict[str, str], tensor_paths: tuple) -> object: ...


@dataclass
class Candidate:
    """A region found in a graph, with live fx nodes (internal; the public view is ``fxtile.Match``)."""

    found_by: FoundBy  # the pattern object that found it: it owns the region's plan and probe
    inputs: tuple[fx.Node, ...]  # activation inputs, aligned on their leading (token) dims
    exit: fx.Node
    nodes: list[fx.Node]  # every node the tiled call replaces, in graph order; ``exit`` is last
    roles: dict[str, str]  # role -> submodule (or function) name
    role_nodes: dict[str, fx.Node]  # role -> node (projections, the gate ``*``, the activation's end)
    activation: str
    hidden_size: int
    width: int  # the intermediate size of an MLP, the vocabulary of a loss head (``found_by.width_name``)
    may_draw_random: bool
    escapes: tuple[fx.Node, ...] = field(default_factory=tuple)  # region values also returned by the graph
    rebind: tuple[fx.Node, ...] = field(default_factory=tuple)  # x.device of a region value, read outside
    options: dict = field(default_factory=dict)  # what the op needs beyond the nodes (the loss's arguments)

    @property
    def pattern(self) -> str:
        return self.found_by.name


@dataclass(frozen=True)
class Rejection:
    """A pattern instance found and then refused, with the reason in words."""

    nodes: tuple[str, ...]
    reason: str
    pattern: str | None = None  # the pattern whose instance it was (set by find_candidates)



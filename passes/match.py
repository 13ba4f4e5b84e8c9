"""Step 2: find the regions of a traced block, by shape and never by name.

How (in named steps, like ``torch.fx``'s ``SubgraphMatcher``):

1. **Label** (:mod:`passes.labels`): what each node does to the activations; element-wise chains are
   folded into the edges they sit on, a sum of linear maps of one input becomes one projection.
2. **Candidates** (:mod:`passes.patterns`): each pattern object finds its instances in the abstract
   graph and cuts each into a region (or says why not).
3. **Filters**, a list of functions run in order, each returning the reason it rejects or ``None``:
   nothing inside may be used outside the region (so one call can replace it, and no cycle can appear
   once fused), the input's rows must be tokens (no transpose on the way in), no module inside may hold
   buffers (a recompute would update them twice), and candidates must not overlap: where two claim the
   same nodes, the pattern of higher priority wins (the loss head over an MLP pattern that would take its
   projection: it saves more), then graph order, larger first. Every rejection is returned with its reason.

Pure: the graph is never modified.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .labels import INNER, POINTWISE, SPLIT, STATIC, Labels, label
from typing import Callable, Union

from .candidate import Candidate, Rejection
from .patterns import MLP_PATTERNS, Pattern
from .specialize import Traced
from .trace import outside_modules

__all__ = ["FILTERS", "Found", "Untraced", "find_candidates", "match_block"]

_TRANSPOSE_TARGETS = {
    torch.transpose, torch.permute, torch.swapaxes, torch.movedim, torch.t,
    "transpose", "permute", "swapaxes", "swapdims", "movedim", "t",
}


def _abstract_graph(labels: Labels) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node, kind in labels.kind.items():
        if kind in (STATIC, POINTWISE, SPLIT, INNER):
            continue
        graph.add_node(node, label=kind)
        for a in labels.flowing_inputs(node):
            for anchor in labels.anchors_of(a):
                graph.add_edge(anchor, node)
    return graph


# ---------------------------------------------------------------------------------------------
# Filters: each returns a reason to reject, or None.


def not_contained(gm: fx.GraphModule, cand: Candidate, accepted: list[Candidate]) -> str | None:
    inside = set(cand.nodes)
    escaping = set(cand.escapes)
    for node in cand.nodes:
        if node is cand.exit or node in cand.rebind:  # x.device of an inside value: re-read from the input
            continue
        outside = [u.name for u in node.users if u not in inside and not (node in escaping and u.op == "output")]
        if outside:
            return f"intermediate {node.name} is also used outside the region (by {', '.join(outside)}), so it cannot be recomputed away"
    return None


def rows_not_tokens(gm: fx.GraphModule, cand: Candidate, accepted: list[Candidate]) -> str | None:
    stack, seen = list(cand.inputs), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target in _TRANSPOSE_TARGETS or (node.target is getattr and node.args[1] in ("T", "mT")):
            what = node.target if isinstance(node.target, str) else node.target.__name__
            return f"its input comes through {node.name} ({what}), so its rows may not be tokens"
        stack.extend(node.all_input_nodes)
    return None


def stateful(gm: fx.GraphModule, cand: Candidate, accepted: list[Candidate]) -> str | None:
    for node in cand.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.CrossEntropyLoss):  # its class-weight buffer is only read
            continue
        if module is not None and any(True for _ in module.buffers()):
            return f"{node.target} holds buffers, which its forward may update; a recompute would update them again"
    return None


def overlapping(gm: fx.GraphModule, cand: Candidate, accepted: list[Candidate]) -> str | None:
    mine = set(cand.nodes)
    for other in accepted:
        if not mine.isdisjoint(other.nodes):
            return f"it overlaps the {other.pattern} region ending at {other.exit.name}, which was kept"
    return None


FILTERS = (not_contained, rows_not_tokens, stateful, overlapping)


def find_candidates(
    gm: fx.GraphModule, patterns: tuple[Pattern, ...] = MLP_PATTERNS
) -> tuple[list[Candidate], list[Rejection]]:
    """All non-overlapping regions of ``gm`` (in graph order), and what was refused and why."""
    labels = label(gm)
    graph = _abstract_graph(labels)
    found: list[Candidate] = []
    rejected: list[Rejection] = []
    for pattern in patterns:
        for inst in pattern.instances(gm, labels, graph):
            cut = pattern.cut(gm, labels, inst)
            if isinstance(cut, Candidate):
                found.append(cut)
            elif cut is not None:
                rejected.append(dataclasses.replace(cut, pattern=pattern.name))
    accepted: list[Candidate] = []
    for cand in sorted(found, key=lambda c: (-c.found_by.priority, labels.order[c.exit], -len(c.nodes))):
        reason = next((r for f in FILTERS if (r := f(gm, cand, accepted))), None)
        if reason is None:
            accepted.append(cand)
        else:
            rejected.append(Rejection(tuple(n.name for n in cand.nodes), reason, cand.pattern))
    return sorted(accepted, key=lambda c: labels.order[c.exit]), rejected


@dataclasses.dataclass(frozen=True)
class Untraced:
    """A block with no graph to match: why, in words (the tracer's error, or what it met)."""

    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class Found:
    """What matching a block's graph gave: the graph (an ``fx.GraphModule``, or a per-call :class:`Traced`
    that holds one), the regions found in it and the instances refused, each with its reason."""

    traced: Union[fx.GraphModule, Traced]
    candidates: list[Candidate]
    rejections: list[Rejection]

    @property
    def graph_module(self) -> fx.GraphModule:
        return _graph(self.traced)


def _graph(traced: Union[fx.GraphModule, Traced]) -> fx.GraphModule:
    return traced.graph_module if isinstance(traced, Traced) else traced


def match_block(
    trace_fn: Callable[[frozenset], Union[fx.GraphModule, Traced, str]], leaves: frozenset, patterns, root_of, prefix: str
) -> Union[Found, Untraced]:
    """Trace, match, and trace again with every traced-through module that holds no region node as a
    leaf (so its hooks keep running)."""
    traced = trace_fn(leaves)
    if isinstance(traced, str):
        return Untraced(traced)
    found = Found(traced, *find_candidates(_graph(traced), patterns))
    if not found.candidates:
        return found
    outside = outside_modules(root_of(traced), found.graph_module, [n for c in found.candidates for n in c.nodes], prefix)
    if outside:
        again = trace_fn(leaves | frozenset(outside))
        if not isinstance(again, str):
            second = Found(again, *find_candidates(_graph(again), patterns))
            if [(c.pattern, c.roles) for c in second.candidates] == [(c.pattern, c.roles) for c in found.candidates]:
                return second
    return found

"""Step 4: replace each region by ONE call node, then lint and recompile.

The rewrite never edits a module in place: it works on the traced ``GraphModule`` and hands the result
back, so a failure leaves the model untouched (never half-rewritten). Installing the new forward on the
module, and undoing it, is :mod:`fxtile.api`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch.fx as fx

from .patterns import Candidate
from .trace import forget_source_when_freed

__all__ = ["PassResult", "RegionCall", "rewrite"]


@dataclass(frozen=True)
class PassResult:
    """Like ``torch.fx.passes.infra.pass_base.PassResult``: the module and whether it changed."""

    graph_module: fx.GraphModule
    modified: bool


class RegionCall(Protocol):
    """The call target that replaces a region: ``target(inputs, modules, tensors) -> y``."""

    module_paths: tuple[str, ...]  # submodules passed in (checked against the types seen at match)
    tensor_paths: tuple[str, ...]  # parameters, buffers and tensor attributes the region reads


def rewrite(gm: fx.GraphModule, regions: list[tuple[Candidate, RegionCall]], *, lint: bool = True) -> PassResult:
    """Replace each candidate's nodes in ``gm`` by one ``call_function`` node to its ``RegionCall``.

    The inserted node reads ``target((inputs...), (submodules...), (tensors...))``: the weights are
    explicit inputs of the op (so they get their gradients once per backward, as DDP and FSDP require,
    even when the input needs none), and the submodules let the op check that nothing was swapped since.
    A region value the graph also returns (``cand.escapes``: the logits next to a tiled loss) is returned
    as ``None``: it is never materialized.
    """
    graph = gm.graph
    for cand, target in regions:
        inside = set(cand.nodes)
        for node in cand.rebind:  # x.device of an inside value, read outside: the input's device
            outside = [u for u in node.users if u not in inside]
            first = min(outside, key=list(graph.nodes).index)
            with graph.inserting_before(first):
                device = graph.call_function(getattr, (cand.inputs[0], "device"))
            for user in outside:
                user.replace_input_with(node, device)
        with graph.inserting_before(cand.exit):
            modules = tuple(graph.get_attr(p) for p in target.module_paths)
            tensors = tuple(graph.get_attr(p) for p in target.tensor_paths)
            call = graph.call_function(target, (cand.inputs, modules, tensors))
        for node in cand.escapes:
            for user in list(node.users):
                if user.op == "output":
                    user.args = fx.node.map_arg(user.args, lambda n, node=node: None if n is node else n)
        cand.exit.replace_all_uses_with(call)
        for node in reversed(cand.nodes):  # erase exactly what was replaced (no global DCE:
            graph.erase_node(node)  # a dead call elsewhere may still update a buffer)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    if lint:
        graph.lint()
    gm.recompile()
    forget_source_when_freed(gm)
    return PassResult(gm, bool(regions))

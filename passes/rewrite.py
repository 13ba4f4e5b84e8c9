"""Step 3 of 3: replace each matched region by ONE call node, then lint and recompile.

The rewrite never edits a module in place: it works on the traced ``GraphModule`` and hands the
result back, so a failure leaves the model untouched (never half-rewritten). Installing the new
forward on the module, and undoing it, is :mod:`fxtile.api`'s job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx

from .match import Candidate

__all__ = ["META_KEY", "MODULE_HOOKS", "get_path", "PassResult", "RegionCall", "extract_region", "meta_template", "region_inputs", "rewrite"]

META_KEY = "fxtile"  # node.meta key marking the call nodes fxtile inserted (survives deepcopy)
MODULE_HOOKS = (  # nn.Module's per-instance hook dicts
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


@dataclass(frozen=True)
class PassResult:
    """Like ``torch.fx.passes.infra.pass_base.PassResult``: the module and whether it changed."""

    graph_module: fx.GraphModule
    modified: bool


class RegionCall(Protocol):
    """The call target that replaces a region: ``target(inputs, modules, tensors) -> y``."""

    module_paths: tuple[str, ...]  # submodules passed in (checked against the types seen at match)
    tensor_paths: tuple[str, ...]  # parameters, buffers and tensor attributes the region reads


def extract_region(gm: fx.GraphModule, cand: Candidate) -> fx.GraphModule:
    """The region as a standalone ``GraphModule`` of its activation inputs (shares ``gm``'s submodules)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {node: graph.placeholder(f"x{i}") for i, node in enumerate(cand.inputs)}

    def copy(node: fx.Node) -> None:
        """Copy ``node`` after whatever it reads that is not copied yet: besides the inputs and earlier
        region nodes (graph order), only static operands, i.e. parameters and element-wise functions
        of them (``softplus(self.alpha)``), which the matcher checked and which are recomputed inside."""
        for arg in node.all_input_nodes:
            if arg not in env:
                copy(arg)
        env[node] = graph.node_copy(node, env.__getitem__)

    for node in cand.nodes:
        copy(node)
    graph.output(env[cand.exit])
    return fx.GraphModule(gm, graph, "FxtileRegion")


def region_inputs(region: fx.GraphModule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(module_paths, tensor_paths)``: the leaf modules the region calls and every tensor it reads."""
    modules: list[str] = []
    tensors: list[str] = []
    for node in region.graph.nodes:
        if node.op == "call_module":
            modules.append(str(node.target))
            sub = region.get_submodule(str(node.target))
            prefix = f"{node.target}."
            tensors += [prefix + n for n, _ in sub.named_parameters(remove_duplicate=False)]
            tensors += [prefix + n for n, _ in sub.named_buffers(remove_duplicate=False)]
        elif node.op == "get_attr":
            tensors.append(str(node.target))
    return tuple(dict.fromkeys(modules)), tuple(dict.fromkeys(tensors))


def meta_template(region: fx.GraphModule, tensor_paths: tuple[str, ...]) -> fx.GraphModule:
    """A copy of ``region`` whose tensors live on the meta device: structure only, no memory.

    The tiled op runs it with ``torch.func.functional_call`` on the live tensors, so the template
    never holds (or goes stale on) real weights, and deep copies of the model can share it.
    """
    memo: dict[int, torch.Tensor] = {}
    for path in tensor_paths:
        value = get_path(region, path)
        memo[id(value)] = torch.empty_like(value, device="meta")
    template = copy.deepcopy(region, memo)
    for module in template.modules():  # hooks belong to the live modules (DeepSpeed ZeRO-3, FSDP, accelerate
        for hooks in MODULE_HOOKS:  # offload, user hooks): a template copy must never run them per shard
            getattr(module, hooks).clear()
    return template


def get_path(root: torch.nn.Module, path: str) -> torch.Tensor:
    """The tensor at a dotted attribute path (``gate_proj.weight``)."""
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner), name)


def rewrite(gm: fx.GraphModule, regions: list[tuple[Candidate, RegionCall]], *, lint: bool = True) -> PassResult:
    """Replace each candidate's nodes in ``gm`` by one ``call_function`` node to its ``RegionCall``.

    The inserted node reads ``target((inputs...), (submodules...), (tensors...))``: the weights are
    explicit inputs of the op (so they get their gradients once per backward, as DDP and FSDP
    require, even when the input needs none), and the submodules let the op check that nothing was
    swapped since.
    """
    graph = gm.graph
    for cand, target in regions:
        with graph.inserting_before(cand.exit):
            modules = tuple(graph.get_attr(p) for p in target.module_paths)
            tensors = tuple(graph.get_attr(p) for p in target.tensor_paths)
            call = graph.call_function(target, (cand.inputs, modules, tensors))
        call.meta[META_KEY] = {"replaced": tuple(n.name for n in cand.nodes), "pattern": cand.pattern}
        cand.exit.replace_all_uses_with(call)
        for node in reversed(cand.nodes):  # erase exactly what was replaced (no global DCE:
            graph.erase_node(node)  # a dead call elsewhere may still update a buffer)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    if lint:
        graph.lint()
    gm.recompile()
    return PassResult(gm, bool(regions))

"""Step 3: cut a matched region out of its block's graph into a plain description, :class:`RegionSpec`.

What the runtime needs to run the region, and nothing live:

* the region as a standalone graph of its activation inputs, copied onto the **meta device** (the
  *template*: structure only, no memory, no hooks; it is run with ``torch.func.functional_call`` on the
  live tensors, so it never holds or goes stale on real weights);
* the paths of every module it calls and every tensor it reads (the op's explicit inputs);
* how the self-check fabricates its inputs (:class:`ProbeInput`), its sizes, whether it may draw random
  numbers, and the explicit plan its kernel follows, which the pattern that found it derives
  (``Pattern.plan``: :mod:`passes.plans`, :mod:`passes.loss_head`).

The runtime (``fxtile.region``) turns a RegionSpec into the callable the rewritten graph calls; nothing
here imports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .candidate import Candidate
from .trace import forget_source_when_freed, get_path, graph_module

__all__ = ["MODULE_HOOKS", "ProbeInput", "RegionSpec", "cut_region", "extract_region", "meta_template", "region_inputs"]


@dataclass(frozen=True)
class ProbeInput:
    """One activation input of a region, as the self-check must fabricate it: ``rows x width`` floats,
    or integer indices below ``high`` (class targets; expert ids, ``width`` distinct ones per row);
    ``width=None`` for a 1-D input."""

    width: Optional[int]
    high: Optional[int] = None


@dataclass(frozen=True)
class RegionSpec:
    """A region, described: everything the runtime needs to build its tiled callable."""

    template: nn.Module  # the region's structure, tensors on the meta device, no hooks
    tensor_paths: tuple[str, ...]  # every tensor it reads, relative to the traced block
    module_paths: tuple[str, ...]  # the leaf modules it calls (their modes and types are checked per call)
    module_types: tuple[type, ...]
    inputs: tuple[ProbeInput, ...]  # its activation inputs, row-aligned
    hidden_size: int
    width: int  # the intermediate size (an MLP), the vocabulary (a loss head)
    may_draw_random: bool
    plan: Optional[object]  # the explicit plan its kernel follows (passes.plans), or None: the generic kernel
    label: str
    hypotheses: tuple = ()  # an opaque region's candidate plans, kept only if one reproduces it (expert banks)


MODULE_HOOKS = (  # nn.Module's per-instance hook dicts
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


def extract_region(gm: fx.GraphModule, cand: Candidate) -> tuple[fx.GraphModule, dict[str, str]]:
    """The region as a standalone ``GraphModule`` of its activation inputs (shares ``gm``'s submodules),
    and the name each of ``gm``'s nodes has in it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {node: graph.placeholder(f"x{i}") for i, node in enumerate(cand.inputs)}

    def copy_node(node: fx.Node) -> None:
        """Copy ``node`` after whatever it reads that is not copied yet: besides the inputs and earlier
        region nodes (graph order), only static operands, i.e. parameters and element-wise functions
        of them (``softplus(self.alpha)``), which the matcher checked and which are recomputed inside."""
        for arg in node.all_input_nodes:
            if arg not in env:
                copy_node(arg)
        env[node] = graph.node_copy(node, env.__getitem__)

    for node in cand.nodes:
        copy_node(node)
    graph.output(env[cand.exit])
    return graph_module(gm, graph, "FxtileRegion"), {n.name: copied.name for n, copied in env.items()}


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


_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), tuple, frozenset, torch.dtype, torch.device)


def meta_template(module: nn.Module, tensor_paths: Sequence[str]) -> nn.Module:
    """A copy of ``module`` whose tensors live on the meta device and which carries no hooks, but shares the
    live modules' mutable state.

    Hooks belong to the live modules (DeepSpeed ZeRO-3, FSDP, accelerate offload, user hooks): a
    template copy must never run them per shard. State objects a module's forward updates are the live
    module's own: bitsandbytes' ``Linear8bitLt`` moves its int8 scales from the weight into ``self.state`` on
    its first call, and its ``state_dict`` reads them there; a template with a copy of ``state`` would take
    them off the live weight into the copy, and the live model's checkpoint would lose them. So every
    public attribute holding a mutable object (not a tensor, module or hook table) is shared, not copied.
    """
    memo: dict[int, object] = {}
    for path in tensor_paths:
        value = get_path(module, path)
        memo[id(value)] = torch.empty_like(value, device="meta")
    for sub in module.modules():
        for name, value in vars(sub).items():
            if not name.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module, *_IMMUTABLE)):
                memo[id(value)] = value
    template = copy.deepcopy(module, memo)
    if isinstance(template, fx.GraphModule):
        forget_source_when_freed(template)
    for sub in template.modules():
        for hooks in MODULE_HOOKS:
            getattr(sub, hooks).clear()
    return template


def cut_region(gm: fx.GraphModule, cand: Candidate, label: str) -> RegionSpec:
    """The region of ``cand`` in ``gm``: its template, paths, probe, and the plan its pattern derives."""
    region, names = extract_region(gm, cand)
    module_paths, tensor_paths = region_inputs(region)
    template = meta_template(region, tensor_paths)
    assert isinstance(template, fx.GraphModule)
    return RegionSpec(
        template, tensor_paths, module_paths, tuple(type(region.get_submodule(p)) for p in module_paths),
        cand.found_by.probe(cand), cand.hidden_size, cand.width, cand.may_draw_random,
        cand.found_by.plan(template, cand, names, tensor_paths), label,
    )

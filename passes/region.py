"""Step 3: build a :class:`fxtile.region.Region` from a candidate, once, with everything the op needs.

* the region as a standalone graph of its activation inputs, copied onto the **meta device** (the
  *template*: structure only, no memory, no hooks; the op runs it with ``torch.func.functional_call``
  on the live tensors, so it never holds or goes stale on real weights);
* the paths of every module it calls and every tensor it reads (the op's explicit inputs);
* the explicit-matmul plan (:class:`fxtile.kernels.mlp.LinearMLP`) when the roles the matcher found are
  plain linear layers around a parameter-free, RNG-free element-wise activation.
"""

from __future__ import annotations

import copy
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxtile.kernels.loss import LossPlan
from fxtile.kernels.mlp import LinearMLP, Proj
from fxtile.region import ProbeInput, Region

from .labels import MUL_TARGETS, SPLIT_TARGETS
from .patterns import CAST_TARGETS, Candidate
from .pointwise import is_pointwise, is_random
from .trace import conv1d_type, forget_source_when_freed, get_path, graph_module

__all__ = ["MODULE_HOOKS", "build_region", "extract_region", "meta_template", "region_inputs"]

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


def meta_template(module: nn.Module, tensor_paths: Sequence[str]) -> nn.Module:
    """A copy of ``module`` whose tensors live on the meta device and which carries no hooks.

    Hooks belong to the live modules (DeepSpeed ZeRO-3, FSDP, accelerate offload, user hooks): a
    template copy must never run them per shard.
    """
    memo: dict[int, torch.Tensor] = {}
    for path in tensor_paths:
        value = get_path(module, path)
        memo[id(value)] = torch.empty_like(value, device="meta")
    template = copy.deepcopy(module, memo)
    if isinstance(template, fx.GraphModule):
        forget_source_when_freed(template)
    for sub in template.modules():
        for hooks in MODULE_HOOKS:
            getattr(sub, hooks).clear()
    return template


def build_region(gm: fx.GraphModule, cand: Candidate, label: str) -> Region:
    """The region of ``cand`` in ``gm``, with its template, paths, probe and the plan its kernel follows
    (the explicit-matmul one for a plain MLP, the loss plan for a projection + cross-entropy)."""
    region, names = extract_region(gm, cand)
    module_paths, tensor_paths = region_inputs(region)
    template = meta_template(region, tensor_paths)
    assert isinstance(template, fx.GraphModule)
    loss = cand.pattern == "linear_cross_entropy"
    if loss:
        probe = (ProbeInput(cand.hidden_size), ProbeInput(None, high=cand.intermediate_size))
    else:
        probe = tuple(ProbeInput(cand.hidden_size) for _ in cand.inputs)
    return Region(
        template, tensor_paths, module_paths, tuple(type(region.get_submodule(p)) for p in module_paths),
        probe, cand.hidden_size, cand.intermediate_size, cand.may_draw_random,
        None if loss else fast_plan(template, cand, names, tensor_paths), label,
        loss_plan(template, cand, names, tensor_paths) if loss else None,
    )


def loss_plan(template: fx.GraphModule, cand: Candidate, names: dict[str, str], tensor_paths: Sequence[str]) -> LossPlan:
    """The loss plan: the head as a projection, the steps from the logits to the loss's input as their own
    one-input graph, and the loss's arguments."""
    index = {p: i for i, p in enumerate(tensor_paths)}
    by_name = {n.name: n for n in template.graph.nodes}
    head, loss = (by_name[names[cand.role_nodes[k].name]] for k in ("head", "loss"))
    proj = _proj(template, head, index)
    assert proj is not None and not proj.transposed, "the pattern admits plain nn.Linear / F.linear heads only"
    order = {n: i for i, n in enumerate(template.graph.nodes)}
    ce_input = loss.args[0] if loss.args else loss.kwargs["input"]
    steps = [n for n in template.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
             and n not in (head, loss) and order[head] < order[n] < order[loss] and _feeds(n, ce_input)]
    graph = fx.Graph()
    env = {head: graph.placeholder("z")}
    for node in steps:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[ce_input])
    options = cand.options
    fused = options["label_smoothing"] == 0 and all(
        n.target in CAST_TARGETS or n.op == "call_method" and n.target in ("view", "reshape", "flatten", "size")
        or n.target in (torch.reshape, torch.flatten, getattr) for n in steps)
    return LossPlan(
        proj, graph_module(template, graph, "LossSteps"), fused, options["ignore_index"], options["reduction"],
        float(options["label_smoothing"]), index[options["weight"]] if options["weight"] else None,
        options["flattened"],
    )


def _feeds(node: fx.Node, target: fx.Node) -> bool:
    """``node`` is ``target`` or an input of it (transitively)."""
    stack, seen = [target], set()
    while stack:
        n = stack.pop()
        if n is node:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


# ---------------------------------------------------------------------------------------------
# The explicit-matmul plan, from the roles the matcher found (read on the template, by node name)


def _proj(region: fx.GraphModule, node: fx.Node, index: dict[str, int]) -> Optional[Proj]:
    """A plain projection reading the region's input: ``nn.Linear``, ``Conv1D`` (exact types) or
    ``F.linear`` on parameters."""
    if node.op == "call_module":
        module = region.get_submodule(str(node.target))
        conv1d = conv1d_type()
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            bias = index.get(f"{node.target}.bias") if module.bias is not None else None
            return Proj(index[f"{node.target}.weight"], bias, type(module) is not nn.Linear)
        return None
    if node.op == "call_function" and node.target is F.linear:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or (bias is not None and getattr(bias, "op", None) != "get_attr"):
            return None
        return Proj(index[str(weight.target)], index[str(bias.target)] if bias is not None else None, False)
    return None


def _in_place(region: fx.GraphModule, node: fx.Node) -> bool:
    """An op that overwrites its input (``inplace=True``, ``relu_``): the vjp would need that input."""
    if node.kwargs.get("inplace") or (node.op == "call_method" and str(node.target).endswith("_")):
        return True
    return node.op == "call_module" and bool(getattr(region.get_submodule(str(node.target)), "inplace", False))


def _chain(region: fx.GraphModule, start: fx.Node, end: fx.Node) -> Optional[fx.GraphModule]:
    """The element-wise ops from ``start`` (exclusive) to ``end`` (inclusive) as a one-input graph, if
    they form a parameter-free, RNG-free chain fed by ``start`` alone; else None."""
    nodes, stack = [], [end]
    while stack:
        node = stack.pop()
        if node is start or node in nodes:
            continue
        if not is_pointwise(region, node) or is_random(region, node) or _in_place(region, node):
            return None
        if node.op == "call_module" and any(True for _ in region.get_submodule(str(node.target)).parameters()):
            return None
        if any(a.op in ("get_attr", "placeholder") for a in node.all_input_nodes):
            return None
        nodes.append(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(region.graph.nodes)}
    graph = fx.Graph()
    env = {start: graph.placeholder("g")}
    for node in sorted(nodes, key=order.__getitem__):
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[end])
    return graph_module(region, graph, "Activation")


def _columns(region: fx.GraphModule, fused: fx.Node, part: fx.Node, width: int) -> Optional[slice]:
    """Which output columns of the fused projection ``part`` selects, found by running the split ops
    on ``arange(width)``: exact for chunk, split and slicing alike."""
    path, node = [], part
    while node is not fused:
        splitting = node.target is operator.getitem or node.target in SPLIT_TARGETS
        if not splitting or len(node.all_input_nodes) != 1:
            return None
        path.append(node)
        node = node.all_input_nodes[0]
    env: dict[fx.Node, object] = {fused: torch.arange(width).view(1, width)}
    for node in reversed(path):
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            return None
    cols = env[part]
    if not isinstance(cols, torch.Tensor) or cols.dim() != 2:
        return None
    cols = cols[0]
    lo, n = int(cols[0]), cols.numel()
    return slice(lo, lo + n) if torch.equal(cols, torch.arange(lo, lo + n)) else None


def fast_plan(
    template: fx.GraphModule, cand: Candidate, names: dict[str, str], tensor_paths: Sequence[str]
) -> Optional[LinearMLP]:
    """The explicit-matmul plan of a one-input region whose projections read its input directly and
    whose down projection reads the gate ``*`` (or the activation) directly; else None. ``names``: the
    region's node name for each of the candidate's nodes."""
    index = {p: i for i, p in enumerate(tensor_paths)}
    by_name = {n.name: n for n in template.graph.nodes}
    role = {key: by_name[names[node.name]] for key, node in cand.role_nodes.items()}
    (x,) = [n for n in template.graph.nodes if n.op == "placeholder"]
    projections = {key: _proj(template, role[key], index) for key in ("gate", "up", "gate_up", "fc1", "down", "fc2")
                   if key in role}
    if any(p is None for p in projections.values()):
        return None
    if cand.pattern == "plain":
        if role["fc1"].args[0] is not x:
            return None
        act = _chain(template, role["fc1"], role["fc2"].args[0])
        return LinearMLP("plain", projections["fc1"], None, projections["fc2"], act) if act is not None else None
    mul = role["mul"]
    if role["down"].args[0] is not mul or mul.target not in MUL_TARGETS or len(mul.args) != 2 or mul.kwargs:
        return None
    if cand.pattern == "gated":
        if role["gate"].args[0] is not x or role["up"].args[0] is not x or role["up_operand"] is not role["up"]:
            return None
        act = _chain(template, role["gate"], role["gate_operand"])
        return LinearMLP("gated", projections["gate"], projections["up"], projections["down"], act) if act is not None else None
    fused = role["gate_up"]
    if fused.args[0] is not x or role["up_operand"] is not role["up_part"]:
        return None
    weight = get_path(template, tensor_paths[projections["gate_up"].weight])
    width = int(weight.shape[1] if projections["gate_up"].transposed else weight.shape[0])
    gate_cols = _columns(template, fused, role["gate_part"], width)
    up_cols = _columns(template, fused, role["up_part"], width)
    act = _chain(template, role["gate_part"], role["gate_operand"])  # identity when nothing sits between
    if gate_cols is None or up_cols is None or act is None:
        return None
    halves = sorted([(gate_cols.start, gate_cols.stop), (up_cols.start, up_cols.stop)])
    if not (halves[0][0] == 0 and halves[0][1] == halves[1][0] and halves[1][1] == width):  # disjoint, cover all
        return None
    return LinearMLP("gated_fused", projections["gate_up"], None, projections["down"], act, gate_cols, up_cols)

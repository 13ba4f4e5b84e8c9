"""The explicit computations a region's kernel can follow, derived from what the matcher found: plain data.

Why here, in the graph package: a plan is read off the graph (which node is the gate, which columns of a
fused projection are the up half, which steps lead from the logits to the loss), so the code that reads
the graph derives it; the runtime's kernels (``fxtile.kernels``) only compute from it, and never read a
graph. Every plan names tensors by their index in the region's tensor list (the op's explicit inputs).

* :func:`mlp_plan` - a :class:`LinearMLP`: plain linear layers around a parameter-free, RNG-free
  element-wise activation (the fast path's backward recomputes only the first projections and the
  activation);
* :func:`proj_of` - a :class:`Proj`, also for the loss head's :class:`~.kernel_plans.LossPlan` (:mod:`passes.loss_head`);
* :func:`bank_hypotheses` - :class:`BankPlan` s: a routed expert bank's code is opaque, so its shapes only
  admit *hypotheses*; the runtime keeps the first that reproduces the bank's own forward.

The plan types themselves live in :mod:`.kernel_plans`, a leaf without fx, which the kernels import.
"""

from __future__ import annotations

import operator
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .candidate import Candidate
from .kernel_plans import BankPlan, LinearMLP, Proj
from .labels import MUL_TARGETS, SPLIT_TARGETS, matmul_weight
from .pointwise import is_pointwise, is_random
from .trace import conv1d_type, get_path, graph_module

__all__ = ["bank_hypotheses", "mlp_plan", "proj_of"]


# ---------------------------------------------------------------------------------------------
# The explicit-matmul plan, from the roles the matcher found (read on the template, by node name)


def proj_of(region: fx.GraphModule, node: fx.Node, index: dict[str, int]) -> Optional[Proj]:
    """A plain projection reading the region's input: ``nn.Linear``, ``Conv1D`` (exact types), ``F.linear``
    on parameters, or a matmul with a 2-D parameter (``x @ W.T``)."""
    if node.op == "call_module":
        module = region.get_submodule(str(node.target))
        conv1d = conv1d_type()
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            bias = index.get(f"{node.target}.bias") if module.bias is not None else None
            return Proj(index[f"{node.target}.weight"], bias, type(module) is not nn.Linear)
        return None
    if (found := matmul_weight(region, node)) is not None:  # x @ W.T, or x @ W stored [in, out]
        return Proj(index[str(found[0].target)], None, found[1])
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


def mlp_plan(
    template: fx.GraphModule, cand: Candidate, names: dict[str, str], tensor_paths: Sequence[str]
) -> Optional[LinearMLP]:
    """The explicit-matmul plan of a one-input region whose projections read its input directly and
    whose down projection reads the gate ``*`` (or the activation) directly; else None. ``names``: the
    region's node name for each of the candidate's nodes."""
    index = {p: i for i, p in enumerate(tensor_paths)}
    by_name = {n.name: n for n in template.graph.nodes}
    role = {key: by_name[names[node.name]] for key, node in cand.role_nodes.items()}
    (x,) = [n for n in template.graph.nodes if n.op == "placeholder"]
    projections = {key: proj_of(template, role[key], index) for key in ("gate", "up", "gate_up", "fc1", "down", "fc2")
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


# ---------------------------------------------------------------------------------------------
# Expert banks: hypotheses from the stacked shapes (the runtime keeps the first that reproduces the bank)


def bank_hypotheses(tensors: Sequence[torch.Tensor], hidden: int, num_experts: int,
                    act: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[BankPlan]:
    """Explicit plans a bank with these stacked tensors admits: which 3-D tensor is the first projection,
    stored ``[E, out, in]`` or transposed ``[E, in, out]``, gate and up fused (either half first) or a plain
    first projection; none for a bank with biases or more tensors (another expert MLP than the kernel's)."""
    if len(tensors) != 2 or any(t.dim() != 3 for t in tensors):
        return
    for first, down in ((0, 1), (1, 0)):
        for transposed in (False, True):
            f_in, f_out = (1, 2) if transposed else (2, 1)
            if tensors[first].shape[f_in] != hidden or tensors[down].shape[f_out] != hidden:
                continue
            width, inner = tensors[first].shape[f_out], tensors[down].shape[f_in]
            proj = (Proj(0, None, transposed), Proj(1, None, transposed))
            if width == 2 * inner:
                for gate, up in ((slice(0, inner), slice(inner, width)), (slice(inner, width), slice(0, inner))):
                    yield BankPlan(first, down, num_experts, LinearMLP("gated_fused", proj[0], None, proj[1], act, gate, up))
            if width == inner:
                yield BankPlan(first, down, num_experts, LinearMLP("plain", proj[0], None, proj[1], act))

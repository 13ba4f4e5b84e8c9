"""The exact fast path for MLP regions made of plain linear layers: explicit matmuls, no autograd.

Why: the generic kernel differentiates each shard with ``torch.func.vjp``, which recomputes all three
projections and keeps every intermediate of the shard alive at once. When the projections are plain
linear layers (``nn.Linear``, transformers' ``Conv1D``, ``F.linear``) and the activation is a
parameter-free, RNG-free element-wise chain, the backward needs to recompute only the gate/up
projections and the activation: the down projection's input is rebuilt from them, and every gradient
is one explicit matmul, accumulated into preallocated buffers (in fp32 for low-precision weights)
with in-place ops, so a shard holds about four ``shard x intermediate`` tensors at its peak.

``plan(region, tensor_paths)`` reads a region's graph and returns a :class:`LinearMLP` (indices into
the op's tensor list, the activation as its own small graph) or ``None`` to use the generic kernel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import vjp

from passes.trace import conv1d_type

__all__ = ["LinearMLP", "accumulate", "backward_shard", "forward_shard", "plan"]

_MULS = {operator.mul, torch.mul, "mul"}
_SPLITS = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}


@dataclass(frozen=True)
class Proj:
    """A projection: tensor-list indices of its weight and bias; ``transposed`` for Conv1D's [in, out]."""

    weight: int
    bias: Optional[int]
    transposed: bool


@dataclass(frozen=True)
class LinearMLP:
    kind: str  # "gated" | "gated_fused" | "plain"
    first: Proj  # gate (gated), gate_up (gated_fused) or fc1 (plain)
    up: Optional[Proj]  # gated only
    down: Proj  # down or fc2
    act: Callable[[torch.Tensor], torch.Tensor]
    gate_cols: Optional[slice] = None  # gated_fused: which output columns of `first` are gate / up
    up_cols: Optional[slice] = None


def _proj(region: fx.GraphModule, node: fx.Node, index: dict[str, int]) -> Optional[Proj]:
    if node.op == "call_module":
        module = region.get_submodule(str(node.target))
        conv1d = conv1d_type()
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            bias = f"{node.target}.bias" if module.bias is not None else None
            return Proj(index[f"{node.target}.weight"], index.get(bias) if bias else None, type(module) is not nn.Linear)
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


def _chain(region: fx.GraphModule, start: fx.Node, end: fx.Node) -> Optional[fx.GraphModule]:  # noqa: C901
    """The element-wise ops from ``start`` (exclusive) to ``end`` (inclusive) as a one-input graph, if
    they form a parameter-free, RNG-free chain fed by ``start`` alone; else None."""
    from passes.pointwise import is_pointwise, is_random

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
    return fx.GraphModule(region, graph, "Activation")


def _columns(region: fx.GraphModule, fused: fx.Node, part: fx.Node, width: int) -> Optional[slice]:
    """Which output columns of the fused projection ``part`` selects, found by running the split ops
    on ``arange(width)``: exact for chunk, split and slicing alike."""
    path, node = [], part
    while node is not fused:
        splitting = node.target is operator.getitem or node.target in _SPLITS
        if not splitting or len(node.all_input_nodes) != 1:
            return None
        path.append(node)
        node = node.all_input_nodes[0]
    env: dict[fx.Node, object] = {fused: torch.arange(width).view(1, width)}
    for node in reversed(path):
        fn = node.target if node.op == "call_function" else None
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif fn is not None:
            env[node] = fn(*args, **kwargs)
        else:
            return None
    cols = env[part]
    if not isinstance(cols, torch.Tensor) or cols.dim() != 2:
        return None
    cols = cols[0]
    lo, n = int(cols[0]), cols.numel()
    return slice(lo, lo + n) if torch.equal(cols, torch.arange(lo, lo + n)) else None


def plan(region: fx.GraphModule, tensor_paths: Sequence[str]) -> Optional[LinearMLP]:
    """The fast-path plan for a one-input region, or None when it does not have the plain shape."""
    index = {p: i for i, p in enumerate(tensor_paths)}
    nodes = [n for n in region.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    output = next(n for n in region.graph.nodes if n.op == "output")
    down_node = output.args[0]
    if len(placeholders) != 1 or not isinstance(down_node, fx.Node):
        return None
    x = placeholders[0]
    down = _proj(region, down_node, index)
    projs = [n for n in nodes if _proj(region, n, index) is not None]
    if down is None or down_node.args[0] is x:
        return None
    firsts = [n for n in projs if n is not down_node]
    if any(n.args[0] is not x for n in firsts):
        return None
    body = down_node.args[0]
    is_mul = body.target in _MULS and len(body.args) == 2
    if len(firsts) == 1 and is_mul and all(isinstance(a, fx.Node) for a in body.args):
        fused = _fused(region, tensor_paths, firsts[0], body, down)
        if fused is not None:
            return fused
    if len(firsts) == 2 and is_mul:
        return _gated(region, index, firsts, body, down)
    if len(firsts) == 1:
        act = _chain(region, firsts[0], body)
        if act is None or body is firsts[0]:
            return None
        return LinearMLP("plain", _proj(region, firsts[0], index), None, down, act)
    return None


def _gated(region, index, firsts, mul, down) -> Optional[LinearMLP]:
    a, b = mul.args
    for gate, up in (firsts, firsts[::-1]):
        for gate_side, up_side in ((a, b), (b, a)):
            if up_side is up and gate_side is not gate:
                act = _chain(region, gate, gate_side)
                if act is not None:
                    return LinearMLP("gated", _proj(region, gate, index), _proj(region, up, index), down, act)
    return None


def _gate_part(region: fx.GraphModule, side: fx.Node) -> fx.Node:
    """Walk back from an operand of the gate ``*`` over element-wise ops to the split that feeds it."""
    from passes.pointwise import is_pointwise

    node = side
    while is_pointwise(region, node) and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node


def _fused(region: fx.GraphModule, paths: Sequence[str], fused: fx.Node, mul: fx.Node, down: Proj) -> Optional[LinearMLP]:
    index = {p: i for i, p in enumerate(paths)}
    proj = _proj(region, fused, index)
    owner, _, name = paths[proj.weight].rpartition(".")
    weight = getattr(region.get_submodule(owner), name)
    width = int(weight.shape[1] if proj.transposed else weight.shape[0])
    for gate_side, up_side in (mul.args, mul.args[::-1]):
        if not (isinstance(gate_side, fx.Node) and isinstance(up_side, fx.Node)):
            continue
        gate_part = _gate_part(region, gate_side)
        up_cols, gate_cols = _columns(region, fused, up_side, width), _columns(region, fused, gate_part, width)
        act = _chain(region, gate_part, gate_side)  # identity when no op sits between split and gate
        if up_cols is None or gate_cols is None or act is None:
            continue
        halves = sorted([(gate_cols.start, gate_cols.stop), (up_cols.start, up_cols.stop)])
        if halves[0][0] == 0 and halves[0][1] == halves[1][0] and halves[1][1] == width:  # disjoint, cover all
            return LinearMLP("gated_fused", proj, None, down, act, gate_cols, up_cols)
    return None



# ---------------------------------------------------------------------------------------------
# Kernels (run inside the custom op, autograd off). ``t`` is the op's tensor list.


def _linear(x: torch.Tensor, t: Sequence[torch.Tensor], p: Proj, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    weight = t[p.weight] if p.transposed else t[p.weight].t()
    if p.bias is None:
        return torch.mm(x, weight, out=out) if out is not None else torch.mm(x, weight)
    return torch.addmm(t[p.bias], x, weight, out=out) if out is not None else torch.addmm(t[p.bias], x, weight)


def _input_grad(
    dy: torch.Tensor, t: Sequence[torch.Tensor], p: Proj, out: Optional[torch.Tensor] = None, accumulate: bool = False
) -> torch.Tensor:
    """``dy @ W`` (the gradient w.r.t. the projection's input), optionally into or onto ``out``."""
    weight = t[p.weight].t() if p.transposed else t[p.weight]
    if out is None:
        return torch.mm(dy, weight)
    return out.addmm_(dy, weight) if accumulate else torch.mm(dy, weight, out=out)


def accumulate(sums: dict[int, torch.Tensor], i: int, value: torch.Tensor) -> None:
    """Accumulate a gradient over shards; low-precision ones in fp32 (cast once by the op)."""
    if i not in sums:
        sums[i] = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    else:
        sums[i].add_(value)


def _add_mm(sums: dict[int, torch.Tensor], i: int, a: torch.Tensor, b: torch.Tensor) -> None:
    acc = sums.get(i)
    if acc is None:
        accumulate(sums, i, torch.mm(a, b))
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)  # in place: no weight-sized temporary per shard
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # fp32 accumulation of bf16 products
    else:
        acc.add_(torch.mm(a, b))  # CPU has no mixed-dtype addmm: one low-precision temporary


def _weight_grads(sums, needs, t, p: Proj, x: torch.Tensor, dy: torch.Tensor) -> None:
    """d weight += dy^T x (x^T dy in Conv1D's [in, out] layout); d bias += sum(dy)."""
    if needs[p.weight]:
        _add_mm(sums, p.weight, *((x.t(), dy) if p.transposed else (dy.t(), x)))
    if p.bias is not None and needs[p.bias]:
        accumulate(sums, p.bias, dy.sum(0))


def _branches(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor]):
    """(gate pre-activation, up or None) of one shard."""
    first = _linear(x, t, plan.first)
    if plan.kind == "gated_fused":
        return first[:, plan.gate_cols], first[:, plan.up_cols]
    return first, (_linear(x, t, plan.up) if plan.kind == "gated" else None)


def forward_shard(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """``out[:] = mlp(x)`` for one shard."""
    g, u = _branches(plan, x, t)
    h = plan.act(g)
    if u is not None:
        h = h * u
    _linear(h, t, plan.down, out=out)


def backward_shard(
    plan: LinearMLP, x: torch.Tensor, dy: torch.Tensor, t: Sequence[torch.Tensor], needs: Sequence[bool],
    sums: dict[int, torch.Tensor], grad_x: Optional[torch.Tensor],
) -> None:
    """Accumulate one shard's weight gradients into ``sums`` and write its input gradient to ``grad_x``.

    Recomputes gate/up and the activation only; the order frees each intermediate as soon as it
    is used, so at most about four ``shard x intermediate`` tensors are alive at once.
    """
    g, u = _branches(plan, x, t)
    a, pullback = vjp(plan.act, g)
    h = a * u if u is not None else a
    _weight_grads(sums, needs, t, plan.down, h, dy)
    del h
    dh = _input_grad(dy, t, plan.down)
    du = None
    if u is not None:
        du = dh * a
        dh.mul_(u)  # now d activation
    del a, u
    (dg,) = pullback(dh)
    del dh, pullback, g
    if plan.kind == "gated_fused":
        dg_du = torch.empty((dg.shape[0], dg.shape[1] + du.shape[1]), dtype=dg.dtype, device=dg.device)
        dg_du[:, plan.gate_cols], dg_du[:, plan.up_cols] = dg, du
        dg, du = dg_du, None
    _weight_grads(sums, needs, t, plan.first, x, dg)
    if du is not None:
        _weight_grads(sums, needs, t, plan.up, x, du)
    if grad_x is not None:
        _input_grad(dg, t, plan.first, out=grad_x)
        if du is not None:
            _input_grad(du, t, plan.up, out=grad_x, accumulate=True)

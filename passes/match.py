"""Step 2 of 3: find MLP-shaped subgraphs in a traced block, by shape and never by name.

How (in named steps, like ``torch.fx``'s ``SubgraphMatcher``):

1. **Label.** Every fx node that carries activations gets a kind: ``linear`` (a linear-like leaf or
   ``F.linear``), ``join`` (an element-wise ``*`` of two *different* upstream values, i.e. the gate),
   ``part`` (a slice of the last dim: ``chunk``/``split``/``[..., a:b]``), ``other``; element-wise ops
   that depend on a single upstream value (an activation, however many ops it is made of, plus
   casts, scalings and dropout) are *pointwise* and are folded into the edge they sit on.
2. **Candidates.** networkx ``DiGraphMatcher`` finds monomorphisms of three small pattern graphs in
   that abstract graph: ``gated`` (``down(act(gate(x)) * up(x))``, operands in either order),
   ``gated_fused`` (``gate, up = proj(x).chunk(2, -1)``) and ``plain`` (``fc2(act(fc1(x)))``).
3. **Filters**, each recording why it rejected: the projections must read one input, nothing inside
   may be used outside the region (so one call can replace it, and no cycle can appear once fused:
   the region then has one activation input and one output), the input's rows must be tokens (no
   transpose on the way in), no module inside may hold buffers (a recompute would update them
   twice), and matches must not overlap.

Only token-wise ops can be labelled into a region (see :mod:`passes.pointwise`), which is why tiling
a matched region over its input rows is exact.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from networkx.algorithms.isomorphism import DiGraphMatcher

from .pointwise import is_metadata, is_pointwise, is_random, is_row_norm, static_operand_ok
from .trace import is_linear_like

__all__ = ["Candidate", "Rejection", "find_candidates"]

LINEAR, JOIN, PART, OTHER = "linear", "join", "part", "other"
_POINTWISE, _SPLIT, _STATIC = "pointwise", "split", "static"

_MUL_TARGETS = {operator.mul, torch.mul, "mul", "__mul__", "__rmul__"}
_SPLIT_TARGETS = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}
_TRANSPOSE_TARGETS = {
    torch.transpose, torch.permute, torch.swapaxes, torch.movedim, torch.t,
    "transpose", "permute", "swapaxes", "swapdims", "movedim", "t",
}
# Pointwise ops that are affine or bookkeeping: their presence alone does not make an activation.
_NOT_ACTIVATIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, F.dropout, torch.dropout,
    "mul", "add", "sub", "div", "neg", "float", "half", "bfloat16", "double", "to", "type_as",
    "contiguous", "dropout", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__",
    "__truediv__",
}


@dataclass
class Candidate:
    """An accepted region, with live fx nodes (internal; the public view is ``fxtile.Match``)."""

    pattern: str
    inputs: tuple[fx.Node, ...]  # activation inputs, aligned on their leading (token) dims
    exit: fx.Node
    nodes: list[fx.Node]  # every node the tiled call replaces, in graph order; ``exit`` is last
    roles: dict[str, str]  # role -> submodule (or function) name
    activation: str
    hidden_size: int
    intermediate_size: int
    stochastic: bool


@dataclass(frozen=True)
class Rejection:
    """A pattern instance found and then refused, with the reason in words."""

    nodes: tuple[str, ...]
    reason: str


# ---------------------------------------------------------------------------------------------
# 1. Label


@dataclass
class _Labels:
    kind: dict[fx.Node, str] = field(default_factory=dict)
    origins: dict[fx.Node, frozenset[fx.Node]] = field(default_factory=dict)  # for folded nodes
    order: dict[fx.Node, int] = field(default_factory=dict)  # position in the graph

    def anchors_of(self, node: fx.Node) -> frozenset[fx.Node]:
        """The labelled (non-folded) nodes that ``node``'s value comes from."""
        return self.origins.get(node, frozenset({node}))


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fetch(gm: fx.GraphModule, node: fx.Node) -> object:
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _is_last_dim_split(node: fx.Node) -> bool:
    return node.target in _SPLIT_TARGETS and _arg(node, 2, "dim", 0) == -1


def _is_last_dim_slice(index: object) -> bool:
    """``x[..., a:b]``: the only indexing that keeps every row."""
    return (
        isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
    )


def _label(gm: fx.GraphModule) -> _Labels:
    labels = _Labels()
    flowing: set[fx.Node] = set()
    for i, node in enumerate(gm.graph.nodes):
        labels.order[node] = i
        if node.op == "placeholder":
            flowing.add(node)
            labels.kind[node] = OTHER
            continue
        inputs = [a for a in node.all_input_nodes if a in flowing]
        if node.op in ("get_attr", "output") or not inputs or is_metadata(node):
            labels.kind[node] = _STATIC if node.op != "output" else OTHER
            continue
        flowing.add(node)
        labels.kind[node] = _classify(gm, node, inputs, labels)
    return labels


def _classify(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node], labels: _Labels) -> str:
    if len(inputs) == 1 and node.args and node.args[0] is inputs[0]:
        if node.op == "call_module" and is_linear_like(gm.get_submodule(str(node.target))):
            return LINEAR
        if node.op == "call_function" and node.target is F.linear:
            return LINEAR
        if _is_last_dim_split(node):
            labels.origins[node] = labels.anchors_of(inputs[0])
            return _SPLIT
        if node.target is operator.getitem:
            source = inputs[0]
            if labels.kind.get(source) == _SPLIT and isinstance(node.args[1], int):
                return PART
            if _is_last_dim_slice(node.args[1]):
                return PART
    if not is_pointwise(gm, node):
        return OTHER
    statics = [a for a in node.all_input_nodes if a not in inputs]
    if not all(_static_ok(gm, a) for a in statics):
        return OTHER  # a parameter that broadcasts over tokens, or one computed from the activations
    origins = frozenset().union(*(labels.anchors_of(a) for a in inputs))
    if len(origins) == 1:
        labels.origins[node] = origins
        return _POINTWISE
    if len(origins) == 2 and len(inputs) == 2 and node.target in _MUL_TARGETS:
        return JOIN
    return OTHER


def _static_ok(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A static operand may enter a region: a parameter that broadcasts over features only, a
    tensor's dtype/device, or an element-wise function of those (``softplus(self.alpha)``)."""
    if node.op == "get_attr":
        return static_operand_ok(_fetch(gm, node))
    if is_metadata(node):
        return True
    if node.op == "placeholder" or not is_pointwise(gm, node):
        return False
    return all(_static_ok(gm, a) for a in node.all_input_nodes)


def _folded_between(labels: _Labels, node: fx.Node) -> list[fx.Node]:
    """The folded (pointwise/split) nodes that lead into ``node``'s value, back to the anchors."""
    seen: list[fx.Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n in labels.origins and n not in seen:
            seen.append(n)
            stack.extend(a for a in n.all_input_nodes if labels.kind.get(a) != _STATIC)
    return seen


def _flowing_inputs(labels: _Labels, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if labels.kind.get(a) not in (_STATIC, None)]


def _abstract_graph(labels: _Labels) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node, kind in labels.kind.items():
        if kind in (_STATIC, _POINTWISE, _SPLIT):
            continue
        graph.add_node(node, label=kind)
        for a in _flowing_inputs(labels, node):
            for anchor in labels.anchors_of(a):
                graph.add_edge(anchor, node)
    return graph


# ---------------------------------------------------------------------------------------------
# 2. Candidates


def _pattern(edges: list[tuple[str, str]], labels: dict[str, str | None]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, label in labels.items():
        graph.add_node(name, label=label)
    graph.add_edges_from(edges)
    return graph


PATTERNS: dict[str, nx.DiGraph] = {
    "gated": _pattern(
        [("x", "gate"), ("x", "up"), ("gate", "mul"), ("up", "mul"), ("mul", "down")],
        {"x": None, "gate": LINEAR, "up": LINEAR, "mul": JOIN, "down": LINEAR},
    ),
    "gated_fused": _pattern(
        [("x", "gate_up"), ("gate_up", "a"), ("gate_up", "b"), ("a", "mul"), ("b", "mul"), ("mul", "down")],
        {"x": None, "gate_up": LINEAR, "a": PART, "b": PART, "mul": JOIN, "down": LINEAR},
    ),
    "plain": _pattern(
        [("x", "fc1"), ("fc1", "fc2")],
        {"x": None, "fc1": LINEAR, "fc2": LINEAR},
    ),
}


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["label"] is None or graph_attrs["label"] == pattern_attrs["label"]


def _instances(graph: nx.DiGraph, pattern: nx.DiGraph) -> list[dict[str, fx.Node]]:
    """Each distinct node set once (the gated pattern is symmetric in gate/up)."""
    seen: set[frozenset[fx.Node]] = set()
    found = []
    for mapping in DiGraphMatcher(graph, pattern, node_match=_node_match).subgraph_monomorphisms_iter():
        inverse = {p: g for g, p in mapping.items()}
        key = frozenset(v for k, v in inverse.items() if k != "x")
        if key not in seen:
            seen.add(key)
            found.append(inverse)
    return found


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A nonlinearity: not bookkeeping (casts, scalings, dropout) and not a row norm (a norm between
    two projections, as in MLA's ``q_b(norm(q_a(x)))``, is a low-rank projection, not an MLP)."""
    if is_row_norm(gm, node) or is_metadata(node):
        return False
    if node.op == "call_module":
        from torch import nn

        return not isinstance(gm.get_submodule(str(node.target)), (nn.Dropout, nn.Identity))
    return node.target not in _NOT_ACTIVATIONS and node.target not in _SPLIT_TARGETS and node.target is not operator.getitem


def _describe_activation(gm: fx.GraphModule, labels: _Labels, nodes: list[fx.Node]) -> tuple[str, str | None]:
    """(display name, owning submodule name or None) of the first activation op among ``nodes``."""
    for node in sorted(nodes, key=labels.order.__getitem__):
        if not _is_activation(gm, node):
            continue
        if node.op == "call_module":
            return type(gm.get_submodule(str(node.target))).__name__, str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        if stack:  # traced through an activation module: name it by that module
            owner, owner_type = next(reversed(stack.values()))
            return getattr(owner_type, "__name__", str(owner_type)), owner
        name = getattr(node.target, "__name__", str(node.target))
        if node.kwargs.get("approximate") not in (None, "none"):
            name += f"_{node.kwargs['approximate']}"
        return name, None
    return "none", None


def _projection_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    target = str(weight.target)
    return target.rsplit(".", 1)[0] if "." in target else target


def _dims(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    from .trace import linear_dims

    if node.op == "call_module":
        return linear_dims(gm.get_submodule(str(node.target)))
    weight = _fetch(gm, node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    return int(weight.shape[1]), int(weight.shape[0])


def _build(gm: fx.GraphModule, labels: _Labels, name: str, inst: dict[str, fx.Node]) -> Candidate | Rejection:
    if name == "plain":
        first, last, core = inst["fc1"], inst["fc2"], [inst["fc1"]]
        joins = [last]
    else:
        first = inst["gate"] if name == "gated" else inst["gate_up"]
        last, joins = inst["down"], [inst["mul"], inst["down"]]
        core = [inst[k] for k in ("gate", "up", "gate_up", "a", "b", "mul") if k in inst]
    input_node = first.args[0]
    ids = tuple(n.name for n in (*core, last))
    if name == "gated" and inst["up"].args[0] is not input_node:
        return Rejection(ids, "the two projections read different tensors, so one tiled input cannot feed both")
    if len(_flowing_inputs(labels, last)) != 1:
        return Rejection(ids, f"{last.name} reads more than the MLP's hidden state")
    folded = [n for j in joins for a in _flowing_inputs(labels, j) for n in _folded_between(labels, a)]
    if name == "gated_fused":  # the split node(s) between the fused projection and its halves
        folded += [a for p in (inst["a"], inst["b"]) for a in _flowing_inputs(labels, p) if a is not first]
    region = set(core) | set(folded) | {last}
    region |= {u for n in region for u in n.users if is_metadata(u)}  # x.dtype of an inside value
    nodes = sorted(region, key=labels.order.__getitem__)

    gate_side = {}
    if name != "plain":
        for key in ("gate", "up") if name == "gated" else ("a", "b"):
            side = [n for a in _flowing_inputs(labels, inst["mul"]) if inst[key] in labels.anchors_of(a)
                    for n in _folded_between(labels, a)]
            gate_side[key] = side
    if name == "plain":
        act_nodes = _folded_between(labels, _flowing_inputs(labels, last)[0])
        if not any(_is_activation(gm, n) for n in act_nodes):
            return Rejection(ids, "no activation between the two projections (two linears in a row, not an MLP)")
        roles = {"fc1": _projection_name(gm, first), "fc2": _projection_name(gm, last)}
        hidden, inter = _dims(gm, first)
    else:
        keys = list(gate_side)
        with_act = [k for k in keys if any(_is_activation(gm, n) for n in gate_side[k])]
        gate_key = with_act[0] if len(with_act) == 1 else keys[0]
        act_nodes = gate_side[gate_key]
        if name == "gated":
            up_key = "up" if gate_key == "gate" else "gate"
            roles = {"gate": _projection_name(gm, inst[gate_key]), "up": _projection_name(gm, inst[up_key])}
            hidden, inter = _dims(gm, inst[gate_key])
        else:
            roles = {"gate_up": _projection_name(gm, first)}
            hidden, fused = _dims(gm, first)
            inter = fused // 2
        roles["down"] = _projection_name(gm, last)
    activation, act_owner = _describe_activation(gm, labels, act_nodes)
    if act_owner is not None:
        roles["act"] = act_owner
    return Candidate(
        pattern=name, inputs=(input_node,), exit=last, nodes=nodes, roles=roles, activation=activation,
        hidden_size=hidden, intermediate_size=inter, stochastic=any(is_random(gm, n) for n in nodes),
    )


# ---------------------------------------------------------------------------------------------
# 3. Filters: each returns a reason to reject, or None.


def _not_contained(gm: fx.GraphModule, cand: Candidate) -> str | None:
    inside = set(cand.nodes)
    for node in cand.nodes[:-1]:
        outside = [u.name for u in node.users if u not in inside]
        if outside:
            return f"intermediate {node.name} is also used outside the MLP (by {', '.join(outside)}), so it cannot be recomputed away"
    return None


def _rows_not_tokens(gm: fx.GraphModule, cand: Candidate) -> str | None:
    stack, seen = list(cand.inputs), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target in _TRANSPOSE_TARGETS or (node.target is getattr and node.args[1] in ("T", "mT")):
            return f"its input comes through {node.name} ({node.target if isinstance(node.target, str) else node.target.__name__}), so its rows may not be tokens"
        stack.extend(node.all_input_nodes)
    return None


def _stateful(gm: fx.GraphModule, cand: Candidate) -> str | None:
    for node in cand.nodes:
        if node.op == "call_module" and any(True for _ in gm.get_submodule(str(node.target)).buffers()):
            return f"{node.target} holds buffers, which its forward may update; a recompute would update them again"
    return None


FILTERS = (_not_contained, _rows_not_tokens, _stateful)


def find_candidates(gm: fx.GraphModule) -> tuple[list[Candidate], list[Rejection]]:
    """All non-overlapping MLP regions of ``gm`` (in graph order), and what was refused and why.

    Pure: ``gm`` is not modified.
    """
    labels = _label(gm)
    graph = _abstract_graph(labels)
    accepted: list[Candidate] = []
    rejected: list[Rejection] = []
    for name, pattern in PATTERNS.items():
        for inst in _instances(graph, pattern):
            built = _build(gm, labels, name, inst)
            if isinstance(built, Candidate):
                reason = next((r for f in FILTERS if (r := f(gm, built))), None)
                if reason is None:
                    accepted.append(built)
                    continue
                built = Rejection(tuple(n.name for n in built.nodes), reason)
            rejected.append(built)
    kept: list[Candidate] = []
    claimed: set[fx.Node] = set()
    for cand in sorted(accepted, key=lambda c: (labels.order[c.exit], -len(c.nodes))):
        if claimed.isdisjoint(cand.nodes):
            kept.append(cand)
            claimed.update(cand.nodes)
    return kept, rejected

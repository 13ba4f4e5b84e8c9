"""Step 2b: the shapes fxtile tiles, one object each: its graph, its roles and how to cut its region.

A pattern's ``graph`` is a small networkx graph over the labelled, folded graph of a block (see
:mod:`passes.labels`); ``networkx`` ``DiGraphMatcher`` finds its instances. ``cut`` turns an instance
into a :class:`Candidate` (every node the tiled call replaces, the roles by submodule name, the sizes),
or a :class:`Rejection` that says why not. Only token-wise nodes can be labelled into a region (see
:mod:`passes.pointwise`), which is why tiling a cut region over its input rows is exact.

* ``gated``: ``down(act(gate(x)) * up(x))``, operands of ``*`` in either order;
* ``gated_fused``: ``gate, up = proj(x).chunk(2, -1)`` (or ``split``, or ``[..., a:b]`` slices);
* ``plain``: ``fc2(act(fc1(x)))``;
* ``linear_cross_entropy``: ``cross_entropy(steps(head(h)), y)`` with only row-wise steps between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import networkx as nx
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

import torch
import torch.nn.functional as F
from torch import nn

from .labels import JOIN, LINEAR, PART, POINTWISE, Labels, is_activation, projection_dims, projection_name
from .pointwise import is_metadata, is_random
from .trace import is_linear_like

__all__ = ["CAST_TARGETS", "Candidate", "GATED", "GATED_FUSED", "LINEAR_CROSS_ENTROPY", "LOSS_PATTERNS", "MLP_PATTERNS", "PLAIN", "Pattern",
           "Rejection"]


@dataclass
class Candidate:
    """A region found in a graph, with live fx nodes (internal; the public view is ``fxtile.Match``)."""

    pattern: str
    inputs: tuple[fx.Node, ...]  # activation inputs, aligned on their leading (token) dims
    exit: fx.Node
    nodes: list[fx.Node]  # every node the tiled call replaces, in graph order; ``exit`` is last
    roles: dict[str, str]  # role -> submodule (or function) name
    role_nodes: dict[str, fx.Node]  # role -> node (projections, the gate ``*``, the activation's end)
    activation: str
    hidden_size: int
    intermediate_size: int
    may_draw_random: bool
    escapes: tuple[fx.Node, ...] = field(default_factory=tuple)  # region values also returned by the graph
    rebind: tuple[fx.Node, ...] = field(default_factory=tuple)  # x.device of a region value, read outside
    options: dict = field(default_factory=dict)  # what the op needs beyond the nodes (the loss's arguments)


@dataclass(frozen=True)
class Rejection:
    """A pattern instance found and then refused, with the reason in words."""

    nodes: tuple[str, ...]
    reason: str


def _graph(edges: list[tuple[str, str]], labels: dict[str, str | None]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, kind in labels.items():
        graph.add_node(name, label=kind)
    graph.add_edges_from(edges)
    return graph


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["label"] is None or graph_attrs["label"] == pattern_attrs["label"]


def _describe_activation(gm: fx.GraphModule, labels: Labels, nodes: list[fx.Node]) -> tuple[str, str | None]:
    """(display name, owning submodule name or None) of the first activation op among ``nodes``."""
    for node in sorted(nodes, key=labels.order.__getitem__):
        if not is_activation(gm, node):
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


class Pattern:
    """A shape to tile. Subclasses give ``name``, ``graph`` and :meth:`cut`.

    ``nests``: the pattern may be looked for in a block that already holds tiled blocks (which stay
    opaque there); ``min_projections``: a block with fewer projections cannot hold it.
    """

    name: str
    graph: nx.DiGraph
    nests = False
    min_projections = 2

    def could_hold(self, module: nn.Module) -> bool:
        """A cheap look at the module before it is traced for this pattern."""
        return True

    def instances(self, gm: fx.GraphModule, labels: Labels, abstract: nx.DiGraph) -> Iterator[dict[str, fx.Node]]:
        """Each distinct node set once (the gated pattern is symmetric in gate/up)."""
        seen: set[frozenset[fx.Node]] = set()
        for mapping in DiGraphMatcher(abstract, self.graph, node_match=_node_match).subgraph_monomorphisms_iter():
            inverse = {p: g for g, p in mapping.items()}
            key = frozenset(v for k, v in inverse.items() if k != "x")
            if key not in seen:
                seen.add(key)
                yield inverse

    def cut(self, gm: fx.GraphModule, labels: Labels, inst: dict[str, fx.Node]) -> Candidate | Rejection | None:
        """The region of an instance, why it is refused, or None when this graph is not one to tile it in."""
        raise NotImplementedError

    def _candidate(self, gm, labels, core, last, folded, roles, role_nodes, act_nodes, dims) -> Candidate:
        region = set(core) | set(folded) | {last}
        region |= {i for n in list(region) for i in labels.inner.get(n, [])}  # inside sums of linear maps
        region |= {u for n in list(region) for u in n.users if is_metadata(u)}  # x.dtype of an inside value
        nodes = sorted(region, key=labels.order.__getitem__)
        activation, act_owner = _describe_activation(gm, labels, act_nodes)
        if act_owner is not None:
            roles["act"] = act_owner
        return Candidate(
            pattern=self.name, inputs=(labels.proj_input[core[0]],), exit=last, nodes=nodes, roles=roles,
            role_nodes=role_nodes, activation=activation, hidden_size=dims[0], intermediate_size=dims[1],
            may_draw_random=any(is_random(gm, n) for n in nodes),
        )


class Plain(Pattern):
    name = "plain"
    graph = _graph([("x", "fc1"), ("fc1", "fc2")], {"x": None, "fc1": LINEAR, "fc2": LINEAR})

    def cut(self, gm, labels, inst):
        fc1, fc2 = inst["fc1"], inst["fc2"]
        ids = (fc1.name, fc2.name)
        act_nodes = labels.folded_between(labels.proj_input[fc2])
        if not any(is_activation(gm, n) for n in act_nodes):
            return Rejection(ids, "no activation between the two projections (two linears in a row, not an MLP)")
        roles = {"fc1": projection_name(gm, labels, fc1), "fc2": projection_name(gm, labels, fc2)}
        return self._candidate(gm, labels, [fc1], fc2, act_nodes, roles, {"fc1": fc1, "fc2": fc2}, act_nodes,
                               projection_dims(gm, labels, fc1))


class _Gated(Pattern):
    """Shared by the gated shapes: the gate ``*`` (``mul``) feeds the down projection."""

    def _sides(self, labels: Labels, mul: fx.Node, keys: tuple[str, str], inst) -> dict[str, list[fx.Node]]:
        return {key: [n for a in labels.flowing_inputs(mul) if inst[key] in labels.anchors_of(a)
                      for n in labels.folded_between(a)] for key in keys}

    def _gate_key(self, gm, sides: dict[str, list[fx.Node]]) -> str:
        keys = list(sides)
        with_act = [k for k in keys if any(is_activation(gm, n) for n in sides[k])]
        return with_act[0] if len(with_act) == 1 else keys[0]

    @staticmethod
    def _operand(labels: Labels, mul: fx.Node, source: fx.Node) -> fx.Node:
        return next(a for a in labels.flowing_inputs(mul) if source in labels.anchors_of(a))


class Gated(_Gated):
    name = "gated"
    graph = _graph(
        [("x", "gate"), ("x", "up"), ("gate", "mul"), ("up", "mul"), ("mul", "down")],
        {"x": None, "gate": LINEAR, "up": LINEAR, "mul": JOIN, "down": LINEAR},
    )

    def cut(self, gm, labels, inst):
        mul, down = inst["mul"], inst["down"]
        ids = tuple(inst[k].name for k in ("gate", "up", "mul", "down"))
        if labels.proj_input[inst["up"]] is not labels.proj_input[inst["gate"]]:
            return Rejection(ids, "the two projections read different tensors, so one tiled input cannot feed both")
        sides = self._sides(labels, mul, ("gate", "up"), inst)
        gate_key = self._gate_key(gm, sides)
        up_key = "up" if gate_key == "gate" else "gate"
        gate, up = inst[gate_key], inst[up_key]
        folded = [n for a in labels.flowing_inputs(mul) for n in labels.folded_between(a)]
        folded += labels.folded_between(labels.proj_input[down])
        roles = {"gate": projection_name(gm, labels, gate), "up": projection_name(gm, labels, up),
                 "down": projection_name(gm, labels, down)}
        role_nodes = {"gate": gate, "up": up, "mul": mul, "down": down,
                      "gate_operand": self._operand(labels, mul, gate), "up_operand": self._operand(labels, mul, up)}
        return self._candidate(gm, labels, [gate, up, mul], down, folded, roles, role_nodes, sides[gate_key],
                               projection_dims(gm, labels, gate))


class GatedFused(_Gated):
    name = "gated_fused"
    graph = _graph(
        [("x", "gate_up"), ("gate_up", "a"), ("gate_up", "b"), ("a", "mul"), ("b", "mul"), ("mul", "down")],
        {"x": None, "gate_up": LINEAR, "a": PART, "b": PART, "mul": JOIN, "down": LINEAR},
    )

    def cut(self, gm, labels, inst):
        fused, mul, down = inst["gate_up"], inst["mul"], inst["down"]
        sides = self._sides(labels, mul, ("a", "b"), inst)
        gate_key = self._gate_key(gm, sides)
        up_key = "b" if gate_key == "a" else "a"
        folded = [n for a in labels.flowing_inputs(mul) for n in labels.folded_between(a)]
        folded += labels.folded_between(labels.proj_input[down])
        # the split node(s) between the fused projection and its halves
        folded += [a for p in (inst["a"], inst["b"]) for a in labels.flowing_inputs(p) if a is not fused]
        hidden, both = projection_dims(gm, labels, fused)
        roles = {"gate_up": projection_name(gm, labels, fused), "down": projection_name(gm, labels, down)}
        role_nodes = {"gate_up": fused, "gate_part": inst[gate_key], "up_part": inst[up_key], "mul": mul, "down": down,
                      "gate_operand": self._operand(labels, mul, inst[gate_key]),
                      "up_operand": self._operand(labels, mul, inst[up_key])}
        return self._candidate(gm, labels, [fused, inst["a"], inst["b"], mul], down, folded, roles, role_nodes,
                               sides[gate_key], (hidden, both // 2))


# ---------------------------------------------------------------------------------------------
# The output projection and its cross-entropy


_FLATTEN_METHODS = {"view", "reshape"}
CAST_TARGETS = {"float", "to", "type_as", "contiguous", "half", "bfloat16", "double"}


def _is_row_flatten(node: fx.Node) -> bool:
    """``z.view(-1, V)`` / ``z.reshape(-1, V)`` / ``z.flatten(0, -2)``: rows of every leading dim, in order."""
    if node.op == "call_method" and node.target in _FLATTEN_METHODS:
        return len(node.args) == 3 and node.args[1] == -1 and not node.kwargs
    if node.op == "call_function" and node.target is torch.reshape:
        return len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) and len(node.args[1]) == 2 and node.args[1][0] == -1
    flatten = (node.op == "call_method" and node.target == "flatten") or (node.op == "call_function" and node.target is torch.flatten)
    return flatten and tuple(node.args[1:]) == (0, -2) and not node.kwargs


def _cross_entropy(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, dict] | str | None:
    """(logits input, target, options) of a cross-entropy node, the reason it cannot be tiled, or None
    if ``node`` is no cross-entropy. Options: ignore_index, reduction, label_smoothing, weight (a tensor
    path or None)."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    if node.op == "call_function" and node.target is F.cross_entropy:
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        weight = bound.get("weight")
        if bound.get("size_average") is not None or bound.get("reduce") is not None:
            return "it passes the deprecated size_average/reduce arguments"
        if weight is not None and (not isinstance(weight, fx.Node) or weight.op != "get_attr"):
            return "its class weights are computed in the forward, not a fixed tensor"
        weight = str(weight.target) if weight is not None else None
        options = {"ignore_index": bound.get("ignore_index", -100), "reduction": bound.get("reduction", "mean"),
                   "label_smoothing": bound.get("label_smoothing", 0.0), "weight": weight}
        logits, target = bound.get("input"), bound.get("target")
    elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.CrossEntropyLoss):
        module = gm.get_submodule(str(node.target))
        options = {"ignore_index": module.ignore_index, "reduction": module.reduction,
                   "label_smoothing": module.label_smoothing,
                   "weight": f"{node.target}.weight" if module.weight is not None else None}
        logits, target = (list(node.args) + [node.kwargs.get("input"), node.kwargs.get("target")])[:2]
    else:
        return None
    if options["reduction"] not in ("mean", "sum"):
        return f"reduction={options['reduction']!r} returns per-token losses, not one loss to tile"
    if not isinstance(options["ignore_index"], int) or not isinstance(options["label_smoothing"], (int, float)):
        return "its ignore_index or label_smoothing is computed in the forward"
    if not isinstance(logits, fx.Node) or not isinstance(target, fx.Node):
        return "its input or target is not a tensor of the graph"
    return logits, target, options


class LinearCrossEntropy(Pattern):
    """A projection whose output reaches a cross-entropy with integer targets only through row-wise
    steps: casts (``.float()``), element-wise ops (soft-capping ``tanh(z / c) * c``, scaling) and
    flattening to rows (``view(-1, V)``). The region's inputs are the projection's input and the
    targets; its output is the loss, one number: the op computes it shard by shard and never holds
    more than one shard of logits. Logits the graph also returns are returned as ``None``."""

    name = "linear_cross_entropy"
    graph = _graph([], {})
    nests = True  # the head sits in a model whose blocks are already tiled (they stay opaque)
    min_projections = 1

    def could_hold(self, module: nn.Module) -> bool:
        """The head is the module's own: a linear child (any class holding a matrix: Megatron's parallel
        linears too), a tied embedding it reads, or a raw weight."""
        return any(is_linear_like(c) or isinstance(c, nn.Embedding) or any(p.dim() == 2 for p in c.parameters(recurse=False))
                   for c in module.children()) or any(p.dim() == 2 for p in module.parameters(recurse=False))

    def instances(self, gm, labels, abstract):
        for node in gm.graph.nodes:
            found = _cross_entropy(gm, node)
            if found is not None:
                yield {"loss": node}

    def cut(self, gm, labels, inst):
        loss = inst["loss"]
        found = _cross_entropy(gm, loss)
        if isinstance(found, str):
            return Rejection((loss.name,), f"the cross-entropy {loss.name}: {found}")
        logits, target, options = found
        steps, node = [], logits
        while labels.kind.get(node) != LINEAR:  # back from the loss's input to the projection
            if _is_row_flatten(node) or (labels.kind.get(node) == POINTWISE and len(labels.flowing_inputs(node)) == 1):
                steps.append(node)
                node = node.args[0] if _is_row_flatten(node) else labels.flowing_inputs(node)[0]
                continue
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.op)
            return Rejection((loss.name,), f"{node.name} ({what}) between the logits and the loss {loss.name} is not a "
                                           "row-wise step (casts, element-wise ops and view(-1, V) are)")
        head = node
        ids = (head.name, *(n.name for n in reversed(steps)), loss.name)
        plain = (head.op == "call_module" and type(gm.get_submodule(str(head.target))) is nn.Linear) or (
            head.op == "call_function" and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in head.args[1:]))
        if head in labels.inner or not plain:
            return Rejection(ids, f"the projection {head.name} is not a plain nn.Linear or F.linear (an adapter or a "
                                  "custom layer on the output head), so the loss kernel cannot compute its logits")
        statics = [a.name for n in steps for a in n.all_input_nodes if a.op == "get_attr"]
        if statics:
            return Rejection(ids, f"the steps between the logits and the loss read parameters ({', '.join(statics)})")
        region = {head, loss, *steps}
        metadata = {u for n in region for u in n.users if is_metadata(u)}
        rebind = tuple(m for m in metadata if m.args[1:] == ("device",) and any(u not in region | metadata for u in m.users))
        region |= metadata
        escapes = []
        for n in (head, *steps):
            outside = [u for u in n.users if u not in region]
            if any(u.op != "output" for u in outside):
                used = next(u for u in outside if u.op != "output")
                return Rejection(ids, f"the logits ({n.name}) are also used by {used.name}, not only by the loss and "
                                      "the model's output, so they cannot stay unmaterialized")
            if outside:
                escapes.append(n)
        stack, seen = [target], set()
        while stack:  # the targets must not be computed from the logits (x.device aside)
            n = stack.pop()
            if n in seen or n in rebind:
                continue
            seen.add(n)
            if n in region:
                return Rejection(ids, f"the loss's targets are computed from the logits ({n.name})")
            stack.extend(n.all_input_nodes)
        if escapes and not torch.is_grad_enabled():
            return None  # a call without gradients returns the logits as computed (the key holds the grad mode)
        if not any(_is_row_flatten(n) for n in steps):
            options = {**options, "flattened": False}  # rows only if the logits are already 2-D (checked per call)
        nodes = sorted(region, key=labels.order.__getitem__)
        math = [n for n in steps if not _is_row_flatten(n) and n.target not in CAST_TARGETS]
        activation = _describe_activation(gm, labels, math)[0] if math else "none"
        hidden, vocab = projection_dims(gm, labels, head)
        return Candidate(
            pattern=self.name, inputs=(labels.proj_input[head], target), exit=loss, nodes=nodes,
            roles={"head": projection_name(gm, labels, head)}, role_nodes={"head": head, "loss": loss},
            activation=activation, hidden_size=hidden, intermediate_size=vocab,
            may_draw_random=any(is_random(gm, n) for n in nodes), escapes=tuple(escapes), rebind=rebind,
            options={"flattened": True, **options},
        )


GATED, GATED_FUSED, PLAIN, LINEAR_CROSS_ENTROPY = Gated(), GatedFused(), Plain(), LinearCrossEntropy()
MLP_PATTERNS: tuple[Pattern, ...] = (GATED, GATED_FUSED, PLAIN)
LOSS_PATTERNS: tuple[Pattern, ...] = (LINEAR_CROSS_ENTROPY,)

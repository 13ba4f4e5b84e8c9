"""Step 2a: label the nodes of a traced block by what they do to the activations.

Every fx node that carries activations gets a kind:

* ``linear`` - a projection of one input: a linear-like leaf, ``F.linear``, or a **sum of linear maps of
  one input** (``F.linear(x, W) + lora_b(lora_a(dropout(x))) * s``: torchtune's ``LoRALinear`` and
  hand-written LoRA traced through), which is one projection for tiling: every term is token-wise;
* ``join`` - an element-wise ``*`` of two *different* upstream values (the gate);
* ``part`` - a slice of the last dim (``chunk``/``split``/``[..., a:b]``);
* ``other`` - anything else (it ends a region).

Element-wise ops that depend on a single upstream value (an activation, however many ops it is made
of, casts, scalings, dropout) are *pointwise* and folded into the edge they sit on; so are last-dim
splits. The nodes inside a sum of linear maps are *inner*: they belong to that projection.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .pointwise import is_metadata, is_pointwise, is_row_norm, static_operand_ok
from .trace import get_path, is_linear_like, linear_dims, module_stack

__all__ = ["INNER", "JOIN", "LINEAR", "Labels", "OTHER", "PART", "POINTWISE", "SPLIT", "STATIC", "is_activation",
           "label", "matmul_weight", "projection_dims", "projection_name"]

LINEAR, JOIN, PART, OTHER = "linear", "join", "part", "other"
POINTWISE, SPLIT, STATIC, INNER = "pointwise", "split", "static", "inner"

MUL_TARGETS = {operator.mul, torch.mul, "mul", "__mul__", "__rmul__"}
_ADD_TARGETS = {operator.add, torch.add, "add", "__add__", "__radd__"}
SPLIT_TARGETS = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}
# Pointwise ops that are affine or bookkeeping: their presence alone does not make an activation.
_NOT_ACTIVATIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, F.dropout, torch.dropout,
    "mul", "add", "sub", "div", "neg", "float", "half", "bfloat16", "double", "to", "type_as",
    "contiguous", "dropout", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__",
    "__truediv__",
}


@dataclass
class Labels:
    kind: dict[fx.Node, str] = field(default_factory=dict)
    origins: dict[fx.Node, frozenset[fx.Node]] = field(default_factory=dict)  # for folded nodes
    order: dict[fx.Node, int] = field(default_factory=dict)  # position in the graph
    proj_input: dict[fx.Node, fx.Node] = field(default_factory=dict)  # linear node -> the value it projects
    inner: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # sum of linear maps -> its nodes
    span: dict[fx.Node, tuple[fx.Node, fx.Node]] = field(default_factory=dict)  # sum -> first term's projections

    def anchors_of(self, node: fx.Node) -> frozenset[fx.Node]:
        """The labelled (non-folded) nodes that ``node``'s value comes from."""
        return self.origins.get(node, frozenset({node}))

    def flowing_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The activation values ``node`` reads (a projection reads exactly one)."""
        if node in self.proj_input:
            return [self.proj_input[node]]
        return [a for a in node.all_input_nodes if self.kind.get(a) not in (STATIC, None)]

    def folded_between(self, node: fx.Node) -> list[fx.Node]:
        """The folded (pointwise/split) nodes that lead into ``node``'s value, back to the anchors."""
        seen: list[fx.Node] = []
        stack = [node]
        while stack:
            n = stack.pop()
            if n in self.origins and n not in seen:
                seen.append(n)
                stack.extend(a for a in n.all_input_nodes if self.kind.get(a) != STATIC)
        return seen


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_last_dim_split(node: fx.Node) -> bool:
    return node.target in SPLIT_TARGETS and _arg(node, 2, "dim", 0) == -1


def _is_last_dim_slice(index: object) -> bool:
    """``x[..., a:b]``: the only indexing that keeps every row."""
    return isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A nonlinearity: not bookkeeping (casts, scalings, dropout) and not a row norm (a norm between
    two projections, as in MLA's ``q_b(norm(q_a(x)))``, is a low-rank projection, not an MLP)."""
    if is_row_norm(gm, node) or is_metadata(node):
        return False
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(str(node.target)), (nn.Dropout, nn.Identity))
    return node.target not in _NOT_ACTIVATIONS and node.target not in SPLIT_TARGETS and node.target is not operator.getitem


def label(gm: fx.GraphModule) -> Labels:
    labels = Labels()
    flowing: set[fx.Node] = set()
    for i, node in enumerate(gm.graph.nodes):
        labels.order[node] = i
        if node.op == "placeholder":
            flowing.add(node)
            labels.kind[node] = OTHER
            continue
        inputs = [a for a in node.all_input_nodes if a in flowing]
        if node.op in ("get_attr", "output") or not inputs or is_metadata(node):
            labels.kind[node] = STATIC if node.op != "output" else OTHER
            continue
        flowing.add(node)
        labels.kind[node] = _classify(gm, node, inputs, labels)
    return labels


_MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm", "__matmul__"}


def matmul_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, bool] | None:
    """For ``x @ W.T`` (``torch.matmul(x, W.t())``, ``x.mm(W.transpose(0, 1))``) or ``x @ W`` with ``W`` a 2-D
    parameter: ``(W's get_attr node, stored [in, out])``, a projection written as a matmul (Cut
    Cross-Entropy's reference head); else None."""
    if node.op not in ("call_function", "call_method") or node.target not in _MATMUL_TARGETS:
        return None
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], fx.Node):
        return None
    w, view = node.args[1], False
    if w.op != "get_attr":
        t = w.target
        if (t is getattr and w.args[1:] in (("T",), ("mT",))) or t in ("t", torch.t) and len(w.args) == 1 or (
                t in ("transpose", torch.transpose) and set(w.args[1:]) in ({0, 1}, {-1, -2})):
            w, view = w.args[0], True
        else:
            return None
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    value = get_path(gm, str(w.target))
    return (w, not view) if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def _classify(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node], labels: Labels) -> str:
    if len(inputs) == 1 and node.args and node.args[0] is inputs[0]:
        if (node.op == "call_module" and is_linear_like(gm.get_submodule(str(node.target)))) or (
                node.op == "call_function" and node.target is F.linear) or matmul_weight(gm, node) is not None:
            labels.proj_input[node] = inputs[0]
            return LINEAR
        if _is_last_dim_split(node):
            labels.origins[node] = labels.anchors_of(inputs[0])
            return SPLIT
        if node.target is operator.getitem:
            source = inputs[0]
            if labels.kind.get(source) == SPLIT and isinstance(node.args[1], int):
                return PART
            if _is_last_dim_slice(node.args[1]):
                return PART
    if len(inputs) == 2 and node.target in _ADD_TARGETS and not node.kwargs and _linear_sum(gm, labels, node, inputs):
        return LINEAR
    if not is_pointwise(gm, node):
        return OTHER
    statics = [a for a in node.all_input_nodes if a not in inputs]
    if not all(_static_ok(gm, a) for a in statics):
        return OTHER  # a parameter that broadcasts over tokens, or one computed from the activations
    origins = frozenset().union(*(labels.anchors_of(a) for a in inputs))
    if len(origins) == 1:
        labels.origins[node] = origins
        return POINTWISE
    if len(origins) == 2 and len(inputs) == 2 and node.target in MUL_TARGETS:
        return JOIN
    return OTHER


def _static_ok(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A static operand may enter a region: a parameter that broadcasts over features only, a
    tensor's dtype/device, or an element-wise function of those (``softplus(self.alpha)``)."""
    if node.op == "get_attr":
        return static_operand_ok(get_path(gm, str(node.target)))
    if is_metadata(node):
        return True
    if node.op == "placeholder" or not is_pointwise(gm, node):
        return False
    return all(_static_ok(gm, a) for a in node.all_input_nodes)


def _walk_linear_map(gm: fx.GraphModule, labels: Labels, side: fx.Node) -> list[fx.Node]:
    """From ``side`` back through projections and affine element-wise ops (scalings, casts, dropout):
    the nodes passed, nearest first, ending with the first node that is neither."""
    path, node = [], side
    while True:
        path.append(node)
        kind = labels.kind.get(node)
        if kind == LINEAR:
            node = labels.proj_input[node]
            continue
        if kind == POINTWISE and not is_activation(gm, node) and len(labels.flowing_inputs(node)) == 1:
            node = labels.flowing_inputs(node)[0]
            continue
        return path


def _linear_sum(gm: fx.GraphModule, labels: Labels, node: fx.Node, sides: list[fx.Node]) -> bool:
    """Label ``node = a + b`` a projection if both terms are linear maps of one value: each side is at
    least one projection and affine ops away from the same source, and nothing in between is used
    elsewhere. Records its input and inner nodes."""
    walks = [_walk_linear_map(gm, labels, s) for s in sides]
    common = [n for n in walks[0] if n in walks[1]]
    if not common:
        return False
    source = common[0]  # nearest to the sum: the value both terms project
    terms = [w[: w.index(source)] for w in walks]
    if not all(any(labels.kind[n] == LINEAR for n in t) for t in terms):
        return False
    inner = {n for t in terms for n in t}
    inner |= {i for n in list(inner) for i in labels.inner.get(n, [])}
    if any(u is not node and u not in inner for n in inner for u in n.users):
        return False  # a term is also used on its own: not one projection
    ordered = sorted(inner, key=labels.order.__getitem__)
    projections = [n for n in terms[0] if labels.kind[n] == LINEAR]  # nearest the sum first
    labels.span[node] = (projections[-1], projections[0])
    labels.proj_input[node] = source
    labels.inner[node] = ordered
    for n in ordered:
        labels.kind[n] = INNER
        labels.origins.pop(n, None)
    return True


def _leaf_dims(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    if node.op == "call_module":
        return linear_dims(gm.get_submodule(str(node.target)))
    if (found := matmul_weight(gm, node)) is not None:
        weight = get_path(gm, str(found[0].target))
        return (int(weight.shape[0]), int(weight.shape[1])) if found[1] else (int(weight.shape[1]), int(weight.shape[0]))
    weight = get_path(gm, str(_arg(node, 1, "weight", None).target))
    return int(weight.shape[1]), int(weight.shape[0])


def projection_dims(gm: fx.GraphModule, labels: Labels, node: fx.Node) -> tuple[int, int]:
    """``(in, out)`` of a projection node; a sum of linear maps has its first term's widths."""
    if node in labels.span:
        near_source, near_sum = labels.span[node]
        return projection_dims(gm, labels, near_source)[0], projection_dims(gm, labels, near_sum)[1]
    return _leaf_dims(gm, node)


def projection_name(gm: fx.GraphModule, labels: Labels, node: fx.Node) -> str:
    """The submodule (or weight owner) a projection belongs to: for a sum of linear maps, the
    innermost module holding all its terms, else its first projection's name."""
    if node in labels.inner:
        stacks = [module_stack(n) for n in [*labels.inner[node], node]]
        common = [p for p in stacks[0] if all(p in s for s in stacks[1:])]
        if common:
            return common[-1]
        node = labels.span[node][0]
        return projection_name(gm, labels, node)
    if node.op == "call_module":
        return str(node.target)
    found = matmul_weight(gm, node)
    target = str(found[0].target) if found is not None else str(_arg(node, 1, "weight", None).target)
    return target.rsplit(".", 1)[0] if "." in target else target

"""The loss head: a projection whose output reaches a cross-entropy with integer targets only through
row-wise steps. One owner for everything about it on the graph side: how it is found (its pattern), where
it may be looked for (a block that already holds tiled blocks: it *nests*), the plan its kernel follows
(:func:`loss_plan`) and the probe the self-check feeds it.

Why a region: the logits (``tokens x vocab``) and their gradient are the largest activations of a long
sequence; the region's output is the loss itself, one number, so the op can compute it shard by shard
and never hold more than one shard of logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .candidate import Candidate, Rejection
from .cut import ProbeInput
from .labels import LINEAR, POINTWISE, matmul_weight, projection_dims, projection_name
from .patterns import Pattern, describe_activation, pattern_graph
from .kernel_plans import LossPlan
from .plans import proj_of
from .pointwise import CAST_TARGETS, is_metadata, is_random
from .trace import graph_module, is_linear_like, linear_dims

__all__ = ["LINEAR_CROSS_ENTROPY", "LOSS_PATTERNS", "LinearCrossEntropy", "loss_plan"]


_FLATTEN_METHODS = {"view", "reshape"}


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
    graph = pattern_graph([], {})
    width_name = "vocab_size"  # what the region's width is, in the public record
    priority = 1  # its logits are vocabulary-wide: where an MLP pattern claims the head too, the head wins
    absent = "loss=True found no head and loss to tile; this block could compute one but was not traced"
    nests = True  # the head sits in a model whose blocks are already tiled (they stay opaque)
    min_projections = 1

    def plan(self, template, cand, names, tensor_paths) -> LossPlan:
        return loss_plan(template, cand, names, tensor_paths)

    def probe(self, cand: Candidate) -> tuple[ProbeInput, ...]:
        """Hidden states, and one class index per row below the vocabulary."""
        return ProbeInput(cand.hidden_size), ProbeInput(None, high=cand.width)

    def could_hold(self, module: nn.Module) -> bool:
        """The head is the module's own: a linear child (any class holding a matrix: Megatron's parallel
        linears too), a tied embedding it reads, a raw weight, or a linear layer further below whose output
        width is the vocabulary of an embedding in the same module (BERT's ``cls.predictions.decoder``,
        under a dense + activation + norm transform). Not any linear below: every decoder layer holds some,
        and none computes a loss."""
        if any(is_linear_like(c) or isinstance(c, nn.Embedding) or any(p.dim() == 2 for p in c.parameters(recurse=False))
               for c in module.children()) or any(p.dim() == 2 for p in module.parameters(recurse=False)):
            return True
        vocabularies = {m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)}
        return bool(vocabularies) and any(is_linear_like(m) and linear_dims(m)[1] in vocabularies for m in module.modules())

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
        weights = [*head.args[1:], *head.kwargs.values()]  # F.linear's weight and bias (None: no bias)
        plain = (head.op == "call_module" and type(gm.get_submodule(str(head.target))) is nn.Linear) or (
            head.op == "call_function" and head.target is F.linear and weights[:1] and all(
                a is None or (isinstance(a, fx.Node) and a.op == "get_attr") for a in weights)) or (
            matmul_weight(gm, head) is not None)
        if head in labels.inner or not plain:
            return Rejection(ids, f"the projection {head.name} is not a plain nn.Linear, F.linear or matmul (an adapter or a "
                                  "custom layer on the output head), so the loss kernel cannot compute its logits")
        statics = [a.name for n in steps for a in n.all_input_nodes if a.op == "get_attr"]
        if statics:
            return Rejection(ids, f"the steps between the logits and the loss read parameters ({', '.join(statics)})")
        region = {head, loss, *steps}
        metadata, frontier = set(), set(region)
        while frontier:  # x.shape, then x.shape[-1]: metadata of metadata
            frontier = {u for n in frontier for u in n.users if is_metadata(u) and u not in metadata}
            metadata |= frontier
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
        activation = describe_activation(gm, labels, math)[0] if math else "none"
        hidden, vocab = projection_dims(gm, labels, head)
        return Candidate(
            found_by=self, inputs=(labels.proj_input[head], target), exit=loss, nodes=nodes,
            roles={"head": projection_name(gm, labels, head)}, role_nodes={"head": head, "loss": loss},
            activation=activation, hidden_size=hidden, width=vocab,
            may_draw_random=any(is_random(gm, n) for n in nodes), escapes=tuple(escapes), rebind=rebind,
            options={"flattened": True, **options},
        )



def loss_plan(template: fx.GraphModule, cand: Candidate, names: dict[str, str], tensor_paths: Sequence[str]) -> LossPlan:
    """The loss plan: the head as a projection, the steps from the logits to the loss's input as their own
    one-input graph, and the loss's arguments."""
    index = {p: i for i, p in enumerate(tensor_paths)}
    by_name = {n.name: n for n in template.graph.nodes}
    head, loss = (by_name[names[cand.role_nodes[k].name]] for k in ("head", "loss"))
    proj = proj_of(template, head, index)
    assert proj is not None, "the pattern admits plain nn.Linear, F.linear and matmul heads only"
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



LINEAR_CROSS_ENTROPY = LinearCrossEntropy()
LOSS_PATTERNS: tuple[Pattern, ...] = (LINEAR_CROSS_ENTROPY,)

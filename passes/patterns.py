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

from typing import Iterator, Optional, Sequence

import networkx as nx
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import nn

from .candidate import Candidate, Rejection
from .cut import ProbeInput
from .labels import JOIN, LINEAR, PART, Labels, is_activation, projection_dims, projection_name
from .plans import mlp_plan
from .pointwise import is_metadata, is_random

__all__ = ["GATED", "GATED_FUSED", "MLP_PATTERNS", "PLAIN", "Pattern", "describe_activation", "pattern_graph"]


def pattern_graph(edges: list[tuple[str, str]], labels: dict[str, str | None]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, kind in labels.items():
        graph.add_node(name, label=kind)
    graph.add_edges_from(edges)
    return graph


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["label"] is None or graph_attrs["label"] == pattern_attrs["label"]


def describe_activation(gm: fx.GraphModule, labels: Labels, nodes: list[fx.Node]) -> tuple[str, str | None]:
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
    width_name = "intermediate_size"  # what the region's width is, in the public record
    priority = 0  # where two regions claim the same nodes, the higher priority wins (the one that saves more)
    absent = ""  # a nesting pattern's report when no block holding it could be traced: what was not found
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

    def plan(self, template: fx.GraphModule, cand: Candidate, names: dict[str, str],
             tensor_paths: Sequence[str]) -> Optional[object]:
        """The explicit plan the region's kernel follows (None: the generic kernel); ``names`` maps the
        candidate's node names to the template's."""
        return mlp_plan(template, cand, names, tensor_paths)

    def probe(self, cand: Candidate) -> tuple[ProbeInput, ...]:
        """How the self-check fabricates the region's inputs: one row of hidden states per token."""
        return tuple(ProbeInput(cand.hidden_size) for _ in cand.inputs)

    def _candidate(self, gm, labels, core, last, folded, roles, role_nodes, act_nodes, dims) -> Candidate:
        region = set(core) | set(folded) | {last}
        region |= {i for n in list(region) for i in labels.inner.get(n, [])}  # inside sums of linear maps
        region |= {u for n in list(region) for u in n.users if is_metadata(u)}  # x.dtype of an inside value
        nodes = sorted(region, key=labels.order.__getitem__)
        activation, act_owner = describe_activation(gm, labels, act_nodes)
        if act_owner is not None:
            roles["act"] = act_owner
        return Candidate(
            found_by=self, inputs=(labels.proj_input[core[0]],), exit=last, nodes=nodes, roles=roles,
            role_nodes=role_nodes, activation=activation, hidden_size=dims[0], width=dims[1],
            may_draw_random=any(is_random(gm, n) for n in nodes),
        )


class Plain(Pattern):
    name = "plain"
    graph = pattern_graph([("x", "fc1"), ("fc1", "fc2")], {"x": None, "fc1": LINEAR, "fc2": LINEAR})

    def cut(self, gm, labels, inst):
        fc1, fc2 = inst["fc1"], inst["fc2"]
        ids = (fc1.name, fc2.name)
        act_nodes = labels.folded_between(labels.proj_input[fc2])
        if not any(is_activation(gm, n) for n in act_nodes):
            return Rejection(ids, "no activation between the two projections (two linears in a row, not an MLP)")
        (_, inner), (_, out) = projection_dims(gm, labels, fc1), projection_dims(gm, labels, fc2)
        if out > inner:  # BERT's head transform then decoder: H -> H -> vocabulary
            return Rejection(ids, f"its second projection widens ({inner} -> {out}) instead of contracting back: "
                                  "a projection after a transform (an output head), not an MLP")
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
    graph = pattern_graph(
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
    graph = pattern_graph(
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


GATED, GATED_FUSED, PLAIN = Gated(), GatedFused(), Plain()
MLP_PATTERNS: tuple[Pattern, ...] = (GATED, GATED_FUSED, PLAIN)

"""Plan time: the block kinds, how each one traces a module and what it finds there.

The walk in :mod:`fxtile.api` offers each module to the kinds in :data:`KINDS`, in order. A kind answers
with a :class:`Planned` block, with the refusals it owns (a list of :class:`~fxtile.Skipped`, possibly
empty), or :class:`Declined` ("not mine", with why: the next kind is tried). A planned block is built
later (:meth:`Planned.build`, :mod:`fxtile.build`), once the walk is over, and installed only when
every block built (the API's all-or-nothing rule).

* :class:`ExpertBank` - a routed expert bank (stacked 3-D weights), tiled as one opaque call;
* :class:`TracedBlock` - the block's ``forward`` traces as one graph (an MLP module, a residual block);
* :class:`PerCallBlock` - the forward does not trace as such (a BART/OPT decoder layer with its MLP
  inline, a causal LM's head and loss): it is traced per call signature, untraceable parts as leaves;
* :class:`MethodBlock` - the forward does not trace even per call, but a method it calls holds the MLP
  (``nn.TransformerEncoderLayer._ff_block``): that method is traced per call and replaced.

What a kind looks for is the walk's choice of patterns (:class:`Context`): the MLP patterns, and the loss
head (``fxtile.passes.loss_head``) where ``loss=True``; a pattern that *nests* is looked for in a block
that already holds tiled blocks too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from .build import Built, Verdicts, bank_record, build_bank, record, signed, tile_graph
from .state import TileState
from .passes.candidate import Rejection
from .passes.experts import ExpertsMatch, looks_like_experts, match_experts
from .passes.match import Found, Untraced, match_block
from .passes.patterns import Pattern
from .passes.specialize import ROOT, Binder, CallSpec, bound_signature, default_spec, output_structures, probe_specs, trace_call
from .passes.trace import trace
from .percall import Entry, PerCall, per_call_forward
from .policy import ShardPolicy
from .records import Match, Skipped, Why

__all__ = ["KINDS", "BlockKind", "Context", "Declined", "Planned"]


@dataclass(frozen=True)
class Declined:
    """Not this kind's block (why, for the report if no kind takes it); ``refused``: a region was found
    in its graph and refused (worth reporting even where only a nesting pattern was looked for)."""

    reason: str
    refused: bool = False
    pattern: Optional[str] = None


@dataclass(frozen=True)
class Context:
    """What the walk tells a kind about the module it offers."""

    path: str
    leaves: frozenset  # modules to keep opaque: excluded by filter_fn, or already holding a region
    patterns: tuple[Pattern, ...]
    looks_like_mlp: bool  # worth tracing per call (an expanding and a contracting projection)


@dataclass
class Planned:
    """A block a kind will tile: what ``find`` reports, and what ``build`` needs."""

    kind: "BlockKind"
    path: str
    module: nn.Module
    matches: list[Match]  # untiled, as ``find`` reports them
    payload: object  # the kind's own: a Found (traced block), an ExpertsMatch (bank), a PerCallPlan
    attr: str = "forward"

    def build(self, policy: ShardPolicy, verify: bool, checked: Verdicts) -> Built:
        """``checked``: the self-check verdicts and memory profiles of the whole ``transform``
        (:class:`fxtile.build.Verdicts`)."""
        return self.kind.build(self, policy, verify, checked)


class BlockKind:
    name: str

    def plan(self, module: nn.Module, ctx: Context) -> Union[Planned, list[Skipped], Declined]:
        raise NotImplementedError

    def build(self, planned: Planned, policy: ShardPolicy, verify: bool, checked: Verdicts) -> Built:
        raise NotImplementedError


def refusals(path: str, rejections: list[Rejection]) -> list[Skipped]:
    return [Skipped(path, Why.REFUSED, f"nodes {', '.join(r.nodes)}: {r.reason}", r.pattern) for r in rejections]


def _traced_or_reason(module: nn.Module, leaves: frozenset) -> Union[fx.GraphModule, str]:
    result = trace(module, leaves)
    return result.graph_module if result.graph_module is not None else str(result.reason)


class TracedBlock(BlockKind):
    name = "traced"

    def plan(self, module, ctx):
        result = match_block(lambda leaves: _traced_or_reason(module, leaves), ctx.leaves, ctx.patterns,
                             lambda gm: module, "")
        if isinstance(result, Untraced):
            return Declined(result.reason)
        if not result.candidates:
            return refusals(ctx.path, result.rejections)
        if any(c.escapes for c in result.candidates):  # logits returned beside the loss: calls without grad need them
            return Declined("it returns the logits beside the loss, so it is traced per call (with and without grad)")
        return Planned(self, ctx.path, module, [record(ctx.path, c) for c in result.candidates], result)

    def build(self, planned, policy, verify, checked):
        found: Found = planned.payload
        gm = found.graph_module
        matches, regions, skipped = tile_graph(planned.path, gm, found.candidates, policy, verify, planned.module, checked)
        function = signed(type(gm).forward, type(planned.module).forward)
        state = TileState(self.name, "forward", function, matches, regions, policy) if regions else None
        return Built(state, skipped)


class ExpertBank(BlockKind):
    name = "experts"

    def plan(self, module, ctx):
        if not looks_like_experts(module):
            return Declined("")
        found = match_experts(module)
        if not isinstance(found, ExpertsMatch):
            return [Skipped(ctx.path, Why.REFUSED, f"expert bank: {found}", "routed_experts")]
        return Planned(self, ctx.path, module, [bank_record(ctx.path, found)], found)

    def build(self, planned, policy, verify, checked):
        return build_bank(planned.path, planned.module, planned.payload, policy, verify, checked)


class PerCallBlock(BlockKind):
    name = "per_call"

    def plan(self, module, ctx):
        if not (ctx.looks_like_mlp or any(p.nests for p in ctx.patterns)):
            return Declined("")
        return self.plan_function(module, ctx, "forward", type(module).forward)

    def plan_function(self, module: nn.Module, ctx: Context, attr: str, function: Callable):
        """Plan the default call (required arguments as tensors); for a pattern that nests (a head and its
        loss, which only a call with targets computes), also the calls that pass one more optional argument
        as a tensor. Where no call gives a region and some did not trace, the calls are traced again with
        their opaque submodules returning their real output types (``output_structures``: a MoE causal
        LM's aux loss branches on the type of its decoder's output)."""
        specs = [default_spec(module, function)]
        if any(p.nests for p in ctx.patterns):
            specs += probe_specs(module, function)
        specs = [s[0] for s in specs if s is not None]  # (spec, inputs) pairs: the specs
        if not specs:
            return Declined("its forward takes no required argument")
        structures: dict = {}
        results = self._trace_calls(module, ctx, specs, function, structures)
        failed = next((s for s, r in results if isinstance(r, Untraced)), None)
        if failed is not None and not any(isinstance(r, Found) and r.candidates for _, r in results) \
                and any(p.nests for p in ctx.patterns):
            structures = output_structures(module, failed, function)
            if structures:
                results = self._trace_calls(module, ctx, specs, function, structures)
        traced_ok = [(s, r) for s, r in results if isinstance(r, Found)]
        spec, result = next(((s, r) for s, r in traced_ok if r.candidates), None) or next(
            ((s, r) for s, r in traced_ok if r.rejections), None) or results[0]
        if isinstance(result, Untraced):
            return Declined(result.reason)
        if not result.candidates:
            if result.rejections:
                first = refusals(ctx.path, result.rejections)[0]
                return Declined(f"traced per call: {first.reason}", refused=True, pattern=first.pattern)
            return Declined(f"traced per call, no region in its graph{_why_no_region(result.traced, results)}")
        matches = [record(ctx.path, c, attr, prefix=ROOT) for c in result.candidates]
        return Planned(self, ctx.path, module, matches, PerCallPlan(spec, result, ctx.patterns, structures), attr)

    @staticmethod
    def _trace_calls(module: nn.Module, ctx: Context, specs: list, function: Callable, structures: dict) -> list:
        """Trace the calls in order until one's graph holds a region. The submodules one call finds
        untraceable stay leaves for the next; two calls that fail alike in the block's own code end it
        (the others would fail there too)."""
        results = []
        leaves = ctx.leaves
        with torch.enable_grad():  # planned for a training call
            for spec in specs:
                result = match_block(lambda leaves: trace_call(module, spec, leaves, function, structures), leaves,
                                     ctx.patterns, lambda t: t.root, ROOT)
                results.append((spec, result))
                if isinstance(result, Found):
                    if result.candidates:
                        break  # the first call whose graph holds a region
                    leaves = leaves | result.traced.leaves
                elif len(results) > 1 and results[-2][1] == result:
                    break
        return results

    def build(self, planned, policy, verify, checked):
        module, attr = planned.module, planned.attr
        plan: PerCallPlan = planned.payload
        traced = plan.found.traced
        function = getattr(type(module), attr)
        matches, regions, skipped = tile_graph(planned.path, traced.graph_module, plan.found.candidates, policy, verify,
                                               traced.root, checked, ROOT, attr)
        if not regions:
            return Built(None, skipped)
        per_call = PerCall(planned.path, attr, function, Binder.of(bound_signature(module, function)), traced.leaves,
                           plan.patterns, policy, verify, checked, plan.structures)
        per_call.cache[plan.spec.key] = Entry(traced.graph_module, traced.root, traced.out_spec, regions)
        state = TileState(self.name, attr, signed(per_call_forward, function), matches, regions, policy, per_call, traced.root)
        return Built(state, skipped)


@dataclass(frozen=True)
class PerCallPlan:
    """A :class:`PerCallBlock`'s payload: the call signature whose graph holds the regions, what matching its
    graph found, the patterns looked for, and the output types of opaque submodules the trace used."""

    spec: CallSpec
    found: Found
    patterns: tuple[Pattern, ...]
    structures: dict


def _why_no_region(traced, results) -> str:
    """Why a block traced per call holds no region: projections in opaque leaves, a probe call that failed."""
    opaque = [f"{type(m).__name__} ({name.removeprefix(ROOT + '.')})" for name, m in traced.root.named_modules()
              if m in traced.leaves and any(p.dim() == 2 for p in m.parameters(recurse=False))]
    why = (f": its projections sit in {', '.join(opaque)}, which fxtile does not recognize as linear layers "
           "and whose code does not trace, so they stay opaque") if opaque else ""
    failed = next((r.reason for _, r in results if isinstance(r, Untraced)), None)  # e.g. the call with labels
    return why + (f"; a call with one more argument (as labels would be) did not trace: {failed}" if failed else "")


class MethodBlock(PerCallBlock):
    """A method of the module's class, called by its forward, that holds an MLP: replaced on the instance."""

    name = "method"

    def plan(self, module, ctx):
        if not ctx.looks_like_mlp:
            return Declined("")
        reasons = []
        for attr, function in _methods_forward_calls(module):
            result = self.plan_function(module, ctx, attr, function)
            if isinstance(result, Planned):
                return result
            reasons.append(f"{attr}: {result.reason}")
        return Declined("; ".join(reasons))


def _methods_forward_calls(module: nn.Module):
    """Functions of the module's classes (below ``nn.Module``) whose names the forward's code reads
    (``self._ff_block(x)``): the only methods worth tracing, and never one the forward does not run."""
    forward = inspect.unwrap(type(module).forward)
    names = set(getattr(getattr(forward, "__code__", None), "co_names", ()))
    seen = set()
    for cls in type(module).__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            continue
        for attr, value in vars(cls).items():
            if attr in seen or attr not in names or attr == "forward" or not inspect.isfunction(value):
                continue
            seen.add(attr)
            yield attr, value


KINDS: tuple[BlockKind, ...] = (ExpertBank(), TracedBlock(), PerCallBlock(), MethodBlock())

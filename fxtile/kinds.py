"""Block kinds: how a module is traced, and how its matched regions become a tiled forward.

The walk in :mod:`fxtile.api` offers each module to the kinds in :data:`KINDS`, in order. A kind answers
with a :class:`Planned` block, with the refusals it owns (a list of :class:`Skipped`, possibly empty), or
:class:`Declined` ("not mine", with why: the next kind is tried). A planned block is built later, once
the walk is over, and installed only when every block built (the API's all-or-nothing rule).

* :class:`TracedBlock` - the block's ``forward`` traces as one graph (an MLP module, a residual block);
* :class:`ExpertBank` - a routed expert bank (stacked 3-D weights), tiled as one opaque call;
* :class:`PerCallBlock` - the forward does not trace as such (a BART/OPT decoder layer with its MLP
  inline, a causal LM's head and loss): it is traced per call signature, untraceable parts as leaves;
* :class:`MethodBlock` - the forward does not trace even per call, but a method it calls holds the MLP
  (``nn.TransformerEncoderLayer._ff_block``): that method is traced per call and replaced.

Every kind ends the same way (:func:`tile_graph`): each region is built once, checked numerically
(:mod:`fxtile.verify`), and only the regions that pass are rewritten into the graph.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from fxtile.passes.candidate import Candidate
from fxtile.passes.cut import MODULE_HOOKS, RegionSpec, cut_region
from fxtile.passes.experts import ExpertsMatch, bank_region, experts_forward, looks_like_experts, match_experts, probe_inputs
from fxtile.passes.match import find_candidates
from fxtile.passes.modes import preserved_modes
from fxtile.passes.patterns import Pattern
from fxtile.passes.rewrite import rewrite
from fxtile.passes.specialize import ROOT, Binder, CallSpec, Traced, bound_signature, call_spec, default_spec, probe_specs, trace_call
from fxtile.passes.trace import get_path, module_stack, outside_modules, trace

from . import memory, verify
from .policy import ShardPolicy
from .compare import max_error, tolerance
from .kernels import experts as bank_kernel
from .kernels.shards import shard_bounds
from .region import Region, TiledRegion, tiled as tiled_callable
from .verify import Check, structure_key

__all__ = ["KINDS", "STATE", "Context", "Declined", "Match", "Planned", "Skipped", "TileState"]

STATE = "_fxtile"  # the instance attribute holding a tiled module's TileState


@dataclass(frozen=True)
class Match:
    """One tiled (or tileable) region, as plain values (valid after ``transform`` and ``restore``).

    ``path`` is the qualified name of the module whose forward (or ``method``) holds the region ("" for
    the root), ``roles`` maps gate/up/down/act (gated), gate_up/down/act (fused), fc1/fc2/act (plain) or
    head (linear_cross_entropy, whose ``intermediate_size`` is the vocabulary) to submodule names
    relative to ``path`` (``act`` is absent for functional activations), and ``nodes``
    names the fx nodes the tiled call replaces. ``verified`` is the self-check's verdict (None: not run,
    ``check`` says why) and ``check`` its detail, with the measured error.
    """

    path: str
    pattern: str
    roles: dict[str, str]
    activation: str
    hidden_size: int
    intermediate_size: int
    nodes: tuple[str, ...]
    tiled: bool = False
    shards: Optional[str] = None  # "auto" or a fixed count, when tiled
    method: str = "forward"
    verified: Optional[bool] = None
    check: str = ""
    # about the smallest number of tokens (rows) a call needs to run tiled: below it ``shards="auto"`` runs
    # the region untiled, because one untiled call holds less memory (the tiled backward's weight-gradient
    # workspace outweighs the saving) or the rules ask for one shard; None: never (within 2**26 tokens)
    tiled_from: Optional[int] = None


@dataclass(frozen=True)
class Skipped:
    """A block that looked like it holds an MLP but was left untouched, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Declined:
    """Not this kind's block (why, for the report if no kind takes it); ``refused``: a region was found
    in its graph and refused (worth reporting even where only a loss head was looked for)."""

    reason: str
    refused: bool = False


@dataclass(frozen=True)
class Context:
    """What the walk tells a kind about the module it offers."""

    path: str
    leaves: frozenset  # modules to keep opaque: excluded by filter_fn, or already holding a region
    patterns: tuple[Pattern, ...]
    looks_like_mlp: bool  # worth tracing per call (an expanding and a contracting projection)


@dataclass
class TileState:
    """What fxtile installs on a tiled module (a plain attribute: not in ``state_dict``)."""

    kind: str
    attr: str  # the instance attribute replaced: "forward" or a method name
    function: Callable  # installed as ``types.MethodType(function, module)``
    matches: list[Match]
    regions: list[TiledRegion]  # one per match (for a block traced per call: its default call's graph)
    policy: ShardPolicy
    per_call: Optional["PerCall"] = None
    refused: list[Skipped] = field(default_factory=list)  # regions of this block the self-check refused
    owner: Optional[nn.Module] = None  # what the regions' tensor paths are relative to (default: the module)

    def __deepcopy__(self, memo: dict) -> "TileState":  # deep copies share regions (structure only)
        return TileState(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})

    def __reduce__(self):
        raise TypeError(
            "a model tiled by fxtile cannot be pickled (its regions live in this process); "
            "call fxtile.restore(model) first, or save its state_dict()"
        )


@dataclass
class Planned:
    """A block a kind will tile: what ``find`` reports, and what ``build`` needs."""

    kind: "BlockKind"
    path: str
    module: nn.Module
    matches: list[Match]  # untiled, as ``find`` reports them
    payload: object  # the kind's own: a traced graph and its candidates, an expert match, a per-call trace
    attr: str = "forward"

    def build(self, policy: ShardPolicy, verify: bool, checked: dict) -> Union[TileState, list[Skipped]]:
        """``checked``: self-check verdicts and memory profiles by region structure, shared by every block of
        one ``transform`` (see :func:`tile_graph`)."""
        return self.kind.build(self, policy, verify, checked)


def match_of(path: str, cand: Candidate, method: str = "forward", policy: Optional[ShardPolicy] = None,
             check: Optional[Check] = None, prefix: str = "", tiled: Optional[TiledRegion] = None) -> Match:
    """The public record of a candidate; ``prefix``: the block's path in the traced root (names are
    given relative to the block)."""
    def rel(name: str, sep: str) -> str:
        return name.removeprefix(prefix + sep) if prefix else name

    return Match(
        path=path, pattern=cand.pattern, roles={k: rel(v, ".") for k, v in cand.roles.items()},
        activation=cand.activation, hidden_size=cand.hidden_size, intermediate_size=cand.intermediate_size,
        nodes=tuple(rel(n.name, "_") for n in cand.nodes), tiled=policy is not None,
        shards=policy.describe() if policy is not None else None, method=method,
        verified=check.passed if check is not None else None, check=check.detail if check is not None else "",
        tiled_from=tiled.tiled_from() if tiled is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Shared: match a graph (keeping everything outside the regions opaque), tile its regions


def match_graph(
    trace_fn: Callable[[frozenset], Union[fx.GraphModule, Traced, str]], leaves: frozenset, patterns, root_of, prefix: str
):
    """Trace, match, and trace again with every traced-through module that holds no region node as a
    leaf (so its hooks keep running). Returns (traced, candidates, rejections) or a reason string."""
    traced = trace_fn(leaves)
    if isinstance(traced, str):
        return traced
    gm = traced.graph_module if isinstance(traced, Traced) else traced
    candidates, rejections = find_candidates(gm, patterns)
    if not candidates:
        return traced, candidates, rejections
    outside = outside_modules(root_of(traced), gm, [n for c in candidates for n in c.nodes], prefix)
    if outside:
        again = trace_fn(leaves | frozenset(outside))
        if not isinstance(again, str):
            gm2 = again.graph_module if isinstance(again, Traced) else again
            candidates2, rejections2 = find_candidates(gm2, patterns)
            if [(c.pattern, c.roles) for c in candidates2] == [(c.pattern, c.roles) for c in candidates]:
                return again, candidates2, rejections2
    return traced, candidates, rejections


def _warn_about_hooks(path: str, root: nn.Module, gm: fx.GraphModule, cand: Candidate, prefix: str) -> None:
    """Hooks on modules *inside* a tiled region cannot run as before (the region runs as one op over
    shards), so say so instead of dropping them silently."""
    inside = {str(n.target) for n in cand.nodes if n.op == "call_module"}
    inside |= {p for n in cand.nodes for p in module_stack(n) if p != prefix}
    hooked = sorted(p for p in inside if any(getattr(root.get_submodule(p), h) for h in MODULE_HOOKS))
    if hooked:
        def name(p: str) -> str:
            p = p.removeprefix(prefix + ".") if prefix else p
            return f"{path}.{p}" if path else p
        warnings.warn(
            f"fxtile: {', '.join(name(p) for p in hooked)} inside a tiled region has module hooks, which do not run "
            f"while it is tiled; exclude the block with filter_fn=lambda m, fqn: fqn != {path!r} to keep them",
            stacklevel=5,
        )


def _self_check(tiled: TiledRegion, root: nn.Module, run_check: bool, checked: dict) -> Check:
    """The self-check's verdict on ``root``'s live tensors and modes, and the region's memory profile (what
    ``shards="auto"`` decides each call by). ``checked`` holds both by the region's structure
    (:func:`fxtile.verify.structure_key`): a model's identical layers are checked and profiled once."""
    tensors = [get_path(root, p) for p in tiled.tensor_paths]
    modes = tiled.live_modes([get_path(root, p) for p in tiled.module_paths])
    key = structure_key(tiled, tensors, modes)
    if key not in checked:
        check = verify.check_region(tiled, tensors, modes) if run_check else Check(None, None, "not verified (verify=False)")
        found = memory.profile(tiled.region, tensors, modes) if check.passed is not False else "not profiled"
        checked[key] = (check, found)
    check, found = checked[key]
    if isinstance(found, str):
        tiled.region.profile, tiled.region.profile_note = None, found
    else:
        tiled.region.profile, tiled.region.profile_note = found, "profiled"
    return check


def tile_graph(
    path: str, gm: fx.GraphModule, candidates: list[Candidate], policy: ShardPolicy, verify: bool,
    root: nn.Module, checked: dict, prefix: str = "", method: str = "forward",
) -> tuple[list[Match], list[TiledRegion], list[Skipped]]:
    """Build each region once, check and profile it, and rewrite ``gm`` with the regions that pass (in place).

    ``checked``: verdicts and profiles by region structure (:func:`fxtile.verify.structure_key`), shared by
    the blocks of one transform: identical layers are checked once, and a block traced per call that builds
    the same region again for another call signature reuses the verdict it got at transform (before any
    wrapper such as FSDP's swaps its parameters for views mid-forward)."""
    matches, regions, skipped, kept = [], [], [], []
    for i, cand in enumerate(candidates):
        tiled = tiled_callable(cut_region(gm, cand, f"{cand.pattern}_{i}"), policy)
        check = _self_check(tiled, root, verify, checked)
        if check.passed is False:
            skipped.append(Skipped(path, f"{cand.pattern} region {', '.join(n.name for n in cand.nodes)}: {check.detail}"))
            continue
        _warn_about_hooks(path, root, gm, cand, prefix)
        kept.append((cand, tiled))
        matches.append(match_of(path, cand, method, policy, check, prefix, tiled))
        regions.append(tiled)
    if kept:
        rewrite(gm, kept)
    return matches, regions, skipped


# ---------------------------------------------------------------------------------------------
# The kinds


class BlockKind:
    name: str

    def plan(self, module: nn.Module, ctx: Context) -> Union[Planned, list[Skipped], Declined]:
        raise NotImplementedError

    def build(self, planned: Planned, policy: ShardPolicy, verify: bool, checked: dict) -> Union[TileState, list[Skipped]]:
        raise NotImplementedError


def _refusals(path: str, rejections) -> list[Skipped]:
    return [Skipped(path, f"nodes {', '.join(r.nodes)}: {r.reason}") for r in rejections]


def _traced_or_reason(module: nn.Module, leaves: frozenset) -> Union[fx.GraphModule, str]:
    result = trace(module, leaves)
    return result.graph_module if result.graph_module is not None else str(result.reason)


class TracedBlock(BlockKind):
    name = "traced"

    def plan(self, module, ctx):
        result = match_graph(lambda leaves: _traced_or_reason(module, leaves), ctx.leaves, ctx.patterns,
                             lambda gm: module, "")
        if isinstance(result, str):
            return Declined(result)
        gm, candidates, rejections = result
        if not candidates:
            return _refusals(ctx.path, rejections)
        if any(c.escapes for c in candidates):  # logits returned beside the loss: calls without grad need them
            return Declined("it returns the logits beside the loss, so it is traced per call (with and without grad)")
        return Planned(self, ctx.path, module, [match_of(ctx.path, c) for c in candidates], (gm, candidates))

    def build(self, planned, policy, verify, checked):
        gm, candidates = planned.payload
        matches, regions, skipped = tile_graph(planned.path, gm, candidates, policy, verify, planned.module, checked)
        if not regions:
            return skipped
        return TileState(self.name, "forward", type(gm).forward, matches, regions, policy, refused=skipped)


class ExpertBank(BlockKind):
    name = "experts"

    def plan(self, module, ctx):
        if not looks_like_experts(module):
            return Declined("")
        found = match_experts(module)
        if not isinstance(found, ExpertsMatch):
            return [Skipped(ctx.path, f"expert bank: {found}")]
        return Planned(self, ctx.path, module, [bank_match(ctx.path, found)], found)

    def build(self, planned, policy, verify, checked):
        bank: ExpertsMatch = planned.payload
        spec = bank_region(planned.module, bank, "routed_experts_0")
        tiled = TiledRegion(Region(dataclasses.replace(spec, plan=_bank_plan(planned.module, spec, bank))), policy)
        check = _self_check(tiled, planned.module, verify, checked)
        if check.passed is False:
            return [Skipped(planned.path, f"expert bank: {check.detail}")]
        gm = experts_forward(planned.module, bank, tiled)
        match = bank_match(planned.path, bank, policy, check, tiled)
        return TileState(self.name, "forward", type(gm).forward, [match], [tiled], policy)


def _bank_plan(module: nn.Module, spec: RegionSpec, bank: ExpertsMatch):
    """The first of the bank's plan hypotheses whose explicit kernel reproduces the bank's own forward on
    random routed rows in two uneven shards (a forward only, as the row-independence probe; the self-check
    then compares every gradient), or None: the bank keeps the generic kernel."""
    if not spec.hypotheses:
        return None
    tensors = [p.detach() for _, p in module.named_parameters()]
    x, ids, weights = probe_inputs(bank.num_experts, bank.hidden_size, tensors[0])
    act = spec.hypotheses[0].expert.act  # the bank's only child, as the template holds it
    try:
        with preserved_modes(module), torch.no_grad():
            module.eval()
            expected = module(x, ids, weights)
        with preserved_modes(act), torch.no_grad():
            act.train()  # an activation that draws random numbers is no plain activation
            probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(x)
            if not torch.equal(act(probe), act(probe)):
                return None
    except Exception:  # noqa: BLE001 - _probe already refused banks that do not run
        return None
    for plan in spec.hypotheses:
        try:
            with torch.no_grad():
                got = bank_kernel.forward(plan, [x, ids, weights], tensors, 2, shard_bounds)
        except Exception:  # noqa: BLE001 - a hypothesis that misreads the shapes
            continue
        if max_error(expected, got, floor=1e-6) <= tolerance(expected.dtype):
            return plan
    return None


def bank_match(path: str, bank: ExpertsMatch, policy: Optional[ShardPolicy] = None, check: Optional[Check] = None,
               tiled: Optional[TiledRegion] = None) -> Match:
    return Match(
        path=path, pattern="routed_experts", roles={"experts": ", ".join(bank.tensor_names)},
        activation=bank.activation, hidden_size=bank.hidden_size, intermediate_size=bank.intermediate_size,
        nodes=(path.rsplit(".", 1)[-1] or "experts",), tiled=policy is not None,
        shards=policy.describe() if policy is not None else None,
        verified=check.passed if check is not None else None, check=check.detail if check is not None else "",
        tiled_from=tiled.tiled_from() if tiled is not None else None,
    )


# --- traced per call ---------------------------------------------------------------------------

_CACHE_SIZE = 32  # call signatures remembered per block (least recently used first out)


class _SpecCache(OrderedDict):
    """Call key -> (graph, output spec) or the reason it runs untiled. Not copied by deepcopy: a copy
    traces again on its first calls, so no graph of the copy points at the original's modules."""

    def __deepcopy__(self, memo: dict) -> "_SpecCache":
        return _SpecCache()


@dataclass
class _Entry:
    """One call signature's tiled graph. It runs as ``graph_module``'s code on ``root`` (the wrapper that
    holds the live block), never on the graph module's own attributes: those are the tensors seen at
    trace time, and FSDP swaps a module's parameters for unsharded views on every forward."""

    graph_module: fx.GraphModule
    root: nn.Module
    out_spec: pytree.TreeSpec
    regions: list[TiledRegion]

    def __call__(self, inputs: list):
        return pytree.tree_unflatten(type(self.graph_module).forward(self.root, *inputs), self.out_spec)


@dataclass(frozen=True)
class _Untiled:
    """A call signature that runs the class's own code: why, and whether to say so (a causal LM called
    without labels, or without gradients, computes no loss to tile: nothing to say)."""

    reason: str
    warn: bool = True


@dataclass
class PerCall:
    """A block traced per call signature: what each call needs to find (or build) its graph."""

    path: str
    attr: str
    original: Callable  # the class's function for ``attr``
    binder: Binder
    leaves: frozenset
    patterns: tuple
    policy: ShardPolicy
    verify: bool
    checked: dict = field(default_factory=dict)  # self-check verdicts and profiles by structure (see tile_graph)
    cache: _SpecCache = field(default_factory=_SpecCache)
    untiled_calls: int = 0
    warned: bool = False

    def entry(self, module: nn.Module, spec: CallSpec) -> Union[_Entry, _Untiled]:
        found = self.cache.get(spec.key)
        if found is None and torch.compiler.is_compiling():
            raise RuntimeError(
                f"fxtile: {self.path or '(root)'} is traced per call signature and meets a new one inside torch.compile, "
                "which cannot trace it; run one step eagerly before compiling (each call signature is traced once)"
            )
        if found is None:
            found = self._build(module, spec)
            self.cache[spec.key] = found
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(spec.key)
        return found

    def _build(self, module: nn.Module, spec: CallSpec) -> Union[_Entry, _Untiled]:
        result = match_graph(lambda leaves: trace_call(module, spec, leaves, self.original), self.leaves,
                             self.patterns, lambda t: t.root, ROOT)
        if isinstance(result, str):
            return _Untiled(result)
        traced, candidates, rejections = result
        if not candidates:
            expected = not rejections and all(p.nests for p in self.patterns)  # a head called without a loss
            reason = rejections[0].reason if rejections else "no region in the graph of this call"
            return _Untiled(reason, warn=not expected)
        _, regions, skipped = tile_graph(self.path, traced.graph_module, candidates, self.policy, self.verify,
                                         traced.root, self.checked, ROOT, self.attr)
        if not regions:
            return _Untiled("; ".join(s.reason for s in skipped))
        return _Entry(traced.graph_module, traced.root, traced.out_spec, regions)

    def entries(self) -> list[_Entry]:
        """Every call graph built so far."""
        return [e for e in self.cache.values() if isinstance(e, _Entry)]

    def regions(self) -> list[TiledRegion]:
        return [r for e in self.entries() for r in e.regions]

    def untiled(self, reason: str, warn: bool = True) -> None:
        """Say once per block that a call ran untiled, and why."""
        if not warn:
            return
        self.untiled_calls += 1
        if not self.warned:
            self.warned = True
            warnings.warn(f"fxtile: {self.path or '(root)'} runs untiled for this call: {reason}", stacklevel=4)


def _per_call_forward(self: nn.Module, *args, **kwargs):
    """The installed forward (or method) of a block traced per call: this call's tiled graph, or the
    class's own code with a warning when there is none."""
    per_call: PerCall = self.__dict__[STATE].per_call
    keyed = call_spec(per_call.binder, self, args, kwargs)
    if isinstance(keyed, str):
        per_call.untiled(keyed)
        return per_call.original(self, *args, **kwargs)
    spec, inputs = keyed
    entry = per_call.entry(self, spec)
    if isinstance(entry, _Untiled):
        per_call.untiled(entry.reason, entry.warn)
        return per_call.original(self, *args, **kwargs)
    return entry(inputs)


class PerCallBlock(BlockKind):
    name = "per_call"

    def plan(self, module, ctx):
        if not (ctx.looks_like_mlp or any(p.nests for p in ctx.patterns)):
            return Declined("")
        return self.plan_function(module, ctx, "forward", type(module).forward)

    def plan_function(self, module: nn.Module, ctx: Context, attr: str, function: Callable):
        """Plan the default call (required arguments as tensors); for a head and its loss, which only a call
        with targets computes, also the calls that pass one more optional argument as a tensor."""
        specs = [default_spec(module, function)]
        if any(p.nests for p in ctx.patterns):
            specs += probe_specs(module, function)
        specs = [s for s in specs if s is not None]
        if not specs:
            return Declined("its forward takes no required argument")
        results = []
        leaves = ctx.leaves  # grows with the submodules a call found untraceable: the next call starts with them
        with torch.enable_grad():  # planned for a training call
            for spec, _ in specs:
                results.append((spec, match_graph(lambda leaves: trace_call(module, spec, leaves, function),
                                                  leaves, ctx.patterns, lambda t: t.root, ROOT)))
                if not isinstance(results[-1][1], str):
                    if results[-1][1][1]:
                        break  # the first call whose graph holds a region
                    leaves = leaves | results[-1][1][0].leaves
        traced_ok = [(s, r) for s, r in results if not isinstance(r, str)]
        spec, result = next(((s, r) for s, r in traced_ok if r[1]), None) or next(
            ((s, r) for s, r in traced_ok if r[2]), None) or results[0]
        if isinstance(result, str):
            return Declined(result)
        traced, candidates, rejections = result
        if not candidates:
            if rejections:
                return Declined(f"traced per call: {_refusals(ctx.path, rejections)[0].reason}", refused=True)
            opaque = [f"{type(m).__name__} ({name.removeprefix(ROOT + '.')})" for name, m in traced.root.named_modules()
                      if m in traced.leaves and any(p.dim() == 2 for p in m.parameters(recurse=False))]
            why = (f": its projections sit in {', '.join(opaque)}, which fxtile does not recognize as linear layers "
                   "and whose code does not trace, so they stay opaque") if opaque else ""
            failed = next((r for _, r in results if isinstance(r, str)), None)  # e.g. the call with labels
            why += f"; a call with one more argument (as labels would be) did not trace: {failed}" if failed else ""
            return Declined(f"traced per call, no region in its graph{why}")
        matches = [match_of(ctx.path, c, attr, prefix=ROOT) for c in candidates]
        return Planned(self, ctx.path, module, matches, (spec, traced, ctx.patterns, candidates), attr)

    def build(self, planned, policy, verify, checked):
        module, attr = planned.module, planned.attr
        spec, traced, patterns, candidates = planned.payload
        function = getattr(type(module), attr)
        matches, regions, skipped = tile_graph(planned.path, traced.graph_module, candidates, policy, verify,
                                               traced.root, checked, ROOT, attr)
        if not regions:
            return skipped
        per_call = PerCall(planned.path, attr, function, Binder.of(bound_signature(module, function)), traced.leaves,
                           patterns, policy, verify, checked)
        per_call.cache[spec.key] = _Entry(traced.graph_module, traced.root, traced.out_spec, regions)
        return TileState(self.name, attr, _per_call_forward, matches, regions, policy, per_call, skipped, traced.root)


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

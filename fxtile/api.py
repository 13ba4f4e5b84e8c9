"""Public API: ``find``, ``transform``, ``restore``.

``transform`` walks the module tree innermost-first and traces each block that holds at least two
projections (``passes.trace``) and has no tiled descendant; a block that does not trace is reported,
or traced per call signature (``passes.specialize``); routed expert banks are matched by their
stacked weights (``passes.experts``). In each traced graph the MLP regions are matched by shape (``passes.match``) and replaced by
one tiled call node (``passes.rewrite``). The rewritten forward is bound to the *same* module instance
as an instance attribute. Parameters, buffers, ``state_dict`` keys, hooks and module names stay as
they are, and ``restore`` removes that attribute to bring back the original forward exactly.
"""

from __future__ import annotations

import inspect
import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch.fx as fx
from torch import nn

from passes.experts import ExpertsMatch, experts_forward, looks_like_experts, match_experts
from passes.match import Candidate, find_candidates
from passes.rewrite import MODULE_HOOKS, extract_region, meta_template, region_inputs, rewrite
from passes.specialize import call_spec, default_spec, trace_call
from passes.trace import is_linear_like, linear_dims, trace

from . import distributed
from .op import TiledRegion, register_template
from .policy import ShardPolicy, as_policy

__all__ = ["Match", "Matches", "Skipped", "find", "restore", "transform"]

logger = logging.getLogger(__name__)

_STATE = "_fxtile"  # instance attribute holding a tiled module's state (a plain object: not in state_dict)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Match:
    """One MLP region, as plain values (valid after ``transform`` and ``restore``).

    ``path`` is the qualified name of the module whose forward holds the region ("" for the root),
    ``roles`` maps gate/up/down/act (gated), gate_up/down/act (fused) or fc1/fc2/act (plain) to
    submodule names relative to ``path`` (``act`` is absent for functional activations), and
    ``nodes`` names the fx nodes the tiled call replaces.
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


@dataclass(frozen=True)
class Skipped:
    """A block that looked like it holds an MLP but was left untouched, and why."""

    path: str
    reason: str


class Matches(list):
    """``list[Match]`` with ``.skipped``: the blocks left untouched, each with its reason."""

    def __init__(self, matches: list[Match], skipped: list[Skipped]) -> None:
        super().__init__(matches)
        self.skipped = skipped


@dataclass
class _TileState:
    graph_module: Optional[fx.GraphModule]  # None for a block traced per call (see specialized)
    matches: list[Match]
    policy: ShardPolicy
    forward_fn: Callable  # the rewritten forward (a deepcopy shares it: functions copy by reference)
    experts: bool = False  # a routed expert bank (passes.experts), not an fx-matched region
    specialized: Optional["_Specialized"] = None  # traced per call signature (passes.specialize)


class _SpecCache(dict):
    """Call key -> tiled graph (or None: run the original forward). Not copied by deepcopy: a copy
    re-traces on its first calls, so no graph of the copy points at the original's modules."""

    def __deepcopy__(self, memo: dict) -> "_SpecCache":
        return _SpecCache()


@dataclass
class _Specialized:
    path: str
    signature: inspect.Signature
    cache: _SpecCache = field(default_factory=_SpecCache)


@dataclass
class _Plan:
    owners: list[tuple[str, nn.Module, fx.GraphModule, list[Candidate]]] = field(default_factory=list)
    banks: list[tuple[str, nn.Module, ExpertsMatch]] = field(default_factory=list)
    deferred: list[tuple[str, nn.Module, list[Candidate]]] = field(default_factory=list)
    tiled: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _linear_leaves(module: nn.Module) -> Iterator[nn.Module]:
    if is_linear_like(module):
        yield module
        return
    for child in module.children():
        yield from _linear_leaves(child)


def _projections(module: nn.Module) -> int:
    """Linear-like leaves plus bare 2-D parameters (``F.linear`` on raw weights): what an MLP needs two of.

    A routed expert bank (stacked 3-D weights) counts as two: it holds whole MLPs.
    """
    if is_linear_like(module):
        return 1
    if looks_like_experts(module):
        return 2
    bare = sum(1 for p in module.parameters(recurse=False) if p.dim() == 2)
    return bare + sum(_projections(child) for child in module.children())


def _looks_like_mlp(module: nn.Module) -> bool:
    """An expanding projection (h -> i, i > h) and one contracting back (i or i/2 -> h): worth reporting."""
    dims = [linear_dims(m) for m in _linear_leaves(module)]
    return any(i > h and (i2 in (i, i // 2)) and o2 == h for h, i in dims for i2, o2 in dims)


def _to_match(path: str, cand: Candidate, policy: Optional[ShardPolicy]) -> Match:
    return Match(
        path=path, pattern=cand.pattern, roles=dict(cand.roles),
        activation=cand.activation, hidden_size=cand.hidden_size, intermediate_size=cand.intermediate_size,
        nodes=tuple(n.name for n in cand.nodes), tiled=policy is not None,
        shards=policy.describe() if policy is not None else None,
    )


def _plan(model: nn.Module, filter_fn: Optional[FilterFn]) -> _Plan:
    plan = _Plan()

    def visit(path: str, module: nn.Module) -> bool:
        """Plan ``module`` innermost-first; True if it or a descendant holds a found or tiled MLP.

        Innermost-first makes each match's path the smallest block holding it (``layers.0.mlp``,
        not the whole model), which is what ``filter_fn`` and the report name.
        """
        if isinstance(module.__dict__.get(_STATE), _TileState):
            plan.tiled.append((path, module))
            return True
        if is_linear_like(module) or _projections(module) < 2:
            return False
        if looks_like_experts(module):
            return visit_bank(path, module)
        reported = len(plan.skipped)
        found = False
        for name, child in module.named_children():
            found |= visit(f"{path}.{name}" if path else name, child)
        if found or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return found
        if filter_fn is not None and not filter_fn(module, path):
            return False
        if wrapped(path, module):
            return False
        result = trace(module)
        quiet = len(plan.skipped) > reported  # a descendant already said why: do not repeat it
        if result.graph_module is None and _looks_like_mlp(module):
            candidates = _default_call_candidates(module)
            if candidates:  # traced per call signature, untraceable parts as leaves
                del plan.skipped[reported:]
                plan.deferred.append((path, module, candidates))
                return True
        if result.graph_module is None:
            if not quiet and _looks_like_mlp(module):
                plan.skipped.append(Skipped(path, result.reason or "not traced"))
            return False
        candidates, rejections = find_candidates(result.graph_module)
        if candidates:
            plan.owners.append((path, module, result.graph_module, candidates))
            return True
        if not quiet:
            plan.skipped += [Skipped(path, f"MLP-shaped nodes {', '.join(r.nodes)}: {r.reason}") for r in rejections]
        return False

    def wrapped(path: str, module: nn.Module) -> bool:
        """An instance-level forward (offload hook, user patch) would be bypassed by a tiled one: refuse."""
        if "forward" not in module.__dict__:
            return False
        if _looks_like_mlp(module) or looks_like_experts(module):
            plan.skipped.append(Skipped(path, "has an instance-level forward (a wrapper or hook, e.g. "
                                              "accelerate's offload) that a tiled forward would bypass"))
        return True

    def visit_bank(path: str, module: nn.Module) -> bool:
        if (filter_fn is not None and not filter_fn(module, path)) or wrapped(path, module):
            return False
        found = match_experts(module)
        if isinstance(found, ExpertsMatch):
            plan.banks.append((path, module, found))
            return True
        plan.skipped.append(Skipped(path, f"expert bank: {found}"))
        return False

    visit("", model)
    return plan


def _default_call_candidates(module: nn.Module) -> list[Candidate]:
    """The regions of ``module(x)`` traced with its optional arguments at their defaults."""
    found = default_spec(module)
    if found is None:
        return []
    gm = trace_call(module, found[0])
    if isinstance(gm, str):
        return []
    return find_candidates(gm)[0]


def _specialized_forward(self: nn.Module, *args, **kwargs):
    """Forward of a block traced per call: the tiled graph for this call's key, or the original forward."""
    state: _TileState = self.__dict__[_STATE]
    spec = state.specialized
    assert spec is not None
    original = types.MethodType(type(self).forward, self)
    keyed = call_spec(spec.signature, self.training, args, kwargs)
    if keyed is None:
        return original(*args, **kwargs)
    call, tensors = keyed
    if call.key not in spec.cache:
        spec.cache[call.key] = _build_specialized(self, call, spec.path, state.policy)
    gm = spec.cache[call.key]
    if gm is None:
        return original(*args, **kwargs)
    return gm(*tensors)


def _build_specialized(module: nn.Module, call, path: str, policy: ShardPolicy) -> Optional[fx.GraphModule]:
    gm = trace_call(module, call)
    if isinstance(gm, str):
        logger.info("fxtile: %s runs untiled for this call: %s", path, gm)
        return None
    candidates = find_candidates(gm)[0]
    if not candidates:
        logger.info("fxtile: %s runs untiled for this call: no MLP region in its graph", path)
        return None
    return _tiled_forward(path, gm, candidates, policy)


def _bank_match(path: str, bank: ExpertsMatch, policy: Optional[ShardPolicy]) -> Match:
    return Match(
        path=path, pattern="routed_experts", roles={"experts": ", ".join(bank.tensor_names)},
        activation=bank.activation, hidden_size=bank.hidden_size, intermediate_size=bank.intermediate_size,
        nodes=(path.rsplit(".", 1)[-1] or "experts",), tiled=policy is not None,
        shards=policy.describe() if policy is not None else None,
    )


def _tiled_bank(module: nn.Module, bank: ExpertsMatch, policy: ShardPolicy) -> fx.GraphModule:
    """The bank's own forward, sharded: the op runs a meta copy of the bank on each row range."""
    children = tuple(name for name, _ in module.named_children())  # they carry the train/eval mode
    template_id = register_template(meta_template(module, bank.tensor_names), bank.tensor_names, children)
    target = TiledRegion(
        template_id, children, tuple(type(module.get_submodule(c)) for c in children), bank.tensor_names, policy,
        bank.hidden_size, bank.intermediate_size, False, "routed_experts_0",
    )
    return experts_forward(module, bank, target)


def find(model: nn.Module, *, filter_fn: Optional[FilterFn] = None) -> Matches:
    """Dry run: the MLP regions ``transform`` would tile (or has tiled), without changing ``model``.

    ``filter_fn(module, fqn) -> bool`` is asked before a block is traced (innermost blocks first; a
    block with a matched descendant is not traced itself). The result's ``.skipped`` lists blocks that look like MLPs but were
    not matched, each with the reason.
    """
    _check_args(model, filter_fn)
    plan = _plan(model, filter_fn)
    matches = [m for _, module in plan.tiled for m in getattr(module, _STATE).matches]
    matches += [_to_match(path, c, None) for path, _, _, cands in plan.owners for c in cands]
    matches += [_bank_match(path, bank, None) for path, _, bank in plan.banks]
    matches += [_to_match(path, c, None) for path, _, cands in plan.deferred for c in cands]
    return Matches(matches, plan.skipped)


def _check_args(model: object, filter_fn: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool or None, got {type(filter_fn).__name__}")


def _warn_about_hooks(path: str, region: fx.GraphModule, module_paths: tuple[str, ...]) -> None:
    """Hooks on modules *inside* a tiled region cannot run as before (the region runs as one op over
    shards), so say so instead of dropping them silently."""
    hooked = [p for p in module_paths if any(getattr(region.get_submodule(p), h) for h in MODULE_HOOKS)]
    if hooked:
        names = ", ".join(f"{path}.{p}" if path else p for p in hooked)
        warnings.warn(
            f"fxtile: {names} inside a tiled MLP has module hooks, which do not run while it is tiled; "
            f"exclude the block with filter_fn=lambda m, fqn: fqn != {path!r} to keep them",
            stacklevel=4,
        )


def _tiled_forward(path: str, gm: fx.GraphModule, candidates: list[Candidate], policy: ShardPolicy) -> fx.GraphModule:
    regions = []
    for i, cand in enumerate(candidates):
        region = extract_region(gm, cand)
        module_paths, tensor_paths = region_inputs(region)
        _warn_about_hooks(path, region, module_paths)
        template_id = register_template(meta_template(region, tensor_paths), tensor_paths, module_paths)
        target = TiledRegion(
            template_id, module_paths, tuple(type(region.get_submodule(p)) for p in module_paths), tensor_paths,
            policy, cand.hidden_size, cand.intermediate_size, cand.stochastic, f"{cand.pattern}_mlp_{i}",
        )
        regions.append((cand, target))
    return rewrite(gm, regions).graph_module


def _install(module: nn.Module, state: _TileState) -> None:
    object.__setattr__(module, _STATE, state)
    module.forward = types.MethodType(state.forward_fn, module)
    distributed.mark_zero3_leaf(module)  # ZeRO-3: gather every weight the tiled forward reads (fxtile/distributed.py)


def _check_uninstallable(module: nn.Module) -> None:
    state: _TileState = module.__dict__[_STATE]
    if getattr(module.__dict__.get("forward"), "__func__", None) is not state.forward_fn:
        raise RuntimeError(
            f"fxtile: the forward of {type(module).__name__} was replaced after fxtile.transform; "
            "remove that wrapper first, then call fxtile.restore"
        )


def _uninstall(module: nn.Module) -> None:
    _check_uninstallable(module)  # before any change: a refused restore leaves the tiling intact
    del module.__dict__[_STATE]
    del module.forward
    distributed.unmark_zero3_leaf(module)


def _build(plan: _Plan, policy: ShardPolicy, retiled: list[tuple[nn.Module, _TileState]]):
    """Every rewrite of the plan, built before any is installed; blocks tiled with another policy are
    untiled first (recorded in ``retiled`` so a failure can put them back) and planned again."""
    for path, module in plan.tiled:  # idempotent: same policy keeps the tiling, a new one re-tiles
        state: _TileState = module.__dict__[_STATE]
        if state.policy == policy:
            continue
        _uninstall(module)
        retiled.append((module, state))
        if state.specialized is not None:
            plan.deferred.append((path, module, _default_call_candidates(module)))
        elif state.experts:
            bank = match_experts(module)
            assert isinstance(bank, ExpertsMatch)  # it matched before
            plan.banks.append((path, module, bank))
        else:
            gm = trace(module).graph_module
            assert gm is not None  # it traced before
            plan.owners.append((path, module, gm, find_candidates(gm)[0]))
    built = [(path, module, _tiled_forward(path, gm, cands, policy), cands) for path, module, gm, cands in plan.owners]
    banks = [(path, module, _tiled_bank(module, bank, policy), bank) for path, module, bank in plan.banks]
    return built, banks


def transform(model: nn.Module, shards: object = "auto", *, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Tile every MLP region of ``model`` over tokens, in place; returns the same ``model`` object.

    Why: on long sequences the MLP's ``tokens x intermediate`` activations dominate memory. The tiled
    call runs the MLP on ``shards`` slices of the tokens, keeps none of their intermediates, and
    recomputes one slice at a time in backward. Outputs and gradients equal the untouched model's.

    ``shards`` is ``"auto"`` (see :class:`fxtile.ShardPolicy`), a positive int, or a ``ShardPolicy``.
    Calling ``transform`` again is a no-op with the same ``shards`` and re-tiles with a new one.
    Blocks that cannot be traced or matched are left as they are and listed by ``fxtile.find(model).skipped``.

    Example: a Llama MLP's forward before and after::

        gate_proj = self.gate_proj(x); silu = F.silu(gate_proj); up_proj = self.up_proj(x)
        mul = silu * up_proj; down_proj = self.down_proj(mul); return down_proj
        # after: one node, weights passed explicitly
        fxtile_gated_mlp_0 = fxtile_gated_mlp_0(x, (self.gate_proj, self.up_proj, self.down_proj),
            (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)); return fxtile_gated_mlp_0
    """
    _check_args(model, filter_fn)
    policy = as_policy(shards)
    plan = _plan(model, filter_fn)
    retiled: list[tuple[nn.Module, _TileState]] = []
    try:
        built, banks = _build(plan, policy, retiled)
    except BaseException:  # never half-rewritten: put back the tilings a re-tile had taken off
        for module, state in retiled:
            _install(module, state)
        raise
    for path, module, gm, cands in built:  # install only once every rewrite succeeded
        _install(module, _TileState(gm, [_to_match(path, c, policy) for c in cands], policy, type(gm).forward))
    for path, module, cands in plan.deferred:
        spec = _Specialized(path, inspect.signature(module.forward))
        matches = [_to_match(path, c, policy) for c in cands]
        _install(module, _TileState(None, matches, policy, _specialized_forward, specialized=spec))
    for path, module, gm, bank in banks:
        _install(module, _TileState(gm, [_bank_match(path, bank, policy)], policy, type(gm).forward, experts=True))
    for skip in plan.skipped:
        logger.info("fxtile: not tiling %s: %s", skip.path or type(model).__name__, skip.reason)
    if not built and not banks and not plan.deferred and not plan.tiled:
        warnings.warn(
            f"fxtile.transform found no MLP to tile in {type(model).__name__}; "
            "see fxtile.find(model).skipped for the blocks it looked at and why",
            stacklevel=2,
        )
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``transform`` everywhere in ``model``, in place; returns the same ``model`` object."""
    _check_args(model, None)
    tiled = [m for m in model.modules() if isinstance(m.__dict__.get(_STATE), _TileState)]
    for module in tiled:  # all or nothing
        _check_uninstallable(module)
    for module in tiled:
        _uninstall(module)
    return model

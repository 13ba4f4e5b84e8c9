"""Public API: ``find``, ``transform``, ``restore``.

``transform`` is a short walk over the module tree, innermost first (the shape of torchao's
``_replace_with_custom_fn_if_matches_filter``): each module ``filter_fn`` admits is offered to the block
kinds of :mod:`fxtile.kinds` in order, which plan it (``Planned``), refuse it with reasons (``Skipped``)
or decline it. Every planned block is then built (regions built once, checked numerically) and only
when all are built is anything installed: the rewritten forward is bound to the *same* module instance
as an instance attribute. Parameters, buffers, ``state_dict`` keys, hooks and module names stay as
they are, and ``restore`` removes that attribute to bring back the original forward exactly.
"""

from __future__ import annotations

import logging
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import nn

from fxtile.passes.experts import looks_like_experts
from fxtile.passes.loss_head import LOSS_PATTERNS
from fxtile.passes.patterns import MLP_PATTERNS, Pattern
from fxtile.passes.trace import is_linear_like, linear_dims

from . import distributed
from .kinds import KINDS, STATE, Context, Declined, Match, Planned, Skipped, TileState
from .policy import ShardPolicy, as_policy
from .region import TiledRegion

__all__ = ["Match", "Matches", "Skipped", "find", "restore", "tile_state", "tiled_regions", "transform"]

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]

# Regions the self-check refused at the last transform, by block: what find() reports for them (the
# check itself runs only in transform). Weak: the record goes with the module.
_REFUSED: "weakref.WeakKeyDictionary[nn.Module, list[Skipped]]" = weakref.WeakKeyDictionary()


class Matches(list):
    """``list[Match]`` with ``.skipped``: the blocks left untouched, each with its reason."""

    def __init__(self, matches: list[Match], skipped: list[Skipped]) -> None:
        super().__init__(matches)
        self.skipped = skipped


def tile_state(module: nn.Module) -> Optional[TileState]:
    """What fxtile installed on ``module``, or None (not stable; for ``fxtile.testing``)."""
    state = module.__dict__.get(STATE)
    return state if isinstance(state, TileState) else None



def _dims(module: nn.Module) -> Iterator[tuple[int, int]]:
    """``(in, out)`` of every projection below ``module``: linear-like leaves and bare 2-D weights
    (``F.linear`` on raw parameters, Megatron's parallel linears), read as ``[out, in]``."""
    if is_linear_like(module):
        yield linear_dims(module)
        return
    for p in module.parameters(recurse=False):
        if p.dim() == 2:
            yield int(p.shape[1]), int(p.shape[0])
    for child in module.children():
        yield from _dims(child)


def _projections(module: nn.Module) -> int:
    """Projections below ``module``; a routed expert bank (stacked 3-D weights) counts as two."""
    if is_linear_like(module):
        return 1
    if looks_like_experts(module):
        return 2
    bare = sum(1 for p in module.parameters(recurse=False) if p.dim() == 2)
    return bare + sum(_projections(child) for child in module.children())


def _looks_like_mlp(module: nn.Module) -> bool:
    """An expanding projection (h -> i, i > h) and one contracting back (i or i/2 -> h): worth reporting."""
    dims = list(_dims(module))
    return any(i > h and (i2 in (i, i // 2)) and o2 == h for h, i in dims for i2, o2 in dims)


def _instance_forward(module: nn.Module) -> bool:
    """An instance-level forward (offload hook, user patch) would be bypassed by a tiled one."""
    return "forward" in module.__dict__


@dataclass
class _Walk:
    filter_fn: Optional[FilterFn]
    patterns: tuple[Pattern, ...]
    retile: Optional[ShardPolicy] = None  # transform: tiled blocks with another policy are untiled and planned again
    planned: list[Planned] = field(default_factory=list)
    tiled: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    opaque: list[nn.Module] = field(default_factory=list)  # excluded by filter_fn, or holding a region
    retiled: list[tuple[nn.Module, TileState]] = field(default_factory=list)
    # blocks that could hold a loss head but did not trace: reported only if no head is found at all
    untraced_heads: list[Skipped] = field(default_factory=list)

    def visit(self, path: str, module: nn.Module) -> bool:
        """Plan ``module`` innermost-first; True if it or a descendant holds a region.

        Innermost-first makes each match's path the smallest block holding it (``layers.0.mlp``, not
        the whole model), which is what ``filter_fn`` and the report name.
        """
        state = tile_state(module)
        if state is not None:
            if self.retile is None or state.policy == self.retile:
                self.tiled.append((path, module))
                self.opaque.append(module)
                self.skipped += _REFUSED.get(module, [])
                if not looks_like_experts(module):  # a tiled loss head's model holds tiled blocks too
                    for name, child in module.named_children():
                        self.visit(f"{path}.{name}" if path else name, child)
                return True
            _uninstall(module)  # planned again below with the new policy; put back if anything fails
            self.retiled.append((module, state))
        patterns = self.patterns
        if is_linear_like(module) or _projections(module) < min(p.min_projections for p in patterns):
            return False
        reported = len(self.skipped)
        found = False
        if not looks_like_experts(module):  # a bank's children are its activation
            for name, child in module.named_children():
                found |= self.visit(f"{path}.{name}" if path else name, child)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return found
        if found:  # only patterns that may enclose tiled blocks (the loss head) are looked for here
            patterns = tuple(p for p in patterns if p.nests and p.could_hold(module))
            if not patterns:
                return found
        looks = _looks_like_mlp(module) or looks_like_experts(module)
        quiet = len(self.skipped) > reported  # a descendant already said why: do not repeat it
        if self.filter_fn is not None and not self.filter_fn(module, path):
            self.opaque.append(module)
            if looks and not found and not quiet:
                self.skipped.append(Skipped(path, "excluded by filter_fn"))
            return found
        if _instance_forward(module):
            if looks and not quiet:
                self.skipped.append(Skipped(path, "has an instance-level forward (a wrapper or hook, e.g. "
                                                  "accelerate's offload) that a tiled forward would bypass"))
            return found
        ctx = Context(path, frozenset(self.opaque), patterns, looks)
        declined = []
        for kind in KINDS:
            result = kind.plan(module, ctx)
            if isinstance(result, Planned):
                if not found:  # the block covers what its descendants refused (a nesting loss head does not)
                    del self.skipped[reported:]
                self.opaque.append(module)
                if self.retile is None and module in _REFUSED:  # find(): the last transform's self-check said no
                    self.skipped += _REFUSED[module]
                    return True  # as in transform, its ancestors do not try the same region again
                self.planned.append(result)
                return True
            if isinstance(result, Declined):
                declined.append(result)
                continue
            if not quiet or found:
                self.skipped += result
            return found
        if found:  # a loss head was looked for: report it only if one was found and refused
            reasons = [d.reason for d in declined if d.refused]
        else:
            reasons = [d.reason for d in declined if d.reason] if looks and not quiet else []
        if reasons or (looks and not quiet and not found):
            self.skipped.append(Skipped(path, "; ".join(dict.fromkeys(reasons)) or "not traced"))
        elif any(p.nests and p.could_hold(module) for p in patterns) and any(d.reason for d in declined):
            why = "; ".join(dict.fromkeys(d.reason for d in declined if d.reason))
            self.untraced_heads.append(Skipped(path, f"loss=True found no head and loss to tile; this block could "
                                                     f"compute one but was not traced: {why}"))
        return found

    def report(self, matches: list[Match]) -> list[Skipped]:
        """What was skipped; with the loss looked for and no head found anywhere, also the blocks that
        could hold one but did not trace (a vocabulary-parallel loss, a loss in untraceable code)."""
        heads = [m for m in matches if m.pattern in {p.name for p in LOSS_PATTERNS}]
        loss_refused = any("cross-entropy" in s.reason or "loss" in s.reason for s in self.skipped)
        if heads or loss_refused:
            return self.skipped
        outermost = [s for s in self.untraced_heads  # innermost-first: an enclosing block reports for its parts
                     if not any(o.path == "" or s.path.startswith(o.path + ".") for o in self.untraced_heads if o is not s)]
        return self.skipped + outermost


def _patterns(loss: bool) -> tuple[Pattern, ...]:
    if not isinstance(loss, bool):
        raise TypeError(f"loss must be True or False, got {type(loss).__name__} {loss!r}")
    return MLP_PATTERNS + LOSS_PATTERNS if loss else MLP_PATTERNS


def _check_args(model: object, filter_fn: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool or None, got {type(filter_fn).__name__}")


def find(model: nn.Module, *, filter_fn: Optional[FilterFn] = None, loss: bool = False) -> Matches:
    """Dry run: the regions ``transform`` would tile (or has tiled), without changing ``model``.

    ``filter_fn(module, fqn) -> bool`` is asked before a block is traced (innermost blocks first; a
    block with a matched descendant is not traced itself, except, with ``loss=True``, for a loss head
    among its own children). The result's ``.skipped`` lists blocks that look like MLPs or loss heads
    but were not matched, each with the reason. The self-check runs in ``transform``.
    """
    _check_args(model, filter_fn)
    walk = _Walk(filter_fn, _patterns(loss))
    walk.visit("", model)
    matches = [m for _, module in walk.tiled for m in tile_state(module).matches]
    matches += [m for planned in walk.planned for m in planned.matches]
    return Matches(matches, walk.report(matches))


def _install(module: nn.Module, state: TileState) -> None:
    object.__setattr__(module, STATE, state)
    module.__dict__[state.attr] = types.MethodType(state.function, module)
    if any(r.region.loss is None for r in state.regions):  # not a model's root for its loss head alone:
        distributed.mark_zero3_leaf(module)  # ZeRO-3 gathers every weight the tiled forward reads (fxtile/distributed.py)


def _check_uninstallable(module: nn.Module) -> None:
    state = tile_state(module)
    assert state is not None
    if getattr(module.__dict__.get(state.attr), "__func__", None) is not state.function:
        raise RuntimeError(
            f"fxtile: the {state.attr} of {type(module).__name__} was replaced after fxtile.transform; "
            "remove that wrapper first, then call fxtile.restore"
        )


def _uninstall(module: nn.Module) -> None:
    _check_uninstallable(module)  # before any change: a refused restore leaves the tiling intact
    state = module.__dict__.pop(STATE)
    del module.__dict__[state.attr]
    distributed.unmark_zero3_leaf(module)


def transform(
    model: nn.Module, shards: object = "auto", *, filter_fn: Optional[FilterFn] = None, verify: bool = True,
    loss: bool = False,
) -> nn.Module:
    """Tile every MLP region of ``model`` over tokens, in place; returns the same ``model`` object.

    Why: on long sequences the MLP's ``tokens x intermediate`` activations dominate memory. The tiled
    call runs the MLP on ``shards`` slices of the tokens, keeps none of their intermediates, and
    recomputes one slice at a time in backward. Outputs and gradients equal the untouched model's.

    ``shards`` is ``"auto"`` (see :class:`fxtile.ShardPolicy`), a positive int, or a ``ShardPolicy``.
    Calling ``transform`` again is a no-op with the same ``shards`` and re-tiles with a new one.
    ``filter_fn(module, fqn) -> bool`` is asked about every block that could hold a region (two
    projections for an MLP, one for a loss head; not about the projections themselves): a block it
    refuses is never tiled, neither itself nor as part of an ancestor's graph (there it stays one opaque
    call). ``verify``: check every region numerically before installing it (a region that disagrees is
    left alone and reported). Blocks that cannot be
    traced, matched or verified are left as they are and listed by ``fxtile.find(model).skipped``.

    Example: a Llama MLP's forward before and after (``tests/test_passes.py`` pins the second)::

        gate_proj = self.gate_proj(x);  silu = torch.nn.functional.silu(gate_proj, inplace = False)
        up_proj = self.up_proj(x);  mul = silu * up_proj;  down_proj = self.down_proj(mul);  return down_proj
        # after: one call, the submodules (to check nothing was swapped) and weights passed explicitly
        gated_0 = fxtile_gated_0((x,), (gate_proj_1, up_proj_1, down_proj_1),
                                 (gate_proj_weight, up_proj_weight, down_proj_weight));  return gated_0
    """
    _check_args(model, filter_fn)
    policy = as_policy(shards)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {type(verify).__name__} {verify!r}")
    walk = _Walk(filter_fn, _patterns(loss), retile=policy)
    built: list[tuple[nn.Module, TileState]] = []
    checked: dict = {}  # self-check verdicts and memory profiles by region structure: identical layers once
    try:
        walk.visit("", model)
        refused: list[tuple[nn.Module, list[Skipped]]] = []
        for planned in walk.planned:  # build every block before installing any
            result = planned.build(policy, verify, checked)
            if isinstance(result, TileState):
                built.append((planned.module, result))
            refusals = [] if isinstance(result, TileState) else result
            if isinstance(result, TileState) and len(result.matches) < len(planned.matches):
                refusals = result.refused
            walk.skipped += refusals
            refused.append((planned.module, refusals))
    except BaseException:  # never half-rewritten: put back the tilings a re-tile had taken off
        for module, state in walk.retiled:
            _install(module, state)
        raise
    for module, state in built:
        _install(module, state)
    for module, refusals in refused:
        if refusals:
            _REFUSED[module] = refusals
        else:
            _REFUSED.pop(module, None)
    for skip in walk.skipped:
        logger.info("fxtile: not tiling %s: %s", skip.path or type(model).__name__, skip.reason)
    if not built and not walk.tiled:
        warnings.warn(
            f"fxtile.transform found no MLP to tile in {type(model).__name__}; "
            "see fxtile.find(model).skipped for the blocks it looked at and why",
            stacklevel=2,
        )
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``transform`` everywhere in ``model``, in place; returns the same ``model`` object."""
    _check_args(model, None)
    tiled = [m for m in model.modules() if tile_state(m) is not None]
    for module in tiled:  # all or nothing
        _check_uninstallable(module)
    for module in tiled:
        _uninstall(module)
    for module in model.modules():
        _REFUSED.pop(module, None)
    return model


def tiled_regions(model: nn.Module) -> list[tuple[str, Match, TiledRegion, nn.Module]]:
    """Every tiled region of ``model``: its block's path, its match, its callable and the module its tensor
    paths are relative to, in module order (a block traced per call contributes its default call's
    regions). Not stable; for ``fxtile.estimate`` and ``fxtile.testing``."""
    found = []
    for path, module in model.named_modules():
        state = tile_state(module)
        if state is not None:
            owner = state.owner if state.owner is not None else module
            found += [(path, m, r, owner) for m, r in zip(state.matches, state.regions)]
    return found

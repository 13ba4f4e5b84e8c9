"""Public API: ``find``, ``transform``, ``restore``.

``transform`` is a short walk over the module tree, innermost first (the shape of torchao's
``_replace_with_custom_fn_if_matches_filter``): each module ``filter_fn`` admits is offered to the block
kinds of :mod:`fxtile.blocks` in order, which plan it (``Planned``), refuse it with reasons (``Skipped``)
or decline it. Every planned block is then built (:mod:`fxtile.build`: regions built once, checked
numerically, profiled) and only when all are built is anything installed: the rewritten forward is bound
to the *same* module instance as an instance attribute. Parameters, buffers, ``state_dict`` keys, hooks
and module names stay as they are, and ``restore`` removes that attribute to bring back the original
forward exactly. ``find`` on a model tiled with the same arguments reads what was installed.
"""

from __future__ import annotations

import logging
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import nn

from . import distributed
from .blocks import KINDS, Context, Declined, Planned
from .build import Verdicts
from .state import CHECK_REFUSALS, STATE, TileState
from .passes.experts import looks_like_experts, meta_probes_once
from .passes.loss_head import LOSS_PATTERNS
from .passes.patterns import MLP_PATTERNS, Pattern
from .passes.trace import is_linear_like, linear_dims
from .policy import ShardPolicy, as_policy
from .records import Match, Matches, Skipped, Why
from .region import TiledRegion

__all__ = ["Match", "Matches", "Skipped", "Why", "find", "restore", "tile_state", "tiled_regions", "transform"]

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


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


def _looks_like_a_block(module: nn.Module) -> bool:
    """An expanding projection (h -> i, i > h) and one contracting back (i or i/2 -> h), or an expert
    bank: worth tracing per call, and worth reporting when it is left alone."""
    dims = list(_dims(module))
    return looks_like_experts(module) or any(i > h and (i2 in (i, i // 2)) and o2 == h
                                              for h, i in dims for i2, o2 in dims)


@dataclass
class _Walk:
    filter_fn: Optional[FilterFn]
    patterns: tuple[Pattern, ...]
    retile: Optional[ShardPolicy] = None  # transform: tiled blocks with another policy are untiled and planned again
    planned: list[Planned] = field(default_factory=list)
    installed: list[nn.Module] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    opaque: list[nn.Module] = field(default_factory=list)  # excluded by filter_fn, or holding a region
    retiled: list[tuple[nn.Module, TileState]] = field(default_factory=list)
    # blocks that could hold a nesting pattern but did not trace: reported only if it is found nowhere
    untraced: dict[str, list[Skipped]] = field(default_factory=dict)

    def visit(self, path: str, module: nn.Module) -> bool:
        """Plan ``module`` innermost-first; True if it or a descendant holds a region.

        Innermost-first makes each match's path the smallest block holding it (``layers.0.mlp``, not the
        whole model), which is what ``filter_fn`` and the report name."""
        state = tile_state(module)
        if state is not None and self._keeps(module, state):
            return self._installed(path, module)
        if is_linear_like(module) or _projections(module) < min(p.min_projections for p in self.patterns):
            return False
        reported = len(self.skipped)
        below = self._children(path, module)
        patterns = self._looked_for(module, below)
        quiet = len(self.skipped) > reported  # a descendant already said why: do not repeat it
        if not patterns or not self._admitted(path, module, loud=not below and not quiet):
            return below
        ctx = Context(path, frozenset(self.opaque), patterns, _looks_like_a_block(module))
        declined = []
        for kind in KINDS:
            result = kind.plan(module, ctx)
            if isinstance(result, Planned):
                return self._plan(result, reported, below)
            if not isinstance(result, Declined):  # the kind's own refusals
                self.skipped += result if not quiet or below else []
                return below
            declined.append(result)
        self._declined(path, module, ctx, declined, below, quiet)
        return below

    def _keeps(self, module: nn.Module, state: TileState) -> bool:
        """A tiled block stays as it is, unless transform re-tiles it with another policy (its tiling is put
        back if anything fails)."""
        if self.retile is None or state.policy == self.retile:
            return True
        _uninstall(module)
        self.retiled.append((module, state))
        return False

    def _installed(self, path: str, module: nn.Module) -> bool:
        self.installed.append(module)
        self.opaque.append(module)
        self.skipped += CHECK_REFUSALS.get(module, [])
        self._children(path, module)  # a model whose loss head is tiled holds tiled blocks too
        return True

    def _children(self, path: str, module: nn.Module) -> bool:
        found = False
        if not looks_like_experts(module):  # a bank's children are its activation
            for name, child in module.named_children():
                found |= self.visit(f"{path}.{name}" if path else name, child)
        return found

    def _looked_for(self, module: nn.Module, below: bool) -> tuple[Pattern, ...]:
        """The patterns to look for in ``module``: all of them, or, where a descendant holds a region, only
        those that nest and could sit here (the loss head around tiled layers)."""
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return ()
        return tuple(p for p in self.patterns if p.nests and p.could_hold(module)) if below else self.patterns

    def _admitted(self, path: str, module: nn.Module, loud: bool) -> bool:
        """``filter_fn``'s answer (a refused module stays opaque in every ancestor's graph), and no
        instance-level forward (a wrapper or hook a tiled forward would bypass)."""
        why = None
        if self.filter_fn is not None and not self.filter_fn(module, path):
            self.opaque.append(module)
            why = Why.EXCLUDED
        elif "forward" in module.__dict__:
            why = Why.WRAPPED
        if why is not None and loud and _looks_like_a_block(module):
            self.skipped.append(Skipped(path, why, why.value + (" (e.g. accelerate's offload)" if why is Why.WRAPPED else "")))
        return why is None

    def _plan(self, planned: Planned, reported: int, below: bool) -> bool:
        if not below:  # the block covers what its descendants refused (a nesting loss head does not)
            del self.skipped[reported:]
        self.opaque.append(planned.module)
        if self.retile is None and planned.module in CHECK_REFUSALS:  # find(): the last transform's check said no
            self.skipped += CHECK_REFUSALS[planned.module]
        else:
            self.planned.append(planned)
        return True

    def _declined(self, path: str, module: nn.Module, ctx: Context, declined: list[Declined], below: bool,
                  quiet: bool) -> None:
        """No kind took the block: report it if it looked like one (or a nesting pattern was found in it and
        refused), else remember it for the nesting patterns' report."""
        refused = [d for d in declined if d.refused]
        loud = ctx.looks_like_mlp and not quiet and not below
        shown = refused if below else ([d for d in declined if d.reason] if loud else [])
        if shown or loud:
            reason = "; ".join(dict.fromkeys(d.reason for d in shown)) or "not traced"
            self.skipped.append(Skipped(path, Why.REFUSED if refused else Why.UNTRACED, reason,
                                        refused[0].pattern if refused else None))
            return
        why = "; ".join(dict.fromkeys(d.reason for d in declined if d.reason))
        for p in ctx.patterns:
            if p.nests and p.could_hold(module) and why:
                self.untraced.setdefault(p.name, []).append(Skipped(path, Why.NOT_FOUND, f"{p.absent}: {why}", p.name))

    def report(self, matches: list[Match]) -> list[Skipped]:
        """What was skipped; for a nesting pattern found and refused nowhere, also the outermost blocks that
        could hold it but did not trace (a vocabulary-parallel loss, a loss in untraceable code)."""
        out = list(self.skipped)
        for name, entries in self.untraced.items():
            if any(m.pattern == name for m in matches) or any(s.pattern == name for s in self.skipped):
                continue
            out += [s for s in entries  # innermost-first: an enclosing block reports for its parts
                    if not any(o.path == "" or s.path.startswith(o.path + ".") for o in entries if o is not s)]
        return out


def _patterns(loss: bool) -> tuple[Pattern, ...]:
    if not isinstance(loss, bool):
        raise TypeError(f"loss must be True or False, got {type(loss).__name__} {loss!r}")
    return MLP_PATTERNS + LOSS_PATTERNS if loss else MLP_PATTERNS


def _check_args(model: object, filter_fn: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool or None, got {type(filter_fn).__name__}")


@dataclass(frozen=True)
class _Report:
    """What the last ``transform`` of a model reported, for ``find`` with the same arguments."""

    arguments: tuple  # (filter_fn, loss)
    installed: tuple  # (module, state) ids of every tiled block, to see that nothing changed since
    matches: Matches


_REPORTS: "weakref.WeakKeyDictionary[nn.Module, _Report]" = weakref.WeakKeyDictionary()


def _installed_ids(model: nn.Module) -> tuple:
    return tuple((id(m), id(s)) for m in model.modules() if (s := tile_state(m)) is not None)


def _matches(walk: _Walk) -> Matches:
    found = [m for module in walk.installed for m in tile_state(module).matches]
    found += [m for planned in walk.planned for m in planned.matches]
    return Matches(found, walk.report(found))


def find(model: nn.Module, *, filter_fn: Optional[FilterFn] = None, loss: bool = False) -> Matches:
    """Dry run: the regions ``transform`` would tile (or has tiled), without changing ``model``.

    ``filter_fn(module, fqn) -> bool`` is asked before a block is traced (innermost blocks first; a
    block with a matched descendant is not traced itself, except, with ``loss=True``, for a loss head
    among its own children). The result's ``.skipped`` lists blocks that look like MLPs or loss heads
    but were not matched, each with the reason. The self-check runs in ``transform``. On a model that
    ``transform`` tiled with the same ``filter_fn`` and ``loss``, and unchanged since, nothing is traced:
    the result is what was installed.
    """
    _check_args(model, filter_fn)
    patterns = _patterns(loss)
    last = _REPORTS.get(model)
    if last is not None and last.arguments == (filter_fn, loss) and last.installed == _installed_ids(model):
        return Matches(list(last.matches), list(last.matches.skipped))
    walk = _Walk(filter_fn, patterns)
    with meta_probes_once():
        walk.visit("", model)
    return _matches(walk)


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
    left alone and reported). ``loss=True``: also the output projection and its cross-entropy. Blocks that
    cannot be traced, matched or verified are left as they are and listed by ``fxtile.find(model).skipped``.

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
    refused: list[tuple[nn.Module, list[Skipped]]] = []
    checked = Verdicts()  # self-check verdicts and memory profiles by region structure: identical layers once
    try:
        with meta_probes_once():  # 32 banks of one structure on meta: probed once
            walk.visit("", model)
            for planned in walk.planned:  # build every block before installing any
                result = planned.build(policy, verify, checked)
                if result.state is not None:
                    built.append((planned.module, result.state))
                walk.skipped += result.refused
                refused.append((planned.module, result.refused))
    except BaseException:  # never half-rewritten: put back the tilings a re-tile had taken off
        for module, state in walk.retiled:
            _install(module, state)
        raise
    for module, state in built:
        _install(module, state)
        walk.installed.append(module)
    order = {id(m): i for i, m in enumerate(model.modules())}
    walk.installed.sort(key=lambda m: order[id(m)])
    for module, refusals in refused:
        if refusals:
            CHECK_REFUSALS[module] = refusals
        else:
            CHECK_REFUSALS.pop(module, None)
    walk.planned = []
    report = _matches(walk)
    _REPORTS[model] = _Report((filter_fn, loss), _installed_ids(model), report)
    for skip in report.skipped:
        logger.info("fxtile: not tiling %s: %s", skip.path or type(model).__name__, skip.reason)
    if not walk.installed:
        warnings.warn(_nothing_tiled(model, report.skipped, filter_fn, loss), stacklevel=2)
    return model


def _nothing_tiled(model: nn.Module, skipped: list[Skipped], filter_fn: Optional[FilterFn], loss: bool) -> str:
    """What ``transform`` says when it tiled nothing: how much it looked at and, when ``find(...).skipped``
    lists blocks, how many and the first one's reason (pointing to an empty list would send the user nowhere)."""
    looked = sum(1 for _ in model.modules())
    found = f"fxtile.transform found no MLP to tile in {type(model).__name__} ({looked} module{'s' * (looked > 1)} looked at"
    if skipped:
        arguments = (", filter_fn=filter_fn" if filter_fn is not None else "") + (", loss=True" if loss else "")
        call = f"fxtile.find(model{arguments})"
        first = f"{skipped[0].path or '(root)'}: {skipped[0].reason}"
        if len(skipped) == 1:
            return f"{found}); 1 block looks like one and was left as it is ({first}); {call}.skipped lists it"
        return (f"{found}); {len(skipped)} blocks look like one and were left as they are (the first, {first}); "
                f"{call}.skipped lists each with its reason")
    shapes = "a projection widening the hidden size and one narrowing it back, or stacked 3-D expert weights"
    if loss:
        return (f"{found}, none with the shape of an MLP or expert bank ({shapes}), nor of a loss head (a projection "
                "to logits and its cross-entropy)); the model is unchanged")
    return (f"{found}, none with the shape of an MLP or expert bank ({shapes})); the model is unchanged; loss=True "
            "also looks for a loss head")


def restore(model: nn.Module) -> nn.Module:
    """Undo ``transform`` everywhere in ``model``, in place; returns the same ``model`` object."""
    _check_args(model, None)
    tiled = [m for m in model.modules() if tile_state(m) is not None]
    for module in tiled:  # all or nothing
        _check_uninstallable(module)
    for module in tiled:
        _uninstall(module)
    for module in model.modules():
        CHECK_REFUSALS.pop(module, None)
        _REPORTS.pop(module, None)
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

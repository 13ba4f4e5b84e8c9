"""Build time: turn a planned block's regions into tiled callables, check and profile each, rewrite its graph,
and describe what will be installed (a :class:`~fxtile.state.TileState`).

Every kind of block ends here (:func:`tile_graph`, :func:`build_bank`): each region is built once from
its description, checked numerically (:mod:`fxtile.selfcheck`) and profiled for the shard policy
(:mod:`fxtile.memory`), and only the regions that pass are rewritten into the graph. Verdicts and profiles
are kept by region structure for the whole ``transform`` (``checked``): a model's identical layers are
checked once. The self-check's refusals are returned with what was built (:class:`Built`); the API keeps
them per block (:data:`fxtile.state.CHECK_REFUSALS`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from . import distributed, memory, selfcheck
from .compare import max_error, tolerance
from .kernels import experts as bank_kernel
from .kernels.shards import shard_bounds
from .passes.candidate import Candidate
from .passes.cut import RegionSpec, cut_region
from .passes.experts import (ExpertsMatch, bank_region, experts_forward, once_per_structure, probe_inputs, shrink_factor,
                             shrunk_region)
from .passes.modes import preserved_modes
from .passes.rewrite import rewrite
from .passes.trace import get_path, module_stack
from .policy import ShardPolicy
from .records import Match, Skipped, Why
from .region import Region, TiledRegion, tiled as tiled_callable
from .selfcheck import Check, structure_key
from .state import TileState

__all__ = ["Built", "Verdicts", "signed", "bank_record", "build_bank", "record", "tile_graph"]

def signed(function: Callable, original: Callable) -> Callable:
    """``function`` as installed in place of ``original``: a copy of the function object (the same code, so no
    extra frame for ``torch.compile`` to trace) that carries the original's name, docstring and, through
    ``__wrapped__``, its signature, so that anything that reads the forward (Hugging Face ``Trainer``'s
    column filter, TRL, accelerate, PEFT) sees the original. One copy per tiled block."""
    copy_ = types.FunctionType(function.__code__, function.__globals__, original.__name__, function.__defaults__,
                               function.__closure__)
    copy_.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(copy_, original)  # __wrapped__, __doc__, __name__, __qualname__, __module__
    return copy_


@dataclass
class Built:
    """What building a planned block gave: the state to install (None: no region passed) and the regions the
    self-check refused."""

    state: Optional[TileState]
    refused: list[Skipped]


# ---------------------------------------------------------------------------------------------
# The public records of what was found and built


def record(path: str, cand: Candidate, method: str = "forward", policy: Optional[ShardPolicy] = None,
           check: Optional[Check] = None, prefix: str = "", tiled: Optional[TiledRegion] = None) -> Match:
    """The public record of a candidate; ``prefix``: the block's path in the traced root (names are
    given relative to the block)."""
    def rel(name: str, sep: str) -> str:
        return name.removeprefix(prefix + sep) if prefix else name

    widths = {"intermediate_size": None, "vocab_size": None, cand.found_by.width_name: cand.width}
    return Match(
        path=path, pattern=cand.pattern, roles={k: rel(v, ".") for k, v in cand.roles.items()},
        activation=cand.activation, hidden_size=cand.hidden_size, **widths,
        nodes=tuple(rel(n.name, "_") for n in cand.nodes), policy=policy, method=method,
        verified=check.passed if check is not None else None, check=check.detail if check is not None else "",
        tiled_from=tiled.tiled_from() if tiled is not None else None,
    )


def bank_record(path: str, bank: ExpertsMatch, policy: Optional[ShardPolicy] = None, check: Optional[Check] = None,
                tiled: Optional[TiledRegion] = None) -> Match:
    return Match(
        path=path, pattern="routed_experts", roles={"experts": ", ".join(bank.tensor_names)},
        activation=bank.activation, hidden_size=bank.hidden_size, intermediate_size=bank.intermediate_size,
        vocab_size=None, nodes=(path.rsplit(".", 1)[-1] or "experts",), policy=policy,
        verified=check.passed if check is not None else None, check=check.detail if check is not None else "",
        tiled_from=tiled.tiled_from() if tiled is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Check, profile, rewrite


def _warn_about_hooks(path: str, root: nn.Module, cand: Candidate, prefix: str) -> None:
    """Hooks on modules *inside* a tiled region cannot run as before (the region runs as one op over
    shards), so say so instead of dropping them silently. ZeRO-3's own gathering hooks are not the user's
    and their work is done another way (:mod:`fxtile.distributed`)."""
    inside = {str(n.target) for n in cand.nodes if n.op == "call_module"}
    inside |= {p for n in cand.nodes for p in module_stack(n) if p != prefix}
    hooked = sorted(p for p in inside if distributed.user_hooks(root.get_submodule(p)))
    if hooked:
        def name(p: str) -> str:
            p = p.removeprefix(prefix + ".") if prefix else p
            return f"{path}.{p}" if path else p
        warnings.warn(
            f"fxtile: {', '.join(name(p) for p in hooked)} inside a tiled region has module hooks, which do not run "
            f"while it is tiled; exclude the block with filter_fn=lambda m, fqn: fqn != {path!r} to keep them",
            stacklevel=5,
        )


class Verdicts:
    """Self-check verdicts and memory profiles by region structure (:func:`fxtile.selfcheck.structure_key`),
    for one ``transform`` and the blocks it traces per call later: a model's identical layers are checked
    and profiled once, and a call signature traced after ``transform`` reuses the verdict its region got
    there (before any wrapper such as FSDP's swaps its parameters for views mid-forward)."""

    def __init__(self) -> None:
        self._by_structure: dict[tuple, tuple[Check, object]] = {}

    def check_and_profile(self, tiled: TiledRegion, root: nn.Module, verify: bool) -> Check:
        """The self-check's verdict on ``root``'s live tensors and modes, and the region's memory profile
        (what ``shards="auto"`` decides each call by), set on ``tiled``."""
        tensors = [get_path(root, p) for p in tiled.tensor_paths]
        modes = tiled.live_modes([get_path(root, p) for p in tiled.module_paths])
        tiled.itemsize = next((t.element_size() for t in tensors if t.is_floating_point()), 4)
        key = structure_key(tiled, tensors, modes)
        if key not in self._by_structure:
            check = selfcheck.check_region(tiled, tensors, modes) if verify else Check(None, None, "not verified (verify=False)")
            found = memory.profile(tiled.region, tensors, modes) if check.passed is not False else "not profiled"
            self._by_structure[key] = (check, found)
        check, found = self._by_structure[key]
        tiled.set_profile(None, found) if isinstance(found, str) else tiled.set_profile(found, "profiled")
        return check


def tile_graph(
    path: str, gm: fx.GraphModule, candidates: list[Candidate], policy: ShardPolicy, verify: bool,
    root: nn.Module, checked: Verdicts, prefix: str = "", method: str = "forward",
) -> tuple[list[Match], list[TiledRegion], list[Skipped]]:
    """Build each region once, check and profile it, and rewrite ``gm`` with the regions that pass (in place).

    ``checked``: the :class:`Verdicts` of the whole transform."""
    matches, regions, skipped, kept = [], [], [], []
    for i, cand in enumerate(candidates):
        tiled = tiled_callable(cut_region(gm, cand, f"{cand.pattern}_{i}"), policy, path)
        check = checked.check_and_profile(tiled, root, verify)
        if check.passed is False:
            nodes = ", ".join(n.name for n in cand.nodes)
            skipped.append(Skipped(path, Why.SELF_CHECK, f"{cand.pattern} region {nodes}: {check.detail}", cand.pattern))
            continue
        _warn_about_hooks(path, root, cand, prefix)
        kept.append((cand, tiled))
        matches.append(record(path, cand, method, policy, check, prefix, tiled))
        regions.append(tiled)
    if kept:
        rewrite(gm, kept)
    return matches, regions, skipped


# ---------------------------------------------------------------------------------------------
# Expert banks: the plan hypothesis the bank reproduces, then the same check and profile


def bank_plan(module: nn.Module, spec: RegionSpec, bank: ExpertsMatch):
    """The first of the bank's plan hypotheses whose explicit kernel reproduces the bank's own forward on
    random routed rows in two uneven shards (a forward only, as the row-independence probe; the self-check
    then compares every gradient), or None: the bank keeps the generic kernel."""
    if not spec.hypotheses:
        return None
    if any(p.device.type == "meta" for p in module.parameters()):
        return _bank_plan_on_meta(module, spec)
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
    except Exception:  # noqa: BLE001 - the row-independence probe already refused banks that do not run
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


def _bank_plan_on_meta(module: nn.Module, spec: RegionSpec):
    """On the meta device: the hypothesis the bank's small real instance reproduces (the same class with
    every width divided by one factor, as its row-independence probe ran: ``passes.experts``). Its
    hypotheses come out in the same order, as they follow equalities between widths, which a common
    factor keeps."""
    def which() -> Optional[int]:  # the index of the hypothesis the small instance reproduces
        try:
            small, found, small_spec = shrunk_region(module, spec.label, shrink_factor(module))
        except Exception:  # noqa: BLE001 - the matcher built and ran the same instance; the generic kernel stays
            return None
        plan = bank_plan(small, small_spec, found)
        if plan is None or len(small_spec.hypotheses) != len(spec.hypotheses):
            return None
        return small_spec.hypotheses.index(plan)

    index = once_per_structure("plan", module, which)
    return None if index is None else spec.hypotheses[index]


def build_bank(path: str, module: nn.Module, bank: ExpertsMatch, policy: ShardPolicy, verify: bool,
               checked: Verdicts) -> Built:
    spec = bank_region(module, bank, "routed_experts_0")
    tiled = TiledRegion(Region(dataclasses.replace(spec, plan=bank_plan(module, spec, bank))), policy, path)
    check = checked.check_and_profile(tiled, module, verify)
    if check.passed is False:
        return Built(None, [Skipped(path, Why.SELF_CHECK, f"expert bank: {check.detail}", "routed_experts")])
    gm = experts_forward(module, bank, tiled)
    return Built(TileState("experts", "forward", signed(type(gm).forward, type(module).forward),
                           [bank_record(path, bank, policy, check, tiled)],
                           [tiled], policy), [])

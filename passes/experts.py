"""Routed experts: find a mixture-of-experts expert bank by shape and tile it over tokens.

Why a separate step: transformers (>= 5) stores the experts of a MoE block as *stacked* parameters
(``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``) in one module called as
``experts(hidden_2d, top_k_index, top_k_weights)``, whose forward dispatches to ``grouped_mm``,
``batched_mm`` or a per-expert loop. None of those trace with ``torch.fx``, so the expert bank is an
opaque call, and the region to tile is that call itself, with its three inputs as row-aligned
activations (one row per token: the hidden state, its top-k expert ids and its routing weights).

The router, the softmax/top-k and any aux loss stay outside the region, untouched: router logits
keep their gradients, and the routing weights get theirs from the tiled call's backward.

Tiling the call over rows is exact only if every output row depends on its own input rows alone
(routing per token, no capacity limit that drops tokens by their position in the batch). An opaque
call cannot show that in a graph, so the matcher checks it on the module itself: a small probe runs
it on a few random rows at once and in two pieces and requires the same rows back.

Matching is by shape only: a module with at least two direct 3-D parameters stacking ``E >= 2``
experts on dim 0 (biases ``[E, X]`` allowed), with one width ``H`` shared by every 3-D parameter (the
hidden size); then the probe decides.

On the **meta device** (``fxtile convert`` plans a model without loading it) the bank cannot run, so the
probe runs on a *small real instance of the same class* (:func:`shrunk_bank`): a copy whose stacked
widths are all divided by one common factor, with random CPU weights. Row independence is a property of
the bank's code (how it routes, whether it caps rows per expert), not of its widths, so the probe keeps
its power; a bank that cannot be shrunk that way, or whose shrunk copy does not run, is refused with
that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from .cut import MODULE_HOOKS, ProbeInput, RegionSpec, meta_template
from .modes import preserved_modes
from .plans import bank_hypotheses
from .trace import first_line, graph_module

__all__ = ["TOP_K_NAMES", "meta_probes_once", "once_per_structure", "ExpertsMatch", "bank_region", "bank_widths", "experts_forward", "looks_like_experts", "match_experts",
           "probe_inputs", "shrink_factor", "shrunk_bank", "shrunk_region", "top_k"]

_PROBE_ROWS = (3, 4)  # two uneven pieces of 7 probe rows
SHRUNK_WIDTH = 16  # a shrunk bank's narrowest width is at least this (where the bank's own widths allow it)
TOP_K_NAMES = (  # where a bank or its config states experts per token, in order of preference
    "num_experts_per_tok", "top_k", "moe_topk", "num_experts_per_token", "moe_k", "experts_per_token")


@dataclass(frozen=True)
class ExpertsMatch:
    """An accepted expert bank: its stacked tensors, sizes and argument names."""

    arg_names: tuple[str, ...]  # hidden rows, expert ids, routing weights
    tensor_names: tuple[str, ...]  # every parameter of the bank (what the tiled op takes as inputs)
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    top_k: int = 2  # experts per token, as the bank or its config states it (2 where neither does)


def _stacked(module: nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    params = list(module.parameters(recurse=False))
    three_d = [p for p in params if p.dim() == 3]
    if len(three_d) < 2:
        return None
    experts = min(p.shape[0] for p in three_d)  # a bank may append parameter-free (zero/identity) experts
    if experts < 2 or any(p.dim() < 2 for p in params):
        return None
    return experts, three_d


def looks_like_experts(module: nn.Module) -> bool:
    """Stacked per-expert weights: two or more direct 3-D parameters (E >= 2 on dim 0), none 1-D."""
    return _stacked(module) is not None


def _hidden_candidates(three_d: list[torch.Tensor]) -> list[int]:
    shared = set(three_d[0].shape[1:])
    for p in three_d[1:]:
        shared &= set(p.shape[1:])
    return sorted(shared)


def _intermediate(three_d: list[torch.Tensor], hidden: int) -> int:
    """The narrowest non-hidden width (``I`` when gate and up are fused into ``2I``)."""
    widths = [s for p in three_d for s in p.shape[1:] if s != hidden]
    return min(widths) if widths else hidden


def _activation(module: nn.Module) -> str:
    children = list(module.children())
    return type(children[0]).__name__ if children else "unknown"


def top_k(module: nn.Module, experts: int) -> Optional[int]:
    """Experts per token where the bank or its ``config`` says (transformers' banks keep the model config),
    else None. A bank never sees its router, so this is the only place it is written."""
    for owner in (module, getattr(module, "config", None)):
        for name in TOP_K_NAMES:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value:
                return min(value, experts)
    return None


def bank_widths(module: nn.Module) -> list[int]:
    """Every width of the bank's stacked parameters (the non-expert dims of its 3-D parameters: ``H``,
    ``I``, ``2I``), sorted; empty if it is no bank."""
    stacked = _stacked(module)
    return sorted({s for p in stacked[1] for s in p.shape[1:]}) if stacked else []


def shrink_factor(module: nn.Module, narrowest: int = SHRUNK_WIDTH) -> int:
    """The common factor :func:`shrunk_bank` divides every width by: the largest divisor of their gcd that
    keeps the narrowest at least ``narrowest`` wide (1: the bank is small enough already).
    Mixtral (4096, 14336, 28672): gcd 2048, factor 256 (widths 16, 56, 112)."""
    widths = bank_widths(module)
    if not widths:
        return 1
    g = math.gcd(*widths)
    return max((d for d in range(1, g + 1) if g % d == 0 and widths[0] // d >= narrowest), default=1)


def shrunk_bank(module: nn.Module, factor: int, scale: int = 1, dtype: Optional[torch.dtype] = None,
                seed: int = 0) -> nn.Module:
    """A real CPU instance of ``module``'s class (a deep copy, no hooks) whose stacked widths ``w`` are
    ``w // factor * scale``, with random weights (``dtype``: the floating parameters' dtype, default
    float32). Works from weights on any device, meta included: only shapes are read.

    What is shrunk, by one generic rule (no per-class table): the non-expert dims of the direct 3-D and
    2-D (``[E, X]`` biases) parameters that are bank widths, any dim of a child's parameters that is one,
    and every int attribute of the bank and its children equal to a bank width (transformers' banks keep
    ``hidden_dim`` and ``intermediate_dim``). ``factor`` must divide every width (:func:`shrink_factor`).
    """
    widths = set(bank_widths(module))
    experts = _stacked(module)[0] if widths else 0

    def width(d: int) -> int:
        return d // factor * scale if d in widths else d

    gen = torch.Generator().manual_seed(seed)
    memo: dict[int, object] = {}
    direct = {id(p) for p in module.parameters(recurse=False)}
    for p in module.parameters():
        dims = list(p.shape)
        start = 1 if id(p) in direct and p.dim() >= 2 else 0
        shape = dims[:start] + [width(d) for d in dims[start:]]
        cast = (dtype or torch.float32) if p.is_floating_point() else p.dtype
        fan_in = shape[-1] if len(shape) >= 2 else 10
        value = torch.randn(shape, generator=gen) * (fan_in ** -0.5 if len(shape) >= 3 else 0.1)
        memo[id(p)] = nn.Parameter(value.to(cast), requires_grad=p.requires_grad)
    small = copy.deepcopy(module, memo)
    for sub in small.modules():
        for hooks in MODULE_HOOKS:
            getattr(sub, hooks).clear()
        for name, value in list(vars(sub).items()):
            if type(value) is int and value in widths and value != experts:
                setattr(sub, name, width(value))
    return small


def shrunk_region(module: nn.Module, label: str, factor: int, scale: int = 1,
                  dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, ExpertsMatch, RegionSpec]:
    """:func:`shrunk_bank` matched and cut as its region: what planning on the meta device probes and
    replays in the bank's place. Raises if the small instance is refused."""
    small = shrunk_bank(module, factor, scale, dtype)
    found = match_experts(small)
    if not isinstance(found, ExpertsMatch):
        raise RuntimeError(f"its small instance was refused: {found}")
    return small, found, bank_region(small, found, label)


def probe_inputs(experts: int, hidden: int, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random routed rows: hidden states, top-2 expert ids (distinct per row) and routing weights."""
    rows = sum(_PROBE_ROWS)
    top_k = min(2, experts)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(param.device, param.dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)]).to(param.device)
    weights = torch.rand(rows, top_k, generator=gen).to(param.device, param.dtype)
    return x, ids, weights


def _probe(module: nn.Module, names: tuple[str, ...], experts: int, hidden: int, param: torch.Tensor) -> str | None:
    """None if the bank maps rows independently on random routed rows, else the reason it does not."""
    x, ids, weights = probe_inputs(experts, hidden, param)
    rows = x.shape[0]
    try:
        with preserved_modes(module), torch.no_grad():
            module.eval()
            whole = module(x, ids, weights)
            lo = _PROBE_ROWS[0]
            parts = torch.cat([module(x[:lo], ids[:lo], weights[:lo]), module(x[lo:], ids[lo:], weights[lo:])])
    except Exception as exc:  # noqa: BLE001 - a bank that cannot run on routed rows is not tiled
        return f"it did not run on {rows} routed rows ({first_line(exc, 120)})"
    if not isinstance(whole, torch.Tensor) or whole.shape != (rows, hidden):
        return f"on {rows} routed rows it returned {getattr(whole, 'shape', type(whole).__name__)}, not [{rows}, {hidden}]"
    scale = max(1.0, whole.abs().max().item())
    if not torch.allclose(parts, whole, rtol=1e-3, atol=1e-4 * scale):
        return "its rows depend on other rows (capacity limits or cross-token routing), so it cannot be tiled over tokens"
    return None


_MEMO: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("fxtile_meta_bank_probes", default=None)


@contextlib.contextmanager
def meta_probes_once() -> Iterator[None]:
    """Within this context, what is worked out for a bank on the meta device from its small real instance
    is worked out once per bank structure (:func:`once_per_structure`).

    Why: a model's 32 banks on meta are 32 copies of one structure, and the small instance's probe runs the
    bank's own code (transformers' ``grouped_mm`` takes about 50 ms a call on CPU, even 16 wide): probing
    each bank made planning Mixtral take 40 s. Scoped to one ``transform``/``find`` rather than kept in a
    global table, which would only grow."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _structure(module: nn.Module) -> tuple:
    """What a meta bank's small instance is built from: its class, parameter names, shapes and dtypes,
    every submodule's class and plain attributes (the ints :func:`shrunk_bank` shrinks), and the identity
    of any other object it holds (the model config its forward reads)."""
    def plain(sub: nn.Module) -> tuple:
        out = []
        for k, v in sorted(vars(sub).items()):
            if v is None or type(v) in (int, float, str, bool):  # private ones too (a per-bank _experts_implementation)
                out.append((k, v))
            elif not k.startswith("_"):  # torch's own dicts (_parameters, hooks) are per module: not structure
                out.append((k, type(v).__name__, id(v)))
        return tuple(out)

    return (type(module), tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters()),
            tuple((n, type(sub), plain(sub)) for n, sub in module.named_modules()))


def once_per_structure(what: str, module: nn.Module, work: Callable[[], object]) -> object:
    """``work()``, or, inside :func:`meta_probes_once` and for a meta bank whose structure was seen,
    what it returned then."""
    memo = _MEMO.get()
    if memo is None or not any(p.device.type == "meta" for p in module.parameters()):
        return work()
    key = (what, _structure(module))
    if key not in memo:
        memo[key] = work()
    return memo[key]


def match_experts(module: nn.Module) -> ExpertsMatch | str | None:
    """An :class:`ExpertsMatch`, a reason to refuse a bank, or ``None`` if ``module`` is no expert bank."""
    stacked = _stacked(module)
    if stacked is None:
        return None
    experts, three_d = stacked
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return "its forward has no inspectable signature"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional[:3]]
    extra = [p.name for p in params[3:] if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
             and p.kind is not p.VAR_POSITIONAL]
    if len(required) != 3 or extra:
        return (f"its forward takes ({', '.join(p.name for p in params)}), "
                "not (hidden rows, expert ids, routing weights)")
    if any(True for _ in module.buffers()):
        return "it holds buffers, which its forward may update; a recompute would update them again"
    if three_d[0].device.type == "meta":
        return once_per_structure("match", module, lambda: _probed(module, experts, three_d, tuple(required)))
    return _probed(module, experts, three_d, tuple(required))


def _probed(module: nn.Module, experts: int, three_d: list, required: tuple[str, ...]) -> ExpertsMatch | str:
    """The row-independence probe of a bank (of its small real instance where it is on meta)."""
    probed, factor, where = module, 1, ""
    if three_d[0].device.type == "meta":  # probe a small real instance of the same class (module docstring)
        factor = shrink_factor(module)
        where = (f"on the meta device it was probed as a small real instance of {type(module).__name__} "
                 f"(widths / {factor}, random weights): ")
        try:
            probed = shrunk_bank(module, factor)
        except Exception as exc:  # noqa: BLE001 - a class that cannot be copied or shrunk is not planned
            return f"{where}the instance could not be built ({first_line(exc, 120)})"
    probed_3d = [p for p in probed.parameters(recurse=False) if p.dim() == 3]
    reasons = []
    for hidden in _hidden_candidates(three_d):
        reason = _probe(probed, required, experts, hidden // factor, probed_3d[0])
        if reason is None:
            names = tuple(n for n, _ in module.named_parameters())
            return ExpertsMatch(required, names, experts, hidden, _intermediate(three_d, hidden), _activation(module),
                                top_k(module, experts) or min(2, experts))
        reasons.append(where + reason)
    return reasons[0] if reasons else "its stacked parameters share no hidden width"


def bank_region(module: nn.Module, match: ExpertsMatch, label: str) -> RegionSpec:
    """The bank as a region: the whole module, on the meta device, run on row ranges of its three inputs;
    with the explicit plans its shapes admit as hypotheses (the runtime keeps one only if it reproduces
    the bank on a probe: the bank's code is opaque). Its only child, if any, is the activation."""
    children = tuple(name for name, _ in module.named_children())  # they carry the train/eval mode
    template = meta_template(module, match.tensor_names)
    act = template.get_submodule(children[0]) if len(children) == 1 else None
    plain_act = act is not None and not any(True for _ in act.parameters()) and not any(True for _ in act.buffers())
    tensors = [p for _, p in module.named_parameters()]
    hypotheses = tuple(bank_hypotheses(tensors, match.hidden_size, match.num_experts, act)) if plain_act else ()
    return RegionSpec(
        template, match.tensor_names, children, tuple(type(module.get_submodule(c)) for c in children),
        (ProbeInput(match.hidden_size), ProbeInput(match.top_k, high=match.num_experts), ProbeInput(match.top_k)),
        match.hidden_size, match.intermediate_size, True, None, label, hypotheses,
    )


def experts_forward(module: nn.Module, match: ExpertsMatch, target: object) -> fx.GraphModule:
    """A forward for ``module`` that calls ``target((x, ids, weights), (children...), (bank tensors...))``.

    Built as an fx graph rooted at the bank itself, so it reads the bank's live parameters and can
    be bound to the same instance like any other rewritten forward.
    """
    graph = fx.Graph()
    rows = tuple(graph.placeholder(name) for name in match.arg_names)
    modules = tuple(graph.get_attr(name) for name in getattr(target, "module_paths", ()))
    tensors = tuple(graph.get_attr(name) for name in match.tensor_names)
    graph.output(graph.call_function(target, (rows, modules, tensors)))
    graph.lint()
    return graph_module(module, graph, type(module).__name__)

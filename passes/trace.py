"""Step 1: trace a block into an fx graph that the matcher can read.

Why a custom tracer: the matcher reasons about *projections*, so anything that behaves as a linear
layer must stay one node (``call_module``) instead of dissolving into ``F.linear`` plus adapter
arithmetic. That keeps PEFT LoRA layers (which do not trace symbolically at all) and transformers'
``Conv1D`` (GPT-2) visible as single projections. Everything else is traced through, so custom
activation modules become the element-wise ops they are made of.

Some modules must stay opaque (*leaves*) whatever they are: a module ``filter_fn`` excluded (it is
never tiled, not even as part of an ancestor's graph), a module that already holds a tiled region, and
every traced-through child that holds no region node (:func:`outside_modules`): fx fires a traced-through
module's hooks once, at trace time, on Proxies, and never again, so a block whose graph keeps such a
child as a leaf calls it, and its hooks, as before.

Tracing happens per sub-block, never per model: whole transformers decoder layers do not trace with
``torch.fx`` (cache objects, data-dependent control flow), their MLPs do.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import weakref
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator

import torch.fx as fx
import torch.fx.graph_module
from torch import nn


__all__ = ["LeafTracer", "TraceResult", "conv1d_type", "first_line", "forget_source_when_freed", "get_path", "graph_module", "is_linear_like", "linear_dims",
           "module_stack", "outside_modules", "trace"]


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projection, weight stored [in, out]), or None without transformers."""
    try:  # transformers is optional at import time
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers missing or broken
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """True for modules that compute ``x @ W.T + b`` over the last dim (possibly plus an adapter).

    ``nn.Linear`` and its subclasses, transformers' ``Conv1D`` (weight stored transposed), and any
    wrapper exposing a linear-like ``base_layer`` (PEFT LoRA and friends, whose extra low-rank branch
    is also token-wise). A subclass whose forward is not token-wise is caught by the self-check.
    """
    if isinstance(module, nn.Linear):
        return True
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return True
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and base is not module and is_linear_like(base)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module) and base is not module:
        return linear_dims(base)
    weight = module.weight  # Conv1D: weight is [in, out]
    return int(weight.shape[0]), int(weight.shape[1])


def get_path(root: nn.Module, path: str):
    """The attribute at a dotted path (``gate_proj.weight``): a tensor, or a module for a module path."""
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner), name)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``: how every refusal names an exception."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:limit]}"


def _forget(key: str) -> None:
    linecache.cache.pop(key, None)
    loader = getattr(torch.fx.graph_module, "_loader", None)
    if loader is not None:
        loader.eval_cache.pop(key, None)


def forget_source_when_freed(gm: fx.GraphModule) -> fx.GraphModule:
    """Why: torch.fx keeps the generated source of every ``GraphModule`` it compiles (each recompile)
    in a process-wide cache that nothing empties (``torch.fx.graph_module._loader`` and ``linecache``),
    so a sweep or a notebook that tiles and restores models again and again would grow without bound.
    Drop the entry of ``gm``'s current code when ``gm`` is freed. Call after every (re)compile."""
    code = getattr(type(gm).forward, "__code__", None)
    if code is not None and code.co_filename.startswith("<eval_with_key>"):
        weakref.finalize(gm, _forget, code.co_filename)
    return gm


def graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)`` whose source entry goes with it."""
    return forget_source_when_freed(fx.GraphModule(root, graph, name))


class LeafTracer(fx.Tracer):
    """``fx.Tracer`` that keeps linear-like modules, torch.nn's own modules and ``leaves`` as leaves."""

    def __init__(self, leaves: Collection[nn.Module] = ()) -> None:
        super().__init__()
        self.leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or is_linear_like(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        """A module built inside the forward (BART's ``loss_fct = CrossEntropyLoss()``) is no submodule, so
        it cannot be a ``call_module`` node: its code is traced through instead."""
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass(frozen=True)
class TraceResult:
    """Either ``graph_module`` is set or ``reason`` says why tracing failed."""

    graph_module: fx.GraphModule | None
    reason: str | None = None


def _concrete_args(module: nn.Module) -> dict[str, object] | None:
    """Fix every optional argument to its default so ``forward(x)`` traces to one placeholder.

    Without this, ``forward(x, extra=None)`` becomes a graph with two placeholders and calling it with
    ``x`` alone raises.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    fixed = {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }
    return fixed or None


def trace(module: nn.Module, leaves: Collection[nn.Module] = ()) -> TraceResult:
    """Trace ``module.forward`` with :class:`LeafTracer`, once; never raises for untraceable code.

    Every required argument becomes a placeholder (``BloomMLP.forward(hidden, residual)``); optional
    arguments are fixed to their defaults, so the rewritten forward accepts the required ones only.
    A graph that depends on ``self.training`` (fx bakes it in) is refused: one graph must serve both modes.
    Whether it does is seen in the same trace (:class:`_ModeFlag`), so a block is traced once, in the
    mode it is in; a per-call trace (``passes.specialize``) then serves each mode it meets.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError) as exc:  # a forward without a readable signature (a C extension)
        return TraceResult(None, f"its forward has no signature to trace: {first_line(exc)}")
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return TraceResult(None, "forward takes no required argument; fxtile traces blocks called with their input")
    reads: list[str] = []
    with _watched_modes(module, reads):
        traced = _trace_once(module, leaves)
    if isinstance(traced, str):
        return TraceResult(None, traced)
    if reads or any(isinstance(v, _ModeFlag) for node in traced[1].nodes for v in _flat((node.args, node.kwargs))):
        return TraceResult(
            None, "its traced code depends on self.training (e.g. F.dropout(..., training=self.training)), "
            "so one graph cannot serve both train and eval mode"
        )
    return TraceResult(graph_module(traced[0], traced[1], module.__class__.__name__))


class _ModeFlag:
    """Stands in for a module's ``training`` flag while its block is traced: it behaves as the flag, and
    records that the traced code branched on it (``if self.training``). Passed on as an argument instead
    (``F.dropout(x, training=self.training)``), it lands in the graph, where :func:`trace` finds it. Either
    way the code depends on the mode, and one graph cannot serve both."""

    def __init__(self, value: bool, reads: list[str], owner: str) -> None:
        self.value, self.reads, self.owner = value, reads, owner

    def __bool__(self) -> bool:
        self.reads.append(self.owner)
        return self.value

    def __eq__(self, other: object) -> bool:
        self.reads.append(self.owner)
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)


@contextlib.contextmanager
def _watched_modes(module: nn.Module, reads: list[str]) -> Iterator[None]:
    """Every module's ``training`` flag replaced by a :class:`_ModeFlag` for the duration, then put back."""
    saved = [(m, m.__dict__.get("training", True)) for m in module.modules()]
    try:
        for (m, value), (name, _) in zip(saved, module.named_modules()):
            m.__dict__["training"] = _ModeFlag(bool(value), reads, name)
        yield
    finally:
        for m, value in saved:
            m.__dict__["training"] = value


def _flat(value: object) -> list:
    out: list = []
    fx.node.map_aggregate(value, lambda v: out.append(v) or v)
    return out


def _trace_once(module: nn.Module, leaves: Collection[nn.Module]) -> tuple[nn.Module, fx.Graph] | str:
    tracer = LeafTracer(leaves)
    try:
        graph = tracer.trace(module, concrete_args=_concrete_args(module))
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported, not raised
        return f"could not be traced by torch.fx: {first_line(exc)}"
    return tracer.root, graph


def module_stack(node: fx.Node) -> list[str]:
    """The paths of the modules ``node`` was traced inside, outermost first (fx's ``nn_module_stack``
    keys can carry a call count, ``dropout@1``; its values hold the paths)."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def outside_modules(
    root: nn.Module, gm: fx.GraphModule, region_nodes: Iterable[fx.Node], prefix: str = ""
) -> list[nn.Module]:
    """The outermost modules of ``root`` that ``gm`` was traced *through* and that hold no region node
    (so they can be leaves). ``prefix``: the traced block's path inside ``root`` ("" for ``root`` itself).
    """
    holding: set[str] = set()
    for node in region_nodes:
        paths = module_stack(node) + ([str(node.target)] if node.op == "call_module" else [])
        for path in paths:
            parts = path.split(".")
            holding.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    leaf_calls = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    through = {p for n in gm.graph.nodes for p in module_stack(n)} - leaf_calls
    through = {p for p in through if p.startswith(prefix + ".")} if prefix else through
    outside = sorted(p for p in through if p not in holding)
    top = [p for p in outside if not any(p.startswith(q + ".") for q in outside)]
    return [root.get_submodule(p) for p in top]

"""Step 1 of 3: trace a sub-block into an fx graph that the matcher can read.

Why a custom tracer: the matcher reasons about *projections*, so anything that behaves as a linear
layer must stay one node (``call_module``) instead of dissolving into ``F.linear`` plus adapter
arithmetic. That keeps PEFT LoRA layers (which do not trace symbolically at all) and transformers'
``Conv1D`` (GPT-2) visible as single projections. Everything else is traced through, so custom
activation modules become the element-wise ops they are made of.

Tracing happens per sub-block, never per model: whole transformers decoder layers do not trace with
``torch.fx`` (cache objects, data-dependent control flow), their MLPs do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

__all__ = ["LeafTracer", "conv1d_type", "TraceResult", "is_linear_like", "linear_dims", "trace"]


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
    is also token-wise).
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


class LeafTracer(fx.Tracer):
    """``fx.Tracer`` that keeps linear-like modules (and torch.nn's own modules) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_linear_like(m) or super().is_leaf_module(m, module_qualified_name)


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


def trace(module: nn.Module) -> TraceResult:
    """Trace ``module.forward`` with :class:`LeafTracer`; never raises for untraceable code.

    Every required argument becomes a placeholder (``BloomMLP.forward(hidden, residual)``); optional
    arguments are fixed to their defaults, so the rewritten forward accepts the required ones only.
    """
    params = list(inspect.signature(module.forward).parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return TraceResult(None, "forward takes no required argument; fxtile traces blocks called with their input")
    first = _trace_once(module)
    if isinstance(first, str):
        return TraceResult(None, first)
    modes = {m: m.training for m in module.modules()}
    try:  # fx bakes `self.training` into the graph: a mode-dependent trace cannot serve both modes
        module.train(not module.training)
        other = _trace_once(module)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if isinstance(other, str) or other.code != first.code:
        return TraceResult(
            None, "its traced code depends on self.training (e.g. F.dropout(..., training=self.training)), "
            "so one graph cannot serve both train and eval mode; use nn.Dropout modules instead"
        )
    return TraceResult(first)


def _trace_once(module: nn.Module) -> fx.GraphModule | str:
    tracer = LeafTracer()
    try:
        graph = tracer.trace(module, concrete_args=_concrete_args(module))
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported, not raised
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"could not be traced by torch.fx: {type(exc).__name__}: {first_line[:200]}"
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)

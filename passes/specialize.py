"""Trace a block per call signature, with the parts that do not trace kept as opaque leaves.

Why: many layers hold their feed-forward compute inline (``fc2(act(fc1(h)))`` in a BART/OPT decoder
layer's own ``forward``, or BERT's ``intermediate``/``output`` pair called from the layer) next to
attention code that torch.fx cannot trace (caches, ``**kwargs``, optional inputs tested with
``is None``). Tracing such a layer is still sound if

* the arguments that decide its control flow are *concrete*: every non-tensor argument (``None``,
  flags, numbers, strings) is baked into the graph, and the graph is used only for calls whose
  non-tensor arguments are the same (the *key* of a call); tensors, also inside tuples and lists
  (``position_embeddings=(cos, sin)``), become placeholders;
* a submodule whose own code does not trace is called as one opaque node (a *leaf*): the tracer
  retries with the innermost failing submodule as a leaf, a few times at most.

A call with an argument that is neither (a cache object, a dict) gets no graph: the caller falls back
to the block's original forward. Nothing here decides what is tiled; ``passes.match`` does, on the
graph this returns.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.fx as fx
from torch import nn

from .trace import LeafTracer

__all__ = ["CallSpec", "call_spec", "default_spec", "trace_call"]

_MAX_LEAVES = 8
_ATOMS = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class CallSpec:
    """How one call binds: a hashable ``key`` (the concrete part) and where its tensors go."""

    key: Hashable
    layout: tuple  # per bound argument: (name, kind, structure)


def _leaf_layout(value: Any, tensors: list) -> Any:
    """Replace tensors in ``value`` (a tensor, atom, or tuple/list of those) by slots; None if unsupported."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T",)
    if isinstance(value, _ATOMS):
        return ("C", value)
    if isinstance(value, (tuple, list)):
        parts = [_leaf_layout(v, tensors) for v in value]
        if any(p is None for p in parts):
            return None
        return ("S", type(value).__name__, tuple(parts))
    return None


def call_spec(signature: inspect.Signature, training: bool, args: tuple, kwargs: dict) -> tuple[CallSpec, list] | None:
    """The call's spec and its tensors in order, or None when an argument cannot be keyed."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    tensors: list = []
    layout = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            items = []
            for key in sorted(value):
                sub = _leaf_layout(value[key], tensors)
                if sub is None:
                    return None
                items.append((key, sub))
            layout.append((name, "**", tuple(items)))
            continue
        if kind is inspect.Parameter.VAR_POSITIONAL:
            sub = _leaf_layout(tuple(value), tensors)
        else:
            sub = _leaf_layout(value, tensors)
        if sub is None:
            return None
        tag = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.POSITIONAL_ONLY: "/"}.get(kind, "")
        layout.append((name, tag, sub))
    layout_t = tuple(layout)
    return CallSpec((training, layout_t), layout_t), tensors


def default_spec(module: nn.Module) -> tuple[CallSpec, list] | None:
    """The spec of ``module(x, ...)``: a tensor for each required argument, every optional one at
    its default (what ``fxtile.find`` reports before the block is ever called)."""
    signature = inspect.signature(module.forward)
    required = [p for p in signature.parameters.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return None
    return call_spec(signature, module.training, tuple(torch.empty(0) for _ in required), {})


def _rebuild(sub: Any, tensors: list) -> Any:
    tag = sub[0]
    if tag == "T":
        return tensors.pop(0)
    if tag == "C":
        return sub[1]
    values = [_rebuild(s, tensors) for s in sub[2]]
    return tuple(values) if sub[1] == "tuple" else list(values)


def _count(sub: Any) -> int:
    if sub[0] == "T":
        return 1
    if sub[0] == "C":
        return 0
    return sum(_count(s) for s in sub[2])


class _Root(nn.Module):
    """Calls ``inner``'s forward with the concrete arguments of one spec; its tensors are inputs."""

    def __init__(self, inner: nn.Module, forward: Callable, layout: tuple) -> None:
        super().__init__()
        self.inner = inner
        self._forward = forward
        self._layout = layout

    def call(self, tensors: tuple) -> Any:
        pool = list(tensors)
        args, kwargs = [], {}
        for name, kind, sub in self._layout:
            if kind == "**":
                kwargs.update({key: _rebuild(s, pool) for key, s in sub})
            elif kind == "*":
                args.extend(_rebuild(sub, pool))
            elif kind == "/":  # positional-only: cannot go by name
                args.append(_rebuild(sub, pool))
            else:
                kwargs[name] = _rebuild(sub, pool)
        return self._forward(self.inner, *args, **kwargs)


def _root_type(count: int) -> type:
    names = [f"t{i}" for i in range(count)]
    source = f"def forward(self{''.join(', ' + n for n in names)}):\n    return self.call(({''.join(n + ', ' for n in names)}))\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - a fixed-arity forward, so fx makes one placeholder per tensor
    return type(f"_Root{count}", (_Root,), {"forward": namespace["forward"]})


class _LeafOnFailure(LeafTracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module whose code failed
                self.failed = self.path_of_module(m)
            raise


def trace_call(module: nn.Module, spec: CallSpec) -> fx.GraphModule | str:
    """The graph of ``module`` called as ``spec`` says (inputs: its tensors in order), or why not."""
    forward = type(module).forward
    count = sum(_count(sub) if kind != "**" else sum(_count(s) for _, s in sub) for _, kind, sub in spec.layout)
    root = _root_type(count)(module, forward, spec.layout)
    leaves: set[str] = set()
    modes = {m: m.training for m in module.modules()}
    reason = "not traced"
    try:
        module.train(spec.key[0])
        for _ in range(_MAX_LEAVES + 1):
            tracer = _LeafOnFailure(leaves)
            try:
                graph = tracer.trace(root)
            except Exception as exc:  # noqa: BLE001 - retried with a leaf, or reported
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
                failed = tracer.failed
                if failed is None or failed in ("", "inner") or failed in leaves:
                    return f"could not be traced by torch.fx: {reason}"
                leaves.add(failed)
                continue
            return fx.GraphModule(root, graph, type(module).__name__)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return f"could not be traced by torch.fx with {_MAX_LEAVES} opaque submodules: {reason}"

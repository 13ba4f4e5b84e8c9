"""Trace a block per call signature, with the parts that do not trace kept as opaque leaves.

Why: many layers hold their feed-forward compute inline (``fc2(act(fc1(h)))`` in a BART/OPT decoder
layer's own ``forward``, BERT's ``intermediate``/``output`` pair called from the layer, the head and loss
of a causal LM) next to code torch.fx cannot trace (caches, ``**kwargs``, optional inputs tested with
``is None``). Tracing such a layer is still sound if

* the arguments that decide its control flow are *concrete*: non-tensor atoms (``None``, flags,
  numbers, strings, dtypes) are baked into the graph, and the graph serves only calls whose atoms,
  train/eval modes (of every module in the block) and grad mode are the same: the call's *key*;
* tensors, also inside tuples and lists (``position_embeddings=(cos, sin)``), become inputs;
* any other object (a transformers ``Cache``) becomes an input too, keyed by its **type**, provided it
  only flows into opaque parts: its placeholder may only be passed to leaf modules (or returned). Its
  proxy reports the object's class to ``isinstance``, so ``isinstance(cache, Cache)`` takes the branch
  the real call takes; anything else the traced code does with it refuses the graph;
* a submodule whose own code does not trace is called as one opaque node (a *leaf*): the tracer
  retries with the innermost failing submodule as a leaf, a few times at most.

The graph returns the call's output flattened with ``torch.utils._pytree`` (a transformers
``ModelOutput`` is a pytree node), and the caller rebuilds it with the recorded spec. Nothing here
decides what is tiled; ``passes.match`` does, on the graph this returns.
"""

from __future__ import annotations

import enum
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Collection, Hashable, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .modes import modes_of, preserved_modes

from .trace import LeafTracer, first_line, graph_module

__all__ = ["Binder", "CallSpec", "ROOT", "Traced", "bound_signature", "call_spec", "default_spec", "output_structures",
           "probe_specs", "trace_call"]

_MAX_LEAVES = 8
_ATOMS = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)
ROOT = "inner"  # the traced block's path inside the root that calls it


@dataclass(frozen=True)
class CallSpec:
    """How one call binds: a hashable ``key`` and where its inputs (tensors and objects) go."""

    key: Hashable
    layout: tuple  # per bound argument: (name, kind, structure)
    objects: tuple[tuple[int, type], ...]  # (input index, type) of every object input
    device_type: str = "cpu"  # of the call's tensors: code may branch on it (``x.device.type == "cpu"``)


def _leaf_layout(value: Any, inputs: list, objects: list) -> Any:
    """Replace tensors and objects in ``value`` by slots; atoms stay as they are."""
    if isinstance(value, torch.Tensor):
        inputs.append(value)
        return ("T",)
    if isinstance(value, _ATOMS):
        return ("C", value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return ("S", type(value).__name__, tuple(_leaf_layout(v, inputs, objects) for v in value))
    objects.append((len(inputs), type(value)))
    inputs.append(value)
    return ("O", type(value))


@dataclass(frozen=True)
class Binder:
    """A forward's parameters, read once from its signature, so binding a call is plain Python (which
    dynamo traces under ``torch.compile(fullgraph=True)``; ``inspect.Signature.bind`` it does not)."""

    params: tuple[tuple[str, Any, Any], ...]  # (name, kind, default) in signature order
    variadic: bool  # it has a *args: the parameters before it bind by position only

    @staticmethod
    def of(signature: inspect.Signature) -> "Binder":
        params = tuple((p.name, p.kind, p.default) for p in signature.parameters.values())
        return Binder(params, any(kind is inspect.Parameter.VAR_POSITIONAL for _, kind, _ in params))

    def bind(self, args: tuple, kwargs: dict) -> list[tuple[str, Any, Any]] | str:
        """``(name, kind, value)`` per parameter in signature order, defaults applied, as ``Signature.bind``
        + ``apply_defaults``; or why the call does not bind."""
        empty, P = inspect.Parameter.empty, inspect.Parameter
        pending, named, bound = list(args), dict(kwargs), []
        for name, kind, default in self.params:
            if kind is P.VAR_POSITIONAL:
                value, pending = tuple(pending), []
            elif kind is P.VAR_KEYWORD:
                value, named = named, {}
            elif kind is not P.KEYWORD_ONLY and pending:
                if name in named:
                    return f"multiple values for argument {name!r}"
                value = pending.pop(0)
            elif kind is not P.POSITIONAL_ONLY and name in named:
                value = named.pop(name)
            elif default is not empty:
                value = default
            else:
                return f"missing a required argument: {name!r}"
            bound.append((name, kind, value))
        if pending or named:
            return f"unexpected arguments: {len(pending)} positional, {sorted(named)}"
        return bound


def call_spec(binder: Binder, module: nn.Module, args: tuple, kwargs: dict) -> tuple[CallSpec, list] | str:
    """The call's spec and its inputs in order, or why it cannot be keyed."""
    bound = binder.bind(args, kwargs)
    if isinstance(bound, str):
        return f"its arguments do not bind to the forward ({bound})"
    inputs: list = []
    objects: list = []
    layout = []
    for name, kind, value in bound:
        if kind is inspect.Parameter.VAR_KEYWORD:
            items = tuple((key, _leaf_layout(value[key], inputs, objects)) for key in sorted(value))
            layout.append((name, "**", items))
            continue
        sub = _leaf_layout(tuple(value) if kind is inspect.Parameter.VAR_POSITIONAL else value, inputs, objects)
        tag = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.POSITIONAL_ONLY: "/"}.get(kind, "")
        if binder.variadic and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            tag = "/"  # before a *args: only by position
        layout.append((name, tag, sub))
    layout_t = tuple(layout)
    try:
        device_type = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
        key = (modes_of(module), torch.is_grad_enabled(), device_type, layout_t)
        if not torch.compiler.is_compiling():  # dynamo (torch 2.11) cannot trace hash() of a tuple
            hash(key)
    except TypeError:
        return "an argument holds an unhashable constant"
    return CallSpec(key, layout_t, tuple(objects), device_type), inputs


def _placeholder(module: nn.Module) -> torch.Tensor:
    """A stand-in tensor for a planned call, on the module's device (the call's key holds its device type)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.empty(0, device="cpu" if device.type == "meta" else device)


def bound_signature(module: nn.Module, forward: Callable | None = None) -> inspect.Signature:
    """The signature of ``forward`` (the class's ``forward`` by default) bound to ``module``: no ``self``."""
    return inspect.signature(types.MethodType(forward or type(module).forward, module))


def default_spec(module: nn.Module, forward: Callable | None = None) -> tuple[CallSpec, list] | None:
    """The spec of ``module(x, ...)``: a tensor for each required argument, every optional one at its
    default, in the module's current modes with grad enabled (what ``fxtile.find`` reports)."""
    signature = bound_signature(module, forward)
    params = list(signature.parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return None
    with torch.enable_grad():
        found = call_spec(Binder.of(signature), module, tuple(_placeholder(module) for _ in required), {})
    return None if isinstance(found, str) else found


def probe_specs(module: nn.Module, forward: Callable | None = None) -> list[tuple[CallSpec, list]]:
    """The calls that pass one more optional argument (default ``None``) as a tensor than the default
    call does, the first argument included when it is optional (``model(input_ids, labels=...)``): how a
    head's loss is found before any training call, by the graph it gives, not by the argument's name."""
    signature = bound_signature(module, forward)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_POSITIONAL and p.kind is not p.VAR_KEYWORD]
    required = [p for p in params if p.default is inspect.Parameter.empty]
    if any(p.kind is p.KEYWORD_ONLY for p in required):
        return []
    args = tuple(_placeholder(module) for p in required if p.kind is not p.KEYWORD_ONLY)
    base = {} if required or not params else {params[0].name: _placeholder(module)}
    specs, binder = [], Binder.of(signature)
    with torch.enable_grad():
        for p in params:
            if p.default is not None or p.name in base or p.kind is p.POSITIONAL_ONLY:
                continue
            found = call_spec(binder, module, args, {**base, p.name: _placeholder(module)})
            if not isinstance(found, str):
                specs.append(found)
    return specs


def _rebuild(sub: Any, pool: list) -> Any:
    tag = sub[0]
    if tag in ("T", "O"):
        return pool.pop(0)
    if tag == "C":
        return sub[1]
    values = [_rebuild(s, pool) for s in sub[2]]
    return tuple(values) if sub[1] == "tuple" else list(values)


def _count(sub: Any) -> int:
    if sub[0] in ("T", "O"):
        return 1
    if sub[0] == "C":
        return 0
    return sum(_count(s) for s in sub[2])


class _Spec:
    """Where :class:`_Root` keeps its output's TreeSpec. A copy holds the same spec (it is immutable), not a
    deep copy of it: deep-copying a TreeSpec warns from inside torch 2.13 ("isinstance(treespec, LeafSpec) is
    deprecated"), and every deep copy of a tiled model copies its roots."""

    def __init__(self, spec: pytree.TreeSpec | None = None) -> None:
        self.spec = spec

    def __deepcopy__(self, memo: dict) -> "_Spec":
        return _Spec(self.spec)


class _Root(nn.Module):
    """Calls ``inner``'s forward with the concrete arguments of one spec; its inputs are placeholders."""

    def __init__(self, inner: nn.Module, forward: Callable, layout: tuple) -> None:
        super().__init__()
        self.inner = inner
        self._forward = forward
        self._layout = layout
        self._out = _Spec()

    @property
    def out_spec(self) -> pytree.TreeSpec | None:
        return self._out.spec

    def call(self, values: tuple) -> Any:
        pool = list(values)
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
        leaves, self._out.spec = pytree.tree_flatten(self._forward(self.inner, *args, **kwargs))
        return leaves


def _root_type(count: int) -> type:
    names = [f"t{i}" for i in range(count)]
    source = f"def forward(self{''.join(', ' + n for n in names)}):\n    return self.call(({''.join(n + ', ' for n in names)}))\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - a fixed-arity forward, so fx makes one placeholder per input
    return type(f"_Root{count}", (_Root,), {"forward": namespace["forward"]})


class _ObjectProxy(fx.Proxy):
    """The proxy of an object input: ``isinstance`` sees the real object's class."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, cls: type) -> None:
        super().__init__(node, tracer)
        self.__dict__["_fxtile_cls"] = cls

    @property
    def __class__(self):  # noqa: D105 - what isinstance() consults after type()
        return self.__dict__["_fxtile_cls"]


class _DeviceAttribute(fx.proxy.Attribute):
    """``x.device`` while tracing: its ``type`` is the call's device type (part of the call's key), so code
    that branches on it (``if x.device.type == "cpu"``) takes the branch the call takes; the device itself
    stays symbolic (its index, a ``device=`` argument)."""

    def __init__(self, root: fx.Proxy, device_type: str) -> None:
        super().__init__(root, "device")
        self.__dict__["_fxtile_device_type"] = device_type

    @property
    def type(self) -> str:
        return self.__dict__["_fxtile_device_type"]


class _CallProxy(fx.Proxy):
    """The proxies of a per-call trace: ``.device`` answers with the call's device type (``_DeviceAttribute``)."""

    def __getattr__(self, k: str):
        if k == "device":
            return _DeviceAttribute(self, self.tracer.device_type)
        return super().__getattr__(k)


class _LeafOnFailure(LeafTracer):
    def __init__(self, leaves: Collection[nn.Module], objects: dict[str, type],
                 structures: Mapping[nn.Module, pytree.TreeSpec], device_type: str = "cpu") -> None:
        super().__init__(leaves)
        self.objects = objects
        self.structures = structures
        self.device_type = device_type
        self.failed: str | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "placeholder" and node.target in self.objects:
            return _ObjectProxy(node, self, self.objects[node.target])
        return _CallProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module whose code failed
                self.failed = self.path_of_module(m)
            raise
        tree = self.structures.get(m)
        if tree is None or not isinstance(out, fx.Proxy):
            return out
        flat = self.create_proxy("call_function", pytree.tree_leaves, (out,), {})
        try:  # the leaf's real output type, holding one proxy per leaf of it
            return pytree.tree_unflatten([flat[i] for i in range(tree.num_leaves)], tree)
        except Exception:  # noqa: BLE001 - a type that will not hold proxies: the plain proxy, as before
            return out


def output_structures(module: nn.Module, spec: CallSpec, forward: Callable | None = None) -> dict[nn.Module, pytree.TreeSpec]:
    """The structure of every submodule's output that is not one tensor (a transformers ``ModelOutput``, a
    tuple), learned from one tiny concrete call of ``module`` as ``spec`` says (each tensor input a
    ``1 x 2`` block of zero indices, as token ids and labels are; no gradients; on its parameters' device,
    the meta device included). Why: a submodule kept opaque returns one proxy, so code that branches on
    its output's type (``isinstance(outputs.router_logits, tuple)`` in a MoE causal LM's aux loss) takes
    the wrong branch or fails; given these, the opaque call returns its real output type holding proxies.
    Empty where the call does not run (inputs that are not token ids, an object input such as a cache)."""
    if spec.objects:
        return {}
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    count = sum(_count(sub) if kind != "**" else sum(_count(s) for _, s in sub) for _, kind, sub in spec.layout)
    root = _root_type(count)(module, forward or type(module).forward, spec.layout)
    found: dict[nn.Module, pytree.TreeSpec] = {}

    def record(m: nn.Module, args, out) -> None:
        leaves, tree = pytree.tree_flatten(out)
        if not isinstance(out, torch.Tensor) and sum(isinstance(v, torch.Tensor) for v in leaves) >= 2:
            found[m] = tree

    handles = [m.register_forward_hook(record) for m in module.modules() if m is not module]
    try:
        with torch.no_grad(), preserved_modes(module), torch.random.fork_rng(devices=[]):
            root.call(tuple(torch.zeros((1, 2), dtype=torch.long, device=device) for _ in range(count)))
    except Exception:  # noqa: BLE001 - a call these inputs do not fit: no structures, tracing as before
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass
class Traced:
    """A block's graph for one call spec: ``root`` holds it at ``ROOT``; ``out_spec`` rebuilds the output."""

    graph_module: fx.GraphModule
    root: nn.Module
    out_spec: pytree.TreeSpec
    leaves: frozenset[nn.Module]  # the modules kept opaque (given, plus those that failed to trace)


def _objects_stay_opaque(gm: fx.GraphModule, objects: dict[str, type]) -> str | None:
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in objects:
            continue
        used = [u for u in node.users if u.op not in ("call_module", "output")]
        if used:
            return (f"its {objects[node.target].__name__} argument is used by traced code ({used[0].format_node()}), "
                    "not only passed to opaque submodules")
    return None


def trace_call(
    module: nn.Module, spec: CallSpec, leaves: Collection[nn.Module] = (), forward: Callable | None = None,
    structures: Mapping[nn.Module, pytree.TreeSpec] | None = None,
) -> Traced | str:
    """The graph of ``module`` called as ``spec`` says (inputs: its tensors and objects in order), or why not.
    ``structures``: the output types of opaque submodules (:func:`output_structures`)."""
    forward = forward or type(module).forward
    count = sum(_count(sub) if kind != "**" else sum(_count(s) for _, s in sub) for _, kind, sub in spec.layout)
    root = _root_type(count)(module, forward, spec.layout)
    objects = {f"t{index}": cls for index, cls in spec.objects}
    kept = set(leaves)
    reason = "not traced"
    for _ in range(_MAX_LEAVES + 1):
        tracer = _LeafOnFailure(kept, objects, structures or {}, spec.device_type)
        try:
            graph = tracer.trace(root)
        except Exception as exc:  # noqa: BLE001 - retried with a leaf, or reported
            reason = first_line(exc, 160)
            failed = tracer.failed
            if failed is None or failed in ("", ROOT):
                return f"could not be traced by torch.fx: {reason}"
            sub = root.get_submodule(failed)
            if sub in kept:
                return f"could not be traced by torch.fx: {reason}"
            kept.add(sub)
            continue
        gm = graph_module(root, graph, type(module).__name__)
        refused = _objects_stay_opaque(gm, objects)
        if refused is not None:
            return refused
        assert root.out_spec is not None
        return Traced(gm, root, root.out_spec, frozenset(kept))
    return f"could not be traced by torch.fx with {_MAX_LEAVES} opaque submodules: {reason}"

"""Call time: the forward installed on a block traced per call signature, and the graphs it keeps.

A block whose forward does not trace as one graph (a BART/OPT decoder layer with its MLP inline, a causal
LM's head and loss) is traced once per call signature (``fxtile.passes.specialize``: non-tensor arguments,
train/eval modes and grad mode are the key). What runs on every forward lives here, apart from the plan
and build steps that run once at ``transform``: bind the call, look its key up in a small LRU of graphs,
build a graph for a new key (trace, match, build at call time), or run the class's own code and say why.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from . import memory
from .build import Verdicts, tile_graph
from .state import STATE
from .passes.match import Untraced, match_block
from .passes.specialize import ROOT, Binder, CallSpec, call_spec, trace_call
from .policy import ShardPolicy
from .region import TiledRegion

__all__ = ["CACHE_SIZE", "Entry", "PerCall", "per_call_forward"]

CACHE_SIZE = 32  # call signatures remembered per block (least recently used first out)


class _SpecCache(OrderedDict):
    """Call key -> (graph, output spec) or the reason it runs untiled. Not copied by deepcopy: a copy
    traces again on its first calls, so no graph of the copy points at the original's modules."""

    def __deepcopy__(self, memo: dict) -> "_SpecCache":
        return _SpecCache()


@dataclass
class Entry:
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
    without labels, or without gradients, computes no loss to tile: nothing to say, unless a training call
    returns full logits, see :meth:`PerCall.full_logits`)."""

    reason: str
    warn: bool = True
    without_loss: bool = False  # a loss head's block called without its loss (no labels)


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
    checked: Verdicts = field(default_factory=Verdicts)  # the transform's verdicts and profiles, by structure
    structures: dict = field(default_factory=dict)  # opaque submodules' output types (see output_structures)
    cache: _SpecCache = field(default_factory=_SpecCache)
    untiled_calls: int = 0
    warned: bool = False
    logits_warned: bool = False

    def entry(self, module: nn.Module, spec: CallSpec) -> Union[Entry, _Untiled]:
        found = self.cache.get(spec.key)
        if found is None and torch.compiler.is_compiling():
            raise RuntimeError(
                f"fxtile: {self.path or '(root)'} is traced per call signature and meets a new one inside torch.compile, "
                "which cannot trace it; run one step eagerly before compiling (each call signature is traced once)"
            )
        if found is None:
            found = self._build(module, spec)
            self.cache[spec.key] = found
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(spec.key)
        return found

    def _build(self, module: nn.Module, spec: CallSpec) -> Union[Entry, _Untiled]:
        with memory.uncounted():  # one-time work, no part of the step a counter may be measuring (fxtile.planner)
            return self._built(module, spec)

    def _built(self, module: nn.Module, spec: CallSpec) -> Union[Entry, _Untiled]:
        result = match_block(lambda leaves: trace_call(module, spec, leaves, self.original, self.structures), self.leaves,
                             self.patterns, lambda t: t.root, ROOT)
        if isinstance(result, Untraced):
            return _Untiled(result.reason)
        traced, candidates, rejections = result.traced, result.candidates, result.rejections
        if not candidates:
            expected = not rejections and all(p.nests for p in self.patterns)  # a head called without a loss
            reason = rejections[0].reason if rejections else "no region in the graph of this call"
            return _Untiled(reason, warn=not expected, without_loss=expected)
        _, regions, skipped = tile_graph(self.path, traced.graph_module, candidates, self.policy, self.verify,
                                         traced.root, self.checked, ROOT, self.attr)
        if not regions:
            return _Untiled("; ".join(s.reason for s in skipped))
        return Entry(traced.graph_module, traced.root, traced.out_spec, regions)

    def entries(self) -> list[Entry]:
        """Every call graph built so far."""
        return [e for e in self.cache.values() if isinstance(e, Entry)]

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

    def full_logits(self, module: nn.Module, output) -> None:
        """Warn once when a training call of a loss head's block, made without labels, returns logits for
        ``policy.min_tokens`` rows or more that backward will need: the flow of DeepSpeed's and Accelerate's
        sequence-parallel examples (logits out of the model, loss computed outside it), where the loss head
        cannot be tiled and the full ``rows x vocab`` logits (and their fp32 copy in the loss) are held."""
        if self.logits_warned or not (module.training and torch.is_grad_enabled()):
            return
        grads = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad and t.dim() >= 2]
        if not grads:
            return
        logits = max(grads, key=torch.Tensor.numel)
        rows = logits.numel() // max(1, logits.shape[-1])
        if rows < self.policy.min_tokens:
            return
        self.logits_warned = True
        warnings.warn(
            f"fxtile: {self.path or '(root)'} was called in training without labels and returned {rows} x "
            f"{logits.shape[-1]} logits: a loss computed from them outside the model is not tiled. Pass the labels "
            "to the model (labels=...; under sequence parallelism labels=shift_labels, shift_labels=shift_labels) so that "
            "its loss head runs tiled.",
            stacklevel=4)


def per_call_forward(self: nn.Module, *args, **kwargs):
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
        output = per_call.original(self, *args, **kwargs)
        if entry.without_loss:
            per_call.full_logits(self, output)
        return output
    return entry(inputs)

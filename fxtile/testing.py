"""The documented seam for tests and diagnostics: what the tiled op really ran.

``fxtile.find`` says what was matched; these functions say what happened at run time, from the op's
own counters (incremented inside its kernels, so they count compiled runs too):

* :func:`shard_counts` - per tiled block, the shards its regions ran forward and recomputed backward;
* :func:`untiled_calls` - per block traced per call, the calls that ran the original code instead;
* :func:`call_graphs` - per block traced per call, how many call signatures got a tiled graph;
* :func:`tiled_tensors` - every tensor a tiled region reads (what a coverage oracle checks);
* :func:`fast_paths` - per region, whether it has the explicit-matmul plan;
* :func:`generic_kernel` - a context in which a model's regions take the generic kernel;
* :func:`live_regions` - how many regions exist in this process (they die with their models).

Not part of the stable API.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from . import op
from .api import tile_state
from fxtile.passes.trace import get_path

__all__ = ["ShardCount", "call_graphs", "fast_paths", "generic_kernel", "live_regions", "shard_counts", "tiled_tensors", "untiled_calls"]


@dataclass(frozen=True)
class ShardCount:
    forward_calls: int
    forward_shards: int
    backward_calls: int
    backward_shards: int


def tiled_tensors(model: nn.Module) -> list:
    """Every tensor a tiled region reads (the default call's graph and every call graph built since)."""
    found = []
    for _, module in model.named_modules():
        state = tile_state(module)
        if state is None:
            continue
        if state.per_call is None:
            found += [get_path(module, p) for r in state.regions for p in r.tensor_paths]
        else:
            found += [get_path(e.root, p) for e in state.per_call.entries() for r in e.regions for p in r.tensor_paths]
    return found


def _block_regions(module: nn.Module) -> list:
    state = tile_state(module)
    if state is None:
        return []
    regions = list(state.regions)
    if state.per_call is not None:
        regions += [r for r in state.per_call.regions() if r not in regions]
    return regions


def shard_counts(model: nn.Module) -> dict[str, ShardCount]:
    """Block path -> what the op ran for its regions so far (every call graph of a per-call block). A deep
    copy of a tiled model shares its original's regions (structure only), and so their counters."""
    counts = {}
    for path, module in model.named_modules():
        regions = _block_regions(module)
        if regions:
            c = [r.region.counters for r in regions]
            counts[path] = ShardCount(sum(x.forward_calls for x in c), sum(x.forward_shards for x in c),
                                      sum(x.backward_calls for x in c), sum(x.backward_shards for x in c))
    return counts


def untiled_calls(model: nn.Module) -> dict[str, int]:
    """Block path -> calls of a block traced per call that ran its original code (each was warned about)."""
    return {path: tile_state(m).per_call.untiled_calls for path, m in model.named_modules()
            if tile_state(m) is not None and tile_state(m).per_call is not None}


def call_graphs(model: nn.Module) -> dict[str, int]:
    """Block path -> tiled call graphs a block traced per call holds (one per call signature seen)."""
    return {path: len(tile_state(m).per_call.entries()) for path, m in model.named_modules()
            if tile_state(m) is not None and tile_state(m).per_call is not None}


def fast_paths(model: nn.Module) -> list[bool]:
    """For each tiled region (module order): does it have the explicit-matmul plan?"""
    return [r.region.fast is not None for _, m in model.named_modules() for r in _block_regions(m)]


@contextlib.contextmanager
def generic_kernel(model: nn.Module) -> Iterator[None]:
    """Within this context the model's regions take the generic kernel (to compare the two)."""
    regions = [r.region for _, m in model.named_modules() for r in _block_regions(m)]
    saved = [r.fast for r in regions]
    try:
        for r in regions:
            r.fast = None
        yield
    finally:
        for r, fast in zip(regions, saved):
            r.fast = fast


def live_regions() -> int:
    return op.live_regions()

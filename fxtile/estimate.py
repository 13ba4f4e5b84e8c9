"""How much activation memory a tiled region (an MLP, or the output projection and its loss) takes in
training, untiled and tiled, at a given number of tokens.

What is counted (per MLP layer, in bytes at the given dtype): the tensors the MLP adds while it is
trained, i.e. what autograd keeps from its forward until its backward (``kept``) and the highest point
of its forward and backward (``peak``: ``kept`` plus the gradients and recomputed shards in flight).
Not counted, because they are the same with and without tiling: the weights and their ``.grad``, the
MLP's input (the tiled op keeps it too), its output and the gradient arriving at its output.

Why it is computed by replaying rather than by a formula: what autograd keeps depends on how each
activation is written (``F.silu`` keeps one tensor, GPT-2's tanh-GELU written as Python arithmetic
keeps four) and the tiled op's backward has its own working set (the recomputed shard, the input
gradient it fills, fp32 weight-gradient accumulators for bf16/fp16 weights). So the matched region's
own code is run, forward and backward, on the **meta device** at the real size (shapes only: no
memory, milliseconds per layer), and every tensor storage it creates is counted from allocation
until autograd frees it (:mod:`fxtile.memory`, which also gives the policy its per-call profile). The
untiled side runs the region under autograd; the tiled side runs the op's own forward and backward
kernels (``fxtile.op``) shard by shard, with the shard count and the precision of the weight-gradient
sums that ``shards="auto"`` picks at that many tokens (one shard: the call runs untiled, because tiling
would not lower its peak).

For a SiLU-gated MLP (Llama) with ``N`` tokens, intermediate size ``I`` and ``b`` bytes per element
this gives ``kept = 4·N·I·b`` (gate, act, up, product) and ``peak = 6·N·I·b`` untiled (in the
product's backward: gate, act, up and three gradients). Tiled, the peak is the op's input-gradient
buffer plus a few ``(N/s)·I`` shard tensors plus the weight-gradient workspace; how many shard tensors
depends on the op's kernel (the explicit-matmul one in ``fxtile/kernels/mlp.py`` or the generic
``torch.func.vjp`` one), so the kernel is replayed rather than summarised in a formula that would go stale.
``tests/test_cli.py`` checks these numbers against the peak resident memory measured on CPU.

A loss region is replayed the same way: untiled, the logits, their fp32 copy, the log-softmax and their
gradients (about ``4·N·V`` elements for transformers' ``ForCausalLMLoss``); tiled, the op's forward
kernel, which computes the input and weight gradients of one shard of logits at a time and keeps them
until backward (the input gradient ``N·H`` and the head weight's gradient ``V·H``).

The whole model's number is :func:`total_peak`: backward runs the layers in reverse, so while layer
``i`` is backpropagated, every earlier layer still keeps its ``kept`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fxtile.passes.trace import get_path

from . import memory
from .api import tiled_regions
from .kernels.shards import shard_bounds
from .region import TiledRegion

__all__ = ["MlpMemory", "mlp_memory", "total_peak"]


@dataclass(frozen=True)
class MlpMemory:
    """Activation memory of one tiled MLP region at ``tokens`` rows, untiled (before) and tiled (after)."""

    path: str
    nodes: tuple[str, ...]  # the region's fx nodes, as in ``fxtile.Match.nodes``
    tokens: int
    shards: int  # shards the region runs in at ``tokens`` rows (1: it runs untiled, tiling would not pay)
    kept_before: int  # kept from forward to backward
    peak_before: int  # highest point of forward + backward
    kept_after: int
    peak_after: int
    weight_grad_workspace: int  # part of ``peak_after``: the op's weight-gradient sums and per-shard grads
                                # (weight-sized, not token-sized: fp32 sums for bf16/fp16 weights)
    fp32_sums: bool = True  # how the tiled call sums low-precision weight gradients at this size


def _replay(owner: nn.Module, region: TiledRegion, tokens: int, dtype: Optional[torch.dtype]) -> tuple:
    """(shards, kept_before, peak_before, kept_after, peak_after, workspace, fp32) for one region, on meta."""
    live = [get_path(owner, name) for name in region.tensor_paths]
    modes = _training(region)
    tensors = memory.replay_tensors(live, "meta", dtype)
    profile = memory.profile(region.region, tensors, modes)
    plan = region.policy.plan(tokens, int(region.shards_for(tokens)), profile if not isinstance(profile, str) else None)
    shards = len(shard_bounds(tokens, plan.shards))  # the op's own clamping
    like = next(t for t in tensors if t.is_floating_point())
    kept_before, peak_before = memory.replay_untiled(region.region, memory.replay_rows(region.region, tokens, like),
                                                     memory.replay_tensors(live, "meta", dtype), modes)
    if shards == 1:  # the tiled call runs the region directly: nothing changes
        return shards, kept_before, peak_before, kept_before, peak_before, 0, plan.fp32_sums
    rows = memory.replay_rows(region.region, tokens, like)
    kept_after, peak_after = memory.replay_tiled(region.region, rows, memory.replay_tensors(live, "meta", dtype), modes,
                                                 shards, plan.fp32_sums)
    frozen = [t.detach() for t in memory.replay_tensors(live, "meta", dtype)]  # no weight gradients at all
    _, without = memory.replay_tiled(region.region, memory.replay_rows(region.region, tokens, like), frozen, modes,
                                     shards, plan.fp32_sums)
    return shards, kept_before, peak_before, kept_after, peak_after, max(0, peak_after - without), plan.fp32_sums


def _replay_bank(owner: nn.Module, region: TiledRegion, tokens: int, dtype: Optional[torch.dtype]) -> tuple:
    """The same for a routed expert bank, whose routing cannot replay on meta: measured on small real
    instances of its class and carried to its widths (:func:`fxtile.memory.scaled`), on any device."""
    live = [get_path(owner, name) for name in region.tensor_paths]
    modes = _training(region)
    tensors = memory.replay_tensors(live, "meta", dtype)
    terms = memory.bank_terms(region.region, tensors, modes)
    if isinstance(terms, str):
        raise RuntimeError(terms)
    profile = memory.profile_of(terms)
    plan = region.policy.plan(tokens, int(region.shards_for(tokens)), profile)
    shards = len(shard_bounds(tokens, plan.shards))
    found = memory.bank_replay(region.region, tensors, modes, tokens, shards, plan.fp32_sums)
    kept_before, peak_before = (max(0, round(v)) for v in found["untiled"])
    if shards == 1:
        return shards, kept_before, peak_before, kept_before, peak_before, 0, plan.fp32_sums
    kept_after, peak_after = (max(0, round(v)) for v in found["tiled"])
    workspace = max(0, peak_after - round(found["frozen"][1]))
    return shards, kept_before, peak_before, kept_after, peak_after, workspace, plan.fp32_sums


def _training(region: TiledRegion) -> list[bool]:
    """Every module of the region in train mode (the estimate is for training)."""
    return [True] * len(region.region.moded)


def mlp_memory(model: nn.Module, tokens: int, dtype: Optional[torch.dtype] = None) -> list[MlpMemory]:
    """Activation memory of every MLP ``fxtile.transform`` tiled in ``model``, at ``tokens`` rows.

    ``tokens`` is batch size times sequence length (the MLP sees every token as one row). ``dtype``
    is the training dtype of weights and activations (default: the model's own). Works on a model
    on any device, including ``meta``: only the regions' shapes are used. Layers of the same shape
    are replayed once. A block traced per call is replayed for its default call. A routed expert bank
    (three routed inputs: its routing cannot replay on meta) is replayed on small real instances of its
    class and carried to its widths (:func:`fxtile.memory.scaled`), with uniform routing over its experts.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int (batch size x sequence length), got {tokens!r}")
    cache: dict[tuple, tuple[int, ...]] = {}
    found = []
    regions = tiled_regions(model)
    for path, match, region, owner in sorted(regions, key=lambda r: r[2].region.loss is not None):  # loss last
        bank = region.region.loss is None and len(region.region.inputs) != 1  # an expert bank's routed inputs
        tensors = [get_path(owner, name) for name in region.tensor_paths]
        template = region.region.template
        key = (getattr(template, "code", type(template).__name__), region.policy,
               tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors))
        if key not in cache:
            cache[key] = (_replay_bank if bank else _replay)(owner, region, tokens, dtype)
        found.append(MlpMemory(path, match.nodes, tokens, *cache[key]))
    if not regions:
        raise ValueError(
            f"no tiled MLP in {type(model).__name__}: call fxtile.transform(model) first "
            "(fxtile.find(model).skipped says why a block was not tiled)"
        )
    return found


def total_peak(entries: list[MlpMemory], tiled: bool) -> int:
    """The MLPs' activation memory for the whole model at its highest point, in bytes.

    ``entries`` in forward order (as :func:`mlp_memory` returns them): while layer ``i`` runs its
    backward, the layers before it still keep what they saved for theirs.
    """
    total, kept_so_far = 0, 0
    for e in entries:
        kept, peak = (e.kept_after, e.peak_after) if tiled else (e.kept_before, e.peak_before)
        total = max(total, kept_so_far + peak)
        kept_so_far += kept
    return total

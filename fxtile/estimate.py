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
until autograd frees it (:class:`_LiveBytes`). The untiled side runs the region under autograd; the
tiled side runs the op's own forward and backward kernels (``fxtile.op``) shard by shard.

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

import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from passes.trace import get_path

from . import op
from .api import tiled_regions
from .kernels import loss as loss_kernel
from .kernels.shards import shard_bounds
from .region import TiledRegion

__all__ = ["MlpMemory", "mlp_memory", "total_peak"]


@dataclass(frozen=True)
class MlpMemory:
    """Activation memory of one tiled MLP region at ``tokens`` rows, untiled (before) and tiled (after)."""

    path: str
    nodes: tuple[str, ...]  # the region's fx nodes, as in ``fxtile.Match.nodes``
    tokens: int
    shards: int  # shards the region runs in at ``tokens`` rows (1: it runs untiled)
    kept_before: int  # kept from forward to backward
    peak_before: int  # highest point of forward + backward
    kept_after: int
    peak_after: int
    weight_grad_workspace: int  # part of ``peak_after``: the op's weight-gradient sums and per-shard grads
                                # (weight-sized, not token-sized: fp32 sums for bf16/fp16 weights)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it, from creation until it is freed.

    A storage's Python object lives exactly as long as the storage (PyTorch preserves it), so a weak
    reference's callback marks the free. Views share their base's storage and are counted once.
    Storages that existed before (weights, input, output gradient) are never counted.
    """

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Optional[weakref.ref]] = {}
        self._existing = [t.untyped_storage() for t in existing]
        for storage in self._existing:
            self._refs[id(storage)] = None

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._refs:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self.live -= size
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out


def _region_tensors(owner: nn.Module, region: TiledRegion, dtype: Optional[torch.dtype]) -> list[torch.Tensor]:
    """Meta tensors shaped like the region's weights (read from ``owner``, the tiled module), at ``dtype``.

    Trainable ones (``requires_grad`` on the model's own tensor: a frozen LoRA base weight gets no
    gradient) get a ``.grad``, as in any step after the first, so its memory is not counted.
    """
    out = []
    for name in region.tensor_paths:
        value = get_path(owner, name)
        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
        tensor = torch.empty(value.shape, dtype=cast, device="meta", requires_grad=value.requires_grad)
        if tensor.requires_grad:
            tensor.grad = torch.zeros_like(tensor)
        out.append(tensor)
    return out


def _replay(
    owner: nn.Module, region: TiledRegion, tokens: int, dtype: Optional[torch.dtype],
) -> tuple[int, int, int, int, int, int]:
    """(shards, kept_before, peak_before, kept_after, peak_after, workspace) for one region, on meta."""
    tensors = _region_tensors(owner, region, dtype)
    grads = [t.grad for t in tensors if t.grad is not None]
    x_dtype = dtype or next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    x = torch.empty(tokens, region.region.hidden_size, device="meta", dtype=x_dtype, requires_grad=True)
    rows = [x] + [torch.empty(tokens, dtype=torch.long, device="meta") for p in region.region.inputs[1:]]  # targets
    shards = len(shard_bounds(tokens, int(region.shards_for(tokens))))  # the op's own clamping

    with _LiveBytes([*rows, *tensors, *grads]) as counter:  # untiled: the region under autograd
        y = region.region.run(rows, tensors, _training(region))
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()  # the output and its incoming gradient
        kept_before = counter.live - out_bytes
        torch.autograd.backward(y, dy)
        peak_before = counter.peak - out_bytes
        del y, dy
    if shards == 1:  # the tiled call runs the region directly: nothing changes
        return shards, kept_before, peak_before, kept_before, peak_before, 0
    kept_after, peak_after = _replay_tiled(region, rows, tensors, shards, weight_grads=True)
    _, without = _replay_tiled(region, rows, tensors, shards, weight_grads=False)
    return shards, kept_before, peak_before, kept_after, peak_after, max(0, peak_after - without)


def _accumulate(tensors: list[torch.Tensor], needs: list[bool], result: list) -> None:
    """What AccumulateGrad does with the op's weight gradients (``result[0]`` is the input's)."""
    for tensor, need, grad in zip(tensors, needs[1:], result[1:]):
        if need and grad is not None:
            tensor.grad.add_(grad)


def _replay_tiled(
    region: TiledRegion, rows: list[torch.Tensor], tensors: list[torch.Tensor], shards: int, weight_grads: bool,
) -> tuple[int, int]:
    """(kept, peak) of the op's own forward and backward kernels, run as autograd runs them."""
    x_in, t_in = rows[0].detach(), [t.detach() for t in tensors]
    grads = [t.grad for t in tensors if t.grad is not None]
    needs = [True] + [weight_grads and t.requires_grad for t in tensors]
    if region.region.loss is not None:  # the loss op: every gradient computed in its forward, kept until backward
        with _LiveBytes([x_in, *rows[1:], *t_in, *grads]) as counter, torch.no_grad():
            _, result = loss_kernel.forward(region.region.loss, x_in, rows[1], t_in, shards, needs)
            kept = counter.live
            _accumulate(tensors, needs, result)  # backward scales them in place and hands them over
            del result
            return kept, counter.peak
    with _LiveBytes([x_in, *t_in, *grads]) as counter, torch.no_grad():  # as in the op's kernel
        y = op.forward_kernel(region.region, [x_in], t_in, shards, _training(region))
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()
        kept = counter.live - out_bytes  # the op saves its input and weights: nothing new
        no_rng = torch.empty(0, dtype=torch.uint8)
        result = op.backward_kernel(region.region, dy, [x_in], t_in, shards, _training(region), no_rng, needs)
        _accumulate(tensors, needs, result)
        del result, y, dy
        return kept, counter.peak - out_bytes


def _training(region: TiledRegion) -> list[bool]:
    """Every module of the region in train mode (the estimate is for training)."""
    return [True] * len(region.region.moded)


def mlp_memory(model: nn.Module, tokens: int, dtype: Optional[torch.dtype] = None) -> list[MlpMemory]:
    """Activation memory of every MLP ``fxtile.transform`` tiled in ``model``, at ``tokens`` rows.

    ``tokens`` is batch size times sequence length (the MLP sees every token as one row). ``dtype``
    is the training dtype of weights and activations (default: the model's own). Works on a model
    on any device, including ``meta``: only the regions' shapes are used. Layers of the same shape
    are replayed once. A block traced per call is replayed for its default call; routed expert banks
    (three routed inputs) get no entry (the CLI shows them as "not estimated").
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int (batch size x sequence length), got {tokens!r}")
    cache: dict[tuple, tuple[int, ...]] = {}
    found = []
    regions = tiled_regions(model)
    for path, match, region, owner in sorted(regions, key=lambda r: r[2].region.loss is not None):  # loss last
        if region.region.loss is None and len(region.region.inputs) != 1:  # an expert bank's routed inputs: not replayed
            continue
        tensors = [get_path(owner, name) for name in region.tensor_paths]
        template = region.region.template
        key = (getattr(template, "code", type(template).__name__), region.policy,
               tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors))
        if key not in cache:
            cache[key] = _replay(owner, region, tokens, dtype)
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

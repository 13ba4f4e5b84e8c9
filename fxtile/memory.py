"""How much memory a region takes in training, untiled and tiled, measured by replaying its own kernels.

Why replay rather than a formula: what autograd keeps depends on how each activation is written
(``F.silu`` keeps one tensor, GPT-2's tanh-GELU written as Python arithmetic keeps four), and the tiled
op's backward has its own working set (the recomputed shard, the input gradient it fills, the
weight-gradient sums). So the region's own code runs forward and backward, untiled under autograd and
tiled through the op's kernels (:mod:`fxtile.op`), and :class:`LiveBytes` counts every tensor storage
created from its allocation until it is freed. On the **meta device** this costs milliseconds at any
size (shapes only); an expert bank, whose routing is data-dependent, replays on its real weights at a few
dozen rows instead (its cost per row is small: only ``k`` experts run per row).

What is counted: every byte the region adds above its input, its output, the gradient arriving at its
output, its weights and their ``.grad`` (which exist before the step, as in any step after the first:
so the untiled step's weight gradients count as the transients they are, added into ``.grad`` one at a
time, while the tiled op hands back every weight's gradient at once and, for bf16/fp16 weights with
fp32 sums, holds the sums first). That is the scenario least favourable to tiling, so a call the policy
tiles is cheaper in the others too.

:func:`profile` fits :class:`fxtile.policy.MemoryProfile` (peaks linear in the rows, and in the rows of
one shard) from five replays; :func:`replay_untiled` and :func:`replay_tiled` give the peak at one size,
as ``fxtile.estimate`` reports it.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import op
from .kernels import loss as loss_kernel
from .policy import MemoryProfile
from .region import Region

__all__ = ["LiveBytes", "profile", "replay_tiled", "replay_untiled", "replay_tensors", "replay_rows"]

META_ROWS = 2048  # replay sizes on meta (free at any size: large, where the kernels' peaks are reached)
REAL_ROWS = 64  # and on real weights (expert banks)


class LiveBytes(TorchDispatchMode):
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


def replay_tensors(tensors: Sequence[torch.Tensor], device: Union[str, torch.device],
                   dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """Stand-ins for a region's weights on ``device`` (``"meta"``: shapes only; else copies of the values),
    floating ones at ``dtype`` if given. Trainable ones get a ``.grad`` (see the module docstring)."""
    out = []
    for value in tensors:
        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if str(device) == "meta":  # a ZeRO-3 partitioned parameter is empty here: its full shape is ds_shape
            shape = getattr(value, "ds_shape", value.shape) if value.numel() == 0 else value.shape
            tensor = torch.empty(shape, dtype=cast, device="meta")
        else:
            tensor = value.detach().to(cast)
        tensor.requires_grad_(bool(value.requires_grad) and tensor.is_floating_point())
        if tensor.requires_grad:
            tensor.grad = torch.zeros_like(tensor)
        out.append(tensor)
    return out


def replay_rows(region: Region, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
    """A call's activation inputs at ``rows`` rows, shaped as ``region.inputs`` says (on ``like``'s device and
    dtype; class indices and expert ids below their bound, distinct per row for expert ids)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for spec in region.inputs:
        shape = (rows,) if spec.width is None else (rows, spec.width)
        if spec.high is None:
            t = torch.empty(shape, dtype=like.dtype, device=like.device) if like.device.type == "meta" else \
                torch.randn(shape, generator=gen).to(like.device, like.dtype)
            out.append(t.requires_grad_())
        elif like.device.type == "meta":
            out.append(torch.empty(shape, dtype=torch.long, device="meta"))
        elif spec.width is None:
            out.append(torch.randint(0, spec.high, shape, generator=gen).to(like.device))
        else:  # expert ids: ``width`` distinct experts per row
            out.append(torch.stack([torch.randperm(spec.high, generator=gen)[:spec.width] for _ in range(rows)])
                       .to(like.device))
    return out


def replay_untiled(region: Region, rows: list[torch.Tensor], tensors: list[torch.Tensor],
                   modes: Sequence[bool]) -> tuple[int, int]:
    """``(kept, peak)`` bytes of the region run once under autograd, forward and backward."""
    grads = [t.grad for t in tensors if t.grad is not None]
    with LiveBytes([*rows, *tensors, *grads]) as counter:
        y = region.run(rows, tensors, modes)
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()  # the output and its incoming gradient
        kept = counter.live - out_bytes
        torch.autograd.backward(y, dy)
        peak = counter.peak - out_bytes
        del y, dy
    for row in rows:
        row.grad = None
    return kept, peak


def _accumulate(tensors: list[torch.Tensor], needs: list[bool], result: list, n_rows: int) -> None:
    """What AccumulateGrad does with the op's weight gradients."""
    for tensor, need, grad in zip(tensors, needs[n_rows:], result[n_rows:]):
        if need and grad is not None:
            tensor.grad.add_(grad)


def replay_tiled(region: Region, rows: list[torch.Tensor], tensors: list[torch.Tensor], modes: Sequence[bool],
                 shards: int, fp32_sums: bool = True) -> tuple[int, int]:
    """``(kept, peak)`` bytes of the op's own forward and backward kernels, run as autograd runs them."""
    r_in, t_in = [r.detach() for r in rows], [t.detach() for t in tensors]
    grads = [t.grad for t in tensors if t.grad is not None]
    needs = [r.requires_grad for r in rows] + [t.requires_grad for t in tensors]
    n = len(rows)
    if region.loss is not None:  # the loss op: every gradient computed in its forward, kept until backward
        with LiveBytes([*r_in, *t_in, *grads]) as counter, torch.no_grad():
            _, result = loss_kernel.forward(region.loss, r_in[0], r_in[1], t_in, shards, needs[:1] + needs[2:], fp32_sums)
            kept = counter.live
            _accumulate(tensors, needs[:1] + needs[2:], result, 1)  # backward scales them in place, hands them over
            del result
            return kept, counter.peak
    with LiveBytes([*r_in, *t_in, *grads]) as counter, torch.no_grad():
        y = op.forward_kernel(region, r_in, t_in, shards, modes)
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()
        kept = counter.live - out_bytes  # the op saves its inputs and weights: nothing new
        no_rng = torch.empty(0, dtype=torch.uint8)
        result = op.backward_kernel(region, dy, r_in, t_in, shards, modes, no_rng, needs, fp32_sums=fp32_sums)
        _accumulate(tensors, needs, result, n)
        del result, y, dy
        return kept, counter.peak - out_bytes


def profile(region: Region, live: Sequence[torch.Tensor], modes: Sequence[bool]) -> Union[MemoryProfile, str]:
    """The region's :class:`~fxtile.policy.MemoryProfile` for weights like ``live``, or why it could not be
    measured. Five replays: untiled at ``a`` and ``2a`` rows, tiled at ``(a rows, 1 shard)``, ``(2a, 2)``
    and ``(2a, 1)``, which separate the fixed workspace, the buffers over every row and one shard's
    working set; per precision of the sums where the weights are bf16/fp16."""
    on_meta = not any(spec.high is not None and spec.width is not None for spec in region.inputs)  # no routing
    device = "meta" if on_meta else live[0].device
    if not on_meta and any(t.device.type == "meta" or (hasattr(t, "ds_id") and t.numel() == 0) for t in live):
        return "not profiled: its routing needs real weights, and they are on the meta device or partitioned"
    a = META_ROWS if on_meta else REAL_ROWS
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in live if t.is_floating_point())
    like = next((t for t in live if t.is_floating_point()), None)
    if like is None:
        return "not profiled: it reads no floating tensor"
    like = torch.empty(0, dtype=like.dtype, device=device)
    try:
        with torch.random.fork_rng(devices=[]):
            untiled = []
            for rows in (a, 2 * a):
                tensors = replay_tensors(live, device)
                untiled.append(replay_untiled(region, replay_rows(region, rows, like), tensors, modes)[1])
            fits = []
            for fp32 in ((False, True) if low else (True,)):
                t = {}
                for rows, shards in ((a, 1), (2 * a, 2), (2 * a, 1)):
                    tensors = replay_tensors(live, device)
                    t[rows, shards] = replay_tiled(region, replay_rows(region, rows, like), tensors, modes, shards, fp32)[1]
                per_row = (t[2 * a, 2] - t[a, 1]) / a
                per_shard_row = (t[2 * a, 1] - t[2 * a, 2]) / a
                fits.append((t[a, 1] - (per_row + per_shard_row) * a, per_row, per_shard_row))
    except Exception as exc:  # noqa: BLE001 - code that cannot replay (a leaf without meta kernels) is not profiled
        return f"not profiled: its replay failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if len(fits) == 1:
        fits.append(fits[0])
    per_row = (untiled[1] - untiled[0]) / a
    return MemoryProfile(
        untiled_fixed=max(0.0, untiled[0] - per_row * a), untiled_per_row=per_row,
        tiled_fixed=(fits[0][0], fits[1][0]), tiled_per_row=(fits[0][1], fits[1][1]),
        tiled_per_shard_row=(fits[0][2], fits[1][2]),
    )

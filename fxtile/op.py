"""The tiled operator: custom ops and their autograd wiring.

Why a ``torch.library.custom_op`` and not a plain ``autograd.Function``: under ``torch.compile`` a
custom op stays one opaque node whose backward is ours, so the memory saving survives compilation (a
traced ``autograd.Function`` gets inlined and its intermediates saved again).

The op's arguments are the region's activation rows, every tensor it reads (so each weight gets its
gradient once per backward, summed over shards, as DDP, FSDP and ZeRO require, also when the input
needs none), and an integer naming the region's kernel. Regions register themselves here
(:func:`register`) and are held **weakly**: a region lives exactly as long as the model that owns it.

What the wiring guarantees:

* the recompute runs under the forward's autocast dtype (an explicit argument: backward runs outside
  the forward's autocast context, and a compiled graph does not carry thread-local state into the op);
* whenever the op will be differentiated, its forward kernel captures the generator state before the
  first shard and the recompute replays it, so every random draw inside the region (a dropout in its
  graph, PEFT's ``lora_dropout`` inside a LoRA leaf, any code a leaf calls) is the same in the
  recompute as in the forward it differentiates. Capturing inside the kernel keeps the op opaque to
  dynamo, so this also holds under ``torch.compile(fullgraph=True)``;
* in eager mode the backward recomputes through the autograd engine (legacy ``autograd.Function``\\ s
  such as bitsandbytes' and torchao's work there); only the compiled backward, a custom op whose
  kernel runs with autograd off, uses ``torch.func.vjp``.

This module never reads a graph: what a region is comes from the region object it is handed.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional, Protocol, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from .kernels import loss as loss_kernel
from .passes.kernel_plans import LossPlan
from .kernels import shards as K

__all__ = ["Counters", "Kernel", "autocast_dtype_of", "backward_kernel", "forward_kernel", "live_regions", "lookup",
           "register", "tiled_backward", "tiled_cross_entropy", "tiled_forward"]


@dataclass
class Counters:
    """What the op itself ran for one region (read through ``fxtile.testing``)."""

    forward_calls: int = 0
    forward_shards: int = 0
    backward_calls: int = 0
    backward_shards: int = 0


class Kernel(Protocol):
    """What the op needs from a region (``fxtile.region.Region`` is one)."""

    label: str
    fast: Optional[K.FastPlan]
    loss: Optional[LossPlan]
    counters: Counters

    def run(self, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], modes: Sequence[bool]) -> torch.Tensor: ...


_REGIONS: "weakref.WeakValueDictionary[int, Kernel]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register(region: Kernel) -> int:
    """The id the op's calls name ``region`` by; the table does not keep the region alive."""
    region_id = next(_IDS)
    _REGIONS[region_id] = region
    return region_id


def lookup(region_id: int) -> Kernel:
    region = _REGIONS.get(region_id)
    if region is None:
        raise RuntimeError(f"fxtile: tiled region {region_id} was freed with the model that owned it")
    return region


def live_regions() -> int:
    """How many regions are alive in this process (they die with their models)."""
    return len(_REGIONS)


# ---------------------------------------------------------------------------------------------
# Autocast and RNG: the state the recompute must share with the forward


@torch.compiler.assume_constant_result
def _autocast_available(kind: str) -> bool:
    """Constant for dynamo (torch 2.11 cannot trace ``torch._C._is_autocast_available``)."""
    return torch.amp.is_autocast_available(kind)


def _tracing(t: torch.Tensor) -> bool:
    """Is this backward (or setup_context) being traced by the compiler? torch 2.11 reports
    ``is_compiling()`` False while AOTAutograd traces a custom op's backward on fake tensors."""
    return torch.compiler.is_compiling() or is_fake(t)


def autocast_dtype_of(device: torch.device) -> str:
    """The caller's autocast dtype on ``device`` by name ("" when off), handed to the op explicitly. A
    string, not ``Optional[dtype]``: custom ops flatten a ``None`` argument differently in backward."""
    kind = device.type
    if not _autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return ""
    return str(torch.get_autocast_dtype(kind)).removeprefix("torch.")


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that code on ``device`` draws from (always a CPU byte tensor)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run the recompute from the forward's generator state, then put the caller's state back."""
    if state.numel() == 0:  # the forward captured none: it was not going to be differentiated
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _fast(kernel: Kernel, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], autocast_dtype: str):
    """The explicit-matmul plan when it applies to this call: one dtype for every floating input (autocast
    and mixed dtypes take the generic kernel, which follows autocast's casting rules op by op)."""
    if kernel.fast is None or autocast_dtype:
        return None
    dtype = rows[0].dtype
    return kernel.fast if all(t.dtype == dtype for t in (*rows, *tensors) if t.is_floating_point()) else None


# ---------------------------------------------------------------------------------------------
# Kernels of the two ops (public so fxtile.estimate can replay them on the meta device)


def forward_kernel(
    kernel: Kernel, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
    modes: Sequence[bool], autocast_dtype: str = "",
) -> torch.Tensor:
    fast = _fast(kernel, rows, tensors, autocast_dtype)
    if fast is not None:
        return K.forward_fast(fast, rows, tensors, shards)
    return K.forward(partial(kernel.run, modes=modes), rows, tensors, shards)


def backward_kernel(
    kernel: Kernel, grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
    modes: Sequence[bool], rng_state: torch.Tensor, needs_grad: Sequence[bool], autocast_dtype: str = "",
    engine: bool = False, fp32_sums: bool = True,
) -> list[Optional[torch.Tensor]]:
    """Every gradient asked for in ``needs_grad`` (None elsewhere). ``engine``: this runs inside the
    autograd engine (eager backward), so shards are differentiated with autograd; else with torch.func.
    ``fp32_sums``: low-precision weight gradients are summed in fp32 (else in their own dtype)."""
    fast = _fast(kernel, rows, tensors, autocast_dtype)
    if fast is not None:
        return K.backward_fast(fast, grad, rows, tensors, shards, needs_grad, fp32_sums)
    run = partial(kernel.run, modes=modes)
    with _replayed_rng(rows[0].device, rng_state):
        if engine:
            return K.backward_autograd(run, grad, rows, tensors, shards, needs_grad, fp32_sums)
        try:
            return K.backward_vjp(run, grad, rows, tensors, shards, needs_grad, fp32_sums)
        except RuntimeError as exc:
            if K.LEGACY_FUNCTION_HINT not in str(exc):
                raise
            raise RuntimeError(
                f"fxtile: {kernel.label} calls a torch.autograd.Function without setup_context (e.g. bitsandbytes or "
                "torchao QAT), which the compiled backward (torch.func, autograd off) cannot differentiate; run this "
                "model without torch.compile, or exclude the block with filter_fn"
            ) from exc


def _rng_numel(device: torch.device) -> int:
    return _rng_state(device).numel()


@torch.library.custom_op("fxtile::tiled_forward", mutates_args=())
def tiled_forward(
    rows: list[torch.Tensor], tensors: list[torch.Tensor], region: int, shards: int, modes: list[bool],
    capture_rng: bool, autocast_dtype: str, fp32_sums: bool,
) -> list[torch.Tensor]:
    """``[region(*rows) computed shard by shard, the generator state before the first shard (or empty)]``;
    ``fp32_sums`` is for its backward (how weight gradients are summed)."""
    kernel = lookup(region)
    device = rows[0].device
    rng = _rng_state(device) if capture_rng else torch.empty(0, dtype=torch.uint8)
    with _autocast(device, autocast_dtype):
        out = forward_kernel(kernel, rows, tensors, shards, modes, autocast_dtype)
    kernel.counters.forward_calls += 1
    kernel.counters.forward_shards += len(K.shard_bounds(rows[0].shape[0], shards))
    return [out, rng]


@tiled_forward.register_fake
def _(rows, tensors, region, shards, modes, capture_rng, autocast_dtype, fp32_sums):
    with _autocast(rows[0].device, autocast_dtype):  # on fake tensors: shape and dtype only, no compute
        out = lookup(region).run(rows, tensors, modes)
    return [out, torch.empty(_rng_numel(rows[0].device) if capture_rng else 0, dtype=torch.uint8)]


@torch.library.custom_op("fxtile::tiled_backward", mutates_args=())
def tiled_backward(
    grad: torch.Tensor, rows: list[torch.Tensor], tensors: list[torch.Tensor], region: int, shards: int,
    modes: list[bool], rng_state: torch.Tensor, needs_grad: list[bool], autocast_dtype: str, fp32_sums: bool,
) -> list[torch.Tensor]:
    """The compiled backward: gradients ``[*d rows, *d tensors]`` (empty where not needed)."""
    kernel = lookup(region)
    with _autocast(rows[0].device, autocast_dtype):
        grads = backward_kernel(kernel, grad, rows, tensors, shards, modes, rng_state, needs_grad, autocast_dtype,
                                fp32_sums=fp32_sums)
    _count_backward(kernel, rows[0].shape[0], shards)
    return [g if g is not None else rows[0].new_empty(0) for g in grads]  # fresh empties: no aliases


@tiled_backward.register_fake
def _(grad, rows, tensors, region, shards, modes, rng_state, needs_grad, autocast_dtype, fp32_sums):
    return [torch.empty_like(t) if need else rows[0].new_empty(0) for t, need in zip([*rows, *tensors], needs_grad)]


def _count_backward(kernel: Kernel, rows: int, shards: int) -> None:
    kernel.counters.backward_calls += 1
    kernel.counters.backward_shards += len(K.shard_bounds(rows, shards))


def _setup_context(ctx, inputs, output) -> None:
    rows, tensors, region, shards, modes, capture_rng, autocast_dtype, fp32_sums = inputs
    ctx.save_for_backward(*rows, *tensors, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.n_rows = len(rows)
    ctx.args = (region, shards, modes, autocast_dtype, fp32_sums)
    ctx.needs_grad = [t.requires_grad for t in (*rows, *tensors)]


def _backward(ctx, grads):
    *saved, rng_state = ctx.saved_tensors
    rows, tensors = saved[: ctx.n_rows], saved[ctx.n_rows :]
    region, shards, modes, autocast_dtype, fp32_sums = ctx.args
    grad = grads[0]
    if _tracing(grad):  # traced into the compiled backward: one opaque op
        out = tiled_backward(grad, rows, tensors, region, shards, modes, rng_state, ctx.needs_grad, autocast_dtype,
                             fp32_sums)
        out = [g if need else None for g, need in zip(out, ctx.needs_grad)]
    else:  # eager: inside the autograd engine
        kernel = lookup(region)
        with _autocast(rows[0].device, autocast_dtype):
            out = backward_kernel(kernel, grad, rows, tensors, shards, modes, rng_state, ctx.needs_grad,
                                  autocast_dtype, engine=True, fp32_sums=fp32_sums)
        _count_backward(kernel, rows[0].shape[0], shards)
    # torch flattens a non-empty list[bool] argument as one leaf, an empty one as an empty list of tensors
    no_grad_for_modes = None if modes else []
    return out[: ctx.n_rows], out[ctx.n_rows :], None, None, no_grad_for_modes, None, None, None


tiled_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The projection + cross-entropy op: gradients computed in its forward (see fxtile/kernels/loss.py)


@torch.library.custom_op("fxtile::tiled_cross_entropy", mutates_args=())
def tiled_cross_entropy(
    h: torch.Tensor, targets: torch.Tensor, tensors: list[torch.Tensor], region: int, shards: int,
    needs: list[bool], autocast_dtype: str, fp32_sums: bool,
) -> list[torch.Tensor]:
    """``[loss, d h, *d tensors]``: the loss over all rows and, where ``needs`` says so, its gradients
    (empty tensors elsewhere), one shard of logits at a time."""
    kernel = lookup(region)
    assert kernel.loss is not None
    with _autocast(h.device, autocast_dtype):
        loss, grads = loss_kernel.forward(kernel.loss, h, targets, tensors, shards, needs, fp32_sums)
    kernel.counters.forward_calls += 1
    kernel.counters.forward_shards += len(K.shard_bounds(h.shape[0], shards))
    return [loss, *(g if g is not None else h.new_empty(0) for g in grads)]


@tiled_cross_entropy.register_fake
def _(h, targets, tensors, region, shards, needs, autocast_dtype, fp32_sums):
    with _autocast(h.device, autocast_dtype):  # shape and dtype of the loss: the region on fake tensors
        loss = lookup(region).run([h, targets], tensors, [])
    return [loss, *(torch.empty_like(t) if need else h.new_empty(0) for t, need in zip([h, *tensors], needs))]


def _setup_loss_context(ctx, inputs, output) -> None:
    h, targets, tensors, region, shards, needs, autocast_dtype, fp32_sums = inputs
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" for each of them: dh- and dW-sized
    ctx.needs, ctx.region = needs, region
    if _tracing(h):
        ctx.save_for_backward(*grads)
        ctx.pending = None
    else:  # held here, not as saved tensors, so backward can hand each one over without a copy
        ctx.pending = list(grads)


def _loss_backward(ctx, grads_out):
    g = grads_out[0]
    if ctx.pending is None and not _tracing(g):
        raise RuntimeError(
            "fxtile: a tiled loss computes its gradients in its forward and hands them over in the first "
            "backward; run the forward again instead of backpropagating through it twice (retain_graph=True)"
        )
    if _tracing(g):
        out = [t * g if need else None for t, need in zip(ctx.saved_tensors, ctx.needs)]
    else:
        pending, ctx.pending = ctx.pending, None
        out = [t.mul_(g) if need else None for t, need in zip(pending, ctx.needs)]
        lookup(ctx.region).counters.backward_calls += 1
    return out[0], None, out[1:], None, None, None, None, None


tiled_cross_entropy.register_autograd(_loss_backward, setup_context=_setup_loss_context)

"""Row shards and the loops that run a region over them, forward and backward.

A region is given as ``run(rows, tensors) -> output``: its activation inputs (aligned on dim 0, one row
per token) and every tensor it reads. Because each output row depends on its own input rows only (the
matcher admits token-wise code alone), running ``run`` on row ranges and writing each result into its
rows of one preallocated output is exact. Backward recomputes one shard at a time, so only one shard's
intermediates are ever alive.

Two backward loops, for the two places a backward can run:

* :func:`backward_autograd` - in eager mode the op's backward runs inside the autograd engine, so each
  shard is recomputed with ``torch.enable_grad()`` and differentiated by the engine. That
  differentiates anything autograd can, including legacy ``torch.autograd.Function``\\ s without
  ``setup_context`` (bitsandbytes' 4-bit and 8-bit linears, torchao's QAT fake quantizers).
* :func:`backward_vjp` - inside a custom op's kernel (the compiled backward) autograd is off, so each
  shard is differentiated with ``torch.func.vjp``, which cannot run such legacy Functions.

Weight gradients are summed over shards: low-precision ones in fp32 (cast once at the end) or in their
own dtype, as the call plan says (``fp32``; see :class:`fxtile.ShardPolicy`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch.func import vjp

from ..passes.kernel_plans import BankPlan, LinearMLP
from . import experts, linear, mlp

__all__ = ["FastPlan", "Run", "backward_autograd", "backward_fast", "backward_vjp", "forward", "forward_fast", "shard_bounds"]

Run = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]
FastPlan = Union[LinearMLP, BankPlan]

LEGACY_FUNCTION_HINT = "it must override the setup_context staticmethod"  # torch.func's message for legacy Functions


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Exact, non-empty ``[lo, hi)`` row ranges (never assume ``torch.chunk`` returns ``shards`` pieces)."""
    n = max(1, min(shards, rows))
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def forward(run: Run, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int) -> torch.Tensor:
    """``run`` shard by shard, each shard written into one preallocated output."""
    out: Optional[torch.Tensor] = None
    for lo, hi in shard_bounds(rows[0].shape[0], shards):
        y = run([r[lo:hi] for r in rows], tensors)
        if out is None:
            out = y.new_empty((rows[0].shape[0], *y.shape[1:]))
        out[lo:hi] = y
    assert out is not None
    return out


def forward_fast(plan: FastPlan, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int) -> torch.Tensor:
    """An explicit-matmul plan over row shards: a plain MLP's (one input) or an expert bank's (three)."""
    if isinstance(plan, BankPlan):
        return experts.forward(plan, rows, tensors, shards, shard_bounds)
    (x,) = rows
    down = tensors[plan.down.weight]
    out = x.new_empty((x.shape[0], down.shape[1] if plan.down.transposed else down.shape[0]))
    for lo, hi in shard_bounds(x.shape[0], shards):
        mlp.forward_shard(plan, x[lo:hi], tensors, out[lo:hi])
    return out


def finish(rows, tensors, row_grads: dict, sums: dict, needs: Sequence[bool]) -> list[Optional[torch.Tensor]]:
    """One gradient per input (None where none was asked for); summed weight gradients in their dtype.

    Each fp32 sum is dropped as soon as its cast exists, so the workspace shrinks while it is handed
    over instead of holding every sum and every cast at once."""
    inputs = [*rows, *tensors]
    grads = dict(row_grads)
    for i in sorted(sums):
        grads[i] = sums.pop(i).to(inputs[i].dtype)
    for i, need in enumerate(needs):  # a tensor the region did not use on a differentiable path
        if need and i not in grads:
            grads[i] = torch.zeros_like(inputs[i])
    return [grads.get(i) for i in range(len(inputs))]


def backward_fast(
    plan: FastPlan, grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
    needs: Sequence[bool], fp32: bool = True,
) -> list[Optional[torch.Tensor]]:
    if isinstance(plan, BankPlan):
        return experts.backward(plan, grad, rows, tensors, shards, needs, fp32, shard_bounds)
    (x,) = rows
    grad_x = torch.empty_like(x) if needs[0] else None
    sums: dict[int, torch.Tensor] = {}
    for lo, hi in shard_bounds(x.shape[0], shards):
        mlp.backward_shard(plan, x[lo:hi], grad[lo:hi], tensors, needs[1:], sums,
                           grad_x[lo:hi] if grad_x is not None else None, fp32)
    return finish([x], tensors, {0: grad_x} if grad_x is not None else {}, {i + 1: s for i, s in sums.items()}, needs)


def _store(i: int, g: Optional[torch.Tensor], lo: int, hi: int, n_rows: int, row_grads: dict, sums: dict,
           fp32: bool) -> None:
    if i < n_rows:
        if g is None:
            row_grads[i][lo:hi].zero_()  # the shard's output does not depend on this input
        else:
            row_grads[i][lo:hi] = g
    elif g is not None:
        linear.accumulate(sums, i, g, fp32)


def backward_vjp(
    run: Run, grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
    needs: Sequence[bool], fp32: bool = True,
) -> list[Optional[torch.Tensor]]:
    """Gradients with autograd off (a custom op's kernel): ``torch.func.vjp`` of each recomputed shard."""
    n_rows = len(rows)
    wanted = [i for i, need in enumerate(needs) if need]
    row_grads = {i: torch.empty_like(rows[i]) for i in wanted if i < n_rows}  # every row is written
    sums: dict[int, torch.Tensor] = {}
    for lo, hi in shard_bounds(rows[0].shape[0], shards):
        shard = [r[lo:hi] for r in rows] + list(tensors)

        def shard_fn(*primals: torch.Tensor) -> torch.Tensor:
            args = list(shard)
            for i, value in zip(wanted, primals):
                args[i] = value
            return run(args[:n_rows], args[n_rows:])

        _, pullback = vjp(shard_fn, *[shard[i] for i in wanted])
        grads = list(pullback(grad[lo:hi], retain_graph=False))  # frees the shard's residuals as they are used
        del _, pullback  # before the next shard's recompute: one shard's intermediates alive at a time
        for k, i in enumerate(wanted):
            g, grads[k] = grads[k], None  # each weight-sized gradient freed once it is summed
            _store(i, g, lo, hi, n_rows, row_grads, sums, fp32)
            del g
    return finish(rows, tensors, row_grads, sums, needs)


def backward_autograd(
    run: Run, grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
    needs: Sequence[bool], fp32: bool = True,
) -> list[Optional[torch.Tensor]]:
    """Gradients inside the autograd engine (eager backward): each shard recomputed under
    ``enable_grad`` and differentiated with ``torch.autograd.backward`` into leaves that live across
    the shards, so the engine accumulates each weight's gradient **in place** as soon as the shard's
    backward produces it (one weight-sized temporary at a time, never a tuple of every weight's
    gradient per shard). With ``fp32`` a low-precision weight's gradient is moved into an fp32 sum as
    soon as it is accumulated.

    Only the inputs that need a gradient become leaves; the others are passed as they are (a frozen
    bitsandbytes ``Params4bit`` keeps its ``quant_state``)."""
    n_rows = len(rows)
    row_wanted = [i for i in range(n_rows) if needs[i]]
    row_grads = {i: torch.empty_like(rows[i]) for i in row_wanted}  # every row is written
    sums: dict[int, torch.Tensor] = {}
    leaves = {i: t.detach().requires_grad_() for i, t in enumerate(tensors, n_rows) if needs[i]}
    handles = []
    for i, leaf in leaves.items():
        if fp32 and leaf.dtype in (torch.float16, torch.bfloat16):
            def to_sum(p: torch.Tensor, i: int = i) -> None:
                g, p.grad = p.grad, None
                linear.accumulate(sums, i, g, fp32=True)
            handles.append(leaf.register_post_accumulate_grad_hook(to_sum))
    try:
        with torch.enable_grad():
            for lo, hi in shard_bounds(rows[0].shape[0], shards):
                shard_rows = {i: rows[i][lo:hi].detach().requires_grad_() for i in row_wanted}
                args = [shard_rows.get(i, r[lo:hi]) for i, r in enumerate(rows)]
                args += [leaves.get(i, t) for i, t in enumerate(tensors, n_rows)]
                out = run(args[:n_rows], args[n_rows:])
                wrt = [*shard_rows.values(), *leaves.values()]
                if wrt and out.requires_grad:
                    torch.autograd.backward(out, grad[lo:hi], inputs=wrt)
                del out, args  # one shard's graph alive at a time
                for i, leaf in shard_rows.items():
                    _store(i, leaf.grad, lo, hi, n_rows, row_grads, sums, fp32)
    finally:
        for handle in handles:
            handle.remove()
    for i, leaf in leaves.items():
        if leaf.grad is not None:
            sums[i] = leaf.grad
    return finish(rows, tensors, row_grads, sums, needs)

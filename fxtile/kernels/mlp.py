"""The explicit-matmul fast path for MLP regions made of plain linear layers.

Why: the generic kernel differentiates each shard of a region by recomputing the whole region, so a
shard keeps every intermediate alive at once. When the projections are plain linear layers
(``nn.Linear``, transformers' ``Conv1D``, ``F.linear``) around a parameter-free, RNG-free element-wise
activation, the backward needs to recompute only the gate/up projections and the activation: the
down projection's input is rebuilt from them, and every gradient is one explicit matmul, accumulated
into preallocated buffers with in-place ops (low-precision weights' gradients in fp32 or in their own
dtype, as the call plan says), so a shard holds about four ``shard x intermediate`` tensors at its peak.

:class:`~fxtile.passes.plans.LinearMLP` is the plan (indices into the op's tensor list, the activation as
a callable); the matcher derives it from the roles it found. This module only computes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.func import vjp

from ..passes.plans import LinearMLP, Proj

__all__ = ["accumulate", "add_mm", "backward_shard", "branches", "forward_shard", "input_grad", "linear", "weight_grads"]


# ``t`` is the op's tensor list in every kernel below (run with autograd off).


def linear(x: torch.Tensor, t: Sequence[torch.Tensor], p: Proj, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    weight = t[p.weight] if p.transposed else t[p.weight].t()
    if p.bias is None:
        return torch.mm(x, weight, out=out) if out is not None else torch.mm(x, weight)
    return torch.addmm(t[p.bias], x, weight, out=out) if out is not None else torch.addmm(t[p.bias], x, weight)


def input_grad(
    dy: torch.Tensor, t: Sequence[torch.Tensor], p: Proj, out: Optional[torch.Tensor] = None, accumulate: bool = False
) -> torch.Tensor:
    """``dy @ W`` (the gradient w.r.t. the projection's input), optionally into or onto ``out``."""
    weight = t[p.weight].t() if p.transposed else t[p.weight]
    if out is None:
        return torch.mm(dy, weight)
    return out.addmm_(dy, weight) if accumulate else torch.mm(dy, weight, out=out)


def accumulate(sums: dict[int, torch.Tensor], i: int, value: torch.Tensor, fp32: bool = True) -> None:
    """Accumulate a gradient over shards; low-precision ones in fp32 when ``fp32`` (cast once by the op),
    else in their own dtype. The first shard's tensor becomes the sum (no copy unless it is widened)."""
    if i not in sums:
        sums[i] = value.float() if fp32 and value.dtype in (torch.float16, torch.bfloat16) else value
    else:
        sums[i].add_(value)


def add_mm(sums: dict[int, torch.Tensor], i: int, a: torch.Tensor, b: torch.Tensor, fp32: bool = True) -> None:
    acc = sums.get(i)
    if acc is None:
        accumulate(sums, i, torch.mm(a, b), fp32)
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)  # in place: no weight-sized temporary per shard
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # fp32 accumulation of bf16 products
    else:
        acc.add_(torch.mm(a, b))  # CPU has no mixed-dtype addmm: one low-precision temporary


def weight_grads(sums, needs, t, p: Proj, x: torch.Tensor, dy: torch.Tensor, fp32: bool = True) -> None:
    """d weight += dy^T x (x^T dy in Conv1D's [in, out] layout); d bias += sum(dy)."""
    if needs[p.weight]:
        add_mm(sums, p.weight, *((x.t(), dy) if p.transposed else (dy.t(), x)), fp32)
    if p.bias is not None and needs[p.bias]:
        accumulate(sums, p.bias, dy.sum(0), fp32)


def branches(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor]):
    """(gate pre-activation, up or None) of one shard."""
    first = linear(x, t, plan.first)
    if plan.kind == "gated_fused":
        return first[:, plan.gate_cols], first[:, plan.up_cols]
    return first, (linear(x, t, plan.up) if plan.kind == "gated" else None)


def forward_shard(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """``out[:] = mlp(x)`` for one shard."""
    g, u = branches(plan, x, t)
    h = plan.act(g)
    if u is not None:
        h = h * u
    linear(h, t, plan.down, out=out)


def backward_shard(
    plan: LinearMLP, x: torch.Tensor, dy: torch.Tensor, t: Sequence[torch.Tensor], needs: Sequence[bool],
    sums: dict[int, torch.Tensor], grad_x: Optional[torch.Tensor], fp32: bool = True,
) -> None:
    """Accumulate one shard's weight gradients into ``sums`` and write its input gradient to ``grad_x``.

    Recomputes gate/up and the activation only; the order frees each intermediate as soon as it
    is used, so at most about four ``shard x intermediate`` tensors are alive at once.
    """
    g, u = branches(plan, x, t)
    a, pullback = vjp(plan.act, g)
    h = a * u if u is not None else a
    weight_grads(sums, needs, t, plan.down, h, dy, fp32)
    del h
    dh = input_grad(dy, t, plan.down)
    du = None
    if u is not None:
        du = dh * a
        dh.mul_(u)  # now d activation
    del a, u
    (dg,) = pullback(dh)
    del dh, pullback, g
    if plan.kind == "gated_fused":
        dg_du = torch.empty((dg.shape[0], dg.shape[1] + du.shape[1]), dtype=dg.dtype, device=dg.device)
        dg_du[:, plan.gate_cols], dg_du[:, plan.up_cols] = dg, du
        dg, du = dg_du, None
    weight_grads(sums, needs, t, plan.first, x, dg, fp32)
    if du is not None:
        weight_grads(sums, needs, t, plan.up, x, du, fp32)
    if grad_x is not None:
        input_grad(dg, t, plan.first, out=grad_x)
        if du is not None:
            input_grad(du, t, plan.up, out=grad_x, accumulate=True)

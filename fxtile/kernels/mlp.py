"""The explicit-matmul fast path for MLP regions made of plain linear layers.

Why: the generic kernel differentiates each shard of a region by recomputing the whole region, so a
shard keeps every intermediate alive at once. When the projections are plain linear layers
(``nn.Linear``, transformers' ``Conv1D``, ``F.linear``) around a parameter-free, RNG-free element-wise
activation, the backward needs to recompute only the gate/up projections and the activation: the
down projection's input is rebuilt from them, and every gradient is one explicit matmul, accumulated
into preallocated buffers with in-place ops (low-precision weights' gradients in fp32 or in their own
dtype, as the call plan says), so a shard holds about four ``shard x intermediate`` tensors at its peak.

:class:`~fxtile.passes.kernel_plans.LinearMLP` is the plan (indices into the op's tensor list, the activation as
a callable); the matcher derives it from the roles it found. This module only computes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.func import vjp

from ..passes.kernel_plans import LinearMLP
from . import linear

__all__ = ["backward_shard", "branches", "forward_shard"]


def branches(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor]):
    """(gate pre-activation, up or None) of one shard."""
    first = linear.linear(x, t, plan.first)
    if plan.kind == "gated_fused":
        return first[:, plan.gate_cols], first[:, plan.up_cols]
    return first, (linear.linear(x, t, plan.up) if plan.kind == "gated" else None)


def forward_shard(plan: LinearMLP, x: torch.Tensor, t: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """``out[:] = mlp(x)`` for one shard."""
    g, u = branches(plan, x, t)
    h = plan.act(g)
    if u is not None:
        h = h * u
    linear.linear(h, t, plan.down, out=out)


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
    linear.weight_grads(sums, needs, t, plan.down, h, dy, fp32)
    del h
    dh = linear.input_grad(dy, t, plan.down)
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
    linear.weight_grads(sums, needs, t, plan.first, x, dg, fp32)
    if du is not None:
        linear.weight_grads(sums, needs, t, plan.up, x, du, fp32)
    if grad_x is not None:
        linear.input_grad(dg, t, plan.first, out=grad_x)
        if du is not None:
            linear.input_grad(du, t, plan.up, out=grad_x, accumulate=True)

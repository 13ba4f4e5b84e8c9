"""Projection math shared by every kernel: a linear layer's output, its input gradient, and the weight
gradients summed over shards.

Why one place: the MLP, expert-bank and loss kernels all compute ``x @ W^T (+ b)`` and its gradients with
explicit matmuls, and all sum a weight's gradient over shards the same way (in place; low-precision ones in
fp32 or in their own dtype, as the call plan says). ``t`` is the op's tensor list; a
:class:`~fxtile.passes.kernel_plans.Proj` names a projection's weight and bias in it (``transposed`` for
transformers' ``Conv1D``, stored ``[in, out]``). Run with autograd off.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..passes.kernel_plans import Proj

__all__ = ["accumulate", "add_mm", "input_grad", "linear", "weight_grads"]


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

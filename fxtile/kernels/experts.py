"""The explicit-matmul kernel for routed expert banks: each shard's routed rows grouped by expert, one
expert MLP per group, every weight gradient accumulated in place into one bank-sized buffer.

Why: run through the bank's own code and autograd, every shard's backward materializes a full-size
gradient for each stacked weight (``grouped_mm``'s backward returns one ``[E, ...]`` tensor; the
per-expert loop's ``weight[e]`` indexing makes autograd fill a full-size zero tensor *per expert*), so
the tiled backward allocated ``shards`` (or ``shards x experts``) bank-sized tensors where the untiled one
allocates one. Here a shard adds each expert's gradient into its slice of the accumulator with one
``addmm_``: the workspace is the accumulator alone (the gradient itself, in the weights' dtype; or fp32
sums for bf16/fp16 weights, as the call plan says) and the work is the untiled step's matmuls plus one
recompute of the first projection.

The plan (:class:`~fxtile.passes.kernel_plans.BankPlan`) is a hypothesis the bank's shapes admit, kept only if
it reproduces the bank's own forward on a probe (``fxtile.blocks``); the self-check then compares the
gradients too. This module only computes.

Semantics (transformers' experts contract): ``out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t])``; ids at
or above the expert count (expert-parallel sentinels) contribute nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.func import vjp

from ..passes.kernel_plans import BankPlan
from . import linear, mlp

__all__ = ["backward", "forward"]


def _route(ids: torch.Tensor, num_experts: int):
    """The shard's ``rows x k`` (token, slot) pairs sorted by expert: ``(order, inverse, spans)`` where
    ``order`` lists the flat pair indices expert by expert, ``inverse`` undoes it, and ``spans`` gives each
    routed expert's ``(expert, start, stop)`` in that order (ids at or above the expert count are left out:
    their rows stay zero)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    spans, start = [], 0
    for expert, count in enumerate(counts):
        if count and expert < num_experts:
            spans.append((expert, start, start + count))
        start += count
    return order, inverse, spans


def _expert(plan: BankPlan, tensors: Sequence[torch.Tensor], e: int) -> list[torch.Tensor]:
    return [tensors[plan.first][e], tensors[plan.down][e]]


def _per_token(sorted_rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """Rows in expert order back to token order, summed over each token's ``k`` slots."""
    return sorted_rows[inverse].view(-1, k, sorted_rows.shape[-1]).sum(1)


def forward(plan: BankPlan, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], shards: int,
            bounds) -> torch.Tensor:
    """``out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t])``, shard by shard, each expert's rows in one matmul."""
    x, ids, w = rows
    k = ids.shape[1]
    out = torch.empty_like(x)
    for lo, hi in bounds(x.shape[0], shards):
        order, inverse, spans = _route(ids[lo:hi], plan.num_experts)
        xs, ws = x[lo:hi][order // k], w[lo:hi].reshape(-1)[order, None]
        ys = torch.zeros_like(xs)
        for e, a, b in spans:
            t = _expert(plan, tensors, e)
            gate, up = mlp.branches(plan.expert, xs[a:b], t)
            h = plan.expert.act(gate)
            ys[a:b] = linear.linear(h * up if up is not None else h, t, plan.expert.down) * ws[a:b]
        out[lo:hi] = _per_token(ys, inverse, k)
    return out


def backward(plan: BankPlan, grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
             shards: int, needs: Sequence[bool], fp32: bool, bounds) -> list[Optional[torch.Tensor]]:
    """Gradients ``[d x, None (ids), d w, *d tensors]`` where ``needs`` asks for them (the routing weights'
    gradient is the expert output's dot product with the incoming gradient, per token and top-k slot)."""
    x, ids, w = rows
    n, k = len(rows), ids.shape[1]
    wide = torch.promote_types(x.dtype, torch.float32)
    sums: dict[int, torch.Tensor] = {}  # the bank-sized accumulators, by tensor index
    for i in (plan.first, plan.down):
        if needs[n + i]:
            low = tensors[i].dtype in (torch.float16, torch.bfloat16)
            sums[i] = torch.zeros(tensors[i].shape, dtype=torch.float32 if fp32 and low else tensors[i].dtype,
                                  device=tensors[i].device)
    expert_needs = [plan.first in sums, plan.down in sums]
    dx = torch.empty_like(x) if needs[0] else None
    dw = torch.empty_like(w) if needs[2] else None
    for lo, hi in bounds(x.shape[0], shards):
        order, inverse, spans = _route(ids[lo:hi], plan.num_experts)
        tokens = order // k
        xs, dys, ws = x[lo:hi][tokens], grad[lo:hi][tokens], w[lo:hi].reshape(-1)[order, None]
        dxs = torch.zeros_like(xs) if dx is not None else None
        dws = torch.zeros((xs.shape[0],), dtype=wide, device=x.device) if dw is not None else None
        for e, a, b in spans:
            t = _expert(plan, tensors, e)
            expert_sums = {j: sums[i][e] for j, i in enumerate((plan.first, plan.down)) if i in sums}
            gate, up = mlp.branches(plan.expert, xs[a:b], t)
            act, pullback = vjp(plan.expert.act, gate)
            h = act * up if up is not None else act
            dh = linear.input_grad(dys[a:b], t, plan.expert.down)  # of the unweighted expert output
            if dws is not None:
                dws[a:b] = (h.to(wide) * dh.to(wide)).sum(-1)
            dh.mul_(ws[a:b])
            linear.weight_grads(expert_sums, expert_needs, t, plan.expert.down, h, dys[a:b] * ws[a:b], fp32)
            del h, gate
            du = None
            if up is not None:
                du = dh * act
                dh.mul_(up)  # now d activation
            (dgate,) = pullback(dh)
            del dh, act, up, pullback
            if du is not None:  # the fused projection's gradient: gate and up columns where they came from
                dfirst = torch.empty((dgate.shape[0], 2 * dgate.shape[1]), dtype=dgate.dtype, device=dgate.device)
                dfirst[:, plan.expert.gate_cols], dfirst[:, plan.expert.up_cols] = dgate, du
            else:
                dfirst = dgate
            linear.weight_grads(expert_sums, expert_needs, t, plan.expert.first, xs[a:b], dfirst, fp32)
            if dxs is not None:
                linear.input_grad(dfirst, t, plan.expert.first, out=dxs[a:b])
        if dx is not None:
            dx[lo:hi] = _per_token(dxs, inverse, k)
        if dw is not None:
            dw[lo:hi] = dws[inverse].view(-1, k)
    grads: list[Optional[torch.Tensor]] = [dx, None, dw]
    for i, tensor in enumerate(tensors):
        if i in sums:
            grads.append(sums.pop(i).to(tensor.dtype))
        else:
            grads.append(torch.zeros_like(tensor) if needs[n + i] else None)
    return grads

"""The projection + cross-entropy kernel: the loss over all rows, and its gradients, one shard of logits at a time.

Why gradients in the forward: the loss is one number, so the gradient arriving in backward is one
number ``g`` too, and every gradient is ``g`` times what the forward can already compute. So each shard
computes its logits ``z = h @ W^T (+ b)`` once, its part of the loss and ``dz``, and folds ``dz`` into
``dh`` and ``dW`` at once: three matmuls per shard, as many as an untiled step, and at no time more than
one shard of logits (DeepSpeed's ``TiledFusedLogitsLoss`` and torch's chunked ``linear_cross_entropy``
do the same). The op's backward then only scales the result by ``g``.

Exactness: every shard's loss is computed in at least fp32 and summed in fp64, and the total is cast once
to the dtype the untouched cross-entropy returns (its input's: a bf16 head without ``.float()`` gives a bf16
loss, closer to an fp64 reference than the untouched one's). The rows of a shard are summed with
``reduction="sum"`` and a mean is divided once by the denominator torch itself uses, ``sum over rows not ignored of weight[target]`` (the row count without
class weights); label smoothing follows the same rule. A shard whose rows are all ignored adds nothing,
and a batch whose rows are all ignored gives torch's NaN mean and zero gradients.

Two ways to compute a shard's ``dz``:

* fused, when the steps between the logits and the loss are casts and flattening only: softmax in place
  in one ``rows x V`` buffer (fp32, or fp64 for fp64 logits), so a shard holds one logits-sized tensor
  (two for bf16 weights: the bf16 ``dz`` the matmuls need);
* generic, for any other row-wise steps (soft-capping, scaling) and label smoothing: ``torch.func.vjp``
  of the steps and ``F.cross_entropy`` on the shard.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import vjp

from ..passes.kernel_plans import LossPlan
from . import linear
from .shards import finish, shard_bounds

__all__ = ["forward"]


def _denominator(plan: LossPlan, targets: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """What torch divides a mean by: the weight of the rows that are not ignored (a float64 scalar, so
    that it rounds nothing it scales, fp64 losses included)."""
    valid = targets != plan.ignore_index
    if plan.class_weight is None:
        return valid.sum().to(torch.float64)
    weight = tensors[plan.class_weight]
    return weight.double()[torch.where(valid, targets, 0)].mul_(valid).sum()


def _fused_dz(plan: LossPlan, z: torch.Tensor, y: torch.Tensor, tensors, scale: torch.Tensor, want_dz: bool):
    """(sum of the shard's losses, dz) with one ``rows x V`` buffer, at least fp32 (fp64 logits stay fp64):
    softmax computed in place (in the logits' own storage when they already have that dtype: the caller
    reuses that storage for every shard). Four passes over the buffer: max, exp, sum, and one scaling by
    ``coef / total`` (the softmax and the loss's weight at once) before the target's ``-coef`` is added."""
    dtype = z.dtype
    x = plan.steps(z)  # casts and flattening only
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    valid = y != plan.ignore_index
    safe = torch.where(valid, y, 0)
    w = tensors[plan.class_weight].to(x.dtype)[safe] * valid if plan.class_weight is not None else valid.to(x.dtype)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    top = x.amax(1, keepdim=True)
    x.sub_(top).exp_()
    total = x.sum(1, keepdim=True)
    lse = (total.log() + top).squeeze(1)
    loss = ((lse - picked) * w).sum()
    if not want_dz:
        return loss, None
    coef = torch.where(valid, w * scale, torch.zeros_like(w))[:, None]  # ignored rows: exactly zero, never 0 * inf
    x.mul_(coef / total)  # softmax times the row's coefficient
    x.scatter_add_(1, safe[:, None], -coef)  # minus the one-hot of the target, times the same coefficient
    if x.dtype == dtype:
        return loss, x
    return loss, z.view_as(x).copy_(x) if z.shape == x.shape else x.to(dtype)  # back to the logits' dtype, in their storage


def _generic_dz(plan: LossPlan, z: torch.Tensor, y: torch.Tensor, tensors, scale: torch.Tensor, want_dz: bool):
    weight = tensors[plan.class_weight] if plan.class_weight is not None else None

    def shard_loss(logits: torch.Tensor) -> torch.Tensor:
        x = plan.steps(logits)  # at least fp32 inside, as the fused path: the loss is cast once, at the end
        return F.cross_entropy(x.to(torch.promote_types(x.dtype, torch.float32)), y, weight=weight,
                               ignore_index=plan.ignore_index, reduction="sum", label_smoothing=plan.label_smoothing)

    if not want_dz:
        return shard_loss(z), None
    loss, pullback = vjp(shard_loss, z)
    (dz,) = pullback(scale.to(loss.dtype))
    return loss, dz


def forward(
    plan: LossPlan, h: torch.Tensor, targets: torch.Tensor, tensors: Sequence[torch.Tensor], shards: int,
    needs: Sequence[bool], fp32_sums: bool = True,
) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """The loss over all rows of ``h`` (``[N, H]``) and ``targets`` (``[N]``), and the gradient of that
    loss for each input that ``needs`` one (``[h, *tensors]``; None elsewhere)."""
    want = any(needs)
    denom = _denominator(plan, targets, tensors)
    scale = (1.0 / denom) if plan.reduction == "mean" else torch.ones((), dtype=torch.float64, device=h.device)
    grad_h = torch.empty_like(h) if needs[0] else None
    sums: dict[int, torch.Tensor] = {}
    total = None
    no_rows = linear.linear(h[:0], tensors, plan.head)
    # the dtype the untouched cross-entropy returns: its input's (bf16 logits without a cast give a bf16 loss)
    dtype = plan.steps(no_rows).dtype
    shard_dz = _fused_dz if plan.fused else _generic_dz
    bounds = shard_bounds(h.shape[0], shards)
    # One logits buffer for every shard where the fused path computes in it (not under autocast, where the
    # matmul's dtype is autocast's): no allocation, and no page faults on fresh memory, per shard.
    reuse = plan.fused and (h.device.type == "meta" or not torch.is_autocast_enabled(h.device.type))  # meta has no autocast
    logits = no_rows.new_empty((max((b - a for a, b in bounds), default=0), no_rows.shape[1])) if reuse else None
    for lo, hi in bounds:
        x = h[lo:hi]
        z = linear.linear(x, tensors, plan.head, out=logits[: hi - lo] if reuse else None)
        loss, dz = shard_dz(plan, z, targets[lo:hi], tensors, scale, want)
        del z
        total = loss.double() if total is None else total.add_(loss.double())
        del loss
        if dz is None:
            continue
        linear.weight_grads(sums, needs[1:], tensors, plan.head, x, dz, fp32_sums)
        if grad_h is not None and dz.dtype == grad_h.dtype:
            linear.input_grad(dz, tensors, plan.head, out=grad_h[lo:hi])
        elif grad_h is not None:  # under autocast dz is bf16 while h may be fp32: a shard-sized temporary
            grad_h[lo:hi] = linear.input_grad(dz, tensors, plan.head)
        del dz
    assert total is not None
    value = (total / denom if plan.reduction == "mean" else total).to(dtype)
    # zeros where a gradient was asked for and none arose (the bias of rows that were all ignored)
    return value, finish([h], tensors, {0: grad_h} if grad_h is not None else {}, {i + 1: s for i, s in sums.items()}, needs)

"""The plans a region's kernel follows: plain data, no fx, no graphs (the kernels import only this).

:mod:`.plans` and :mod:`.loss_head` derive them from a region's graph; ``fxtile.kernels`` computes from
them. Every plan names tensors by their index in the region's tensor list (the op's explicit inputs).

* :class:`Proj` - one projection's weight and bias;
* :class:`LinearMLP` - plain linear layers around a parameter-free, RNG-free element-wise activation;
* :class:`LossPlan` - a projection and the row-wise steps into a cross-entropy;
* :class:`BankPlan` - a routed expert bank's expert MLP over its stacked weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["BankPlan", "LinearMLP", "LossPlan", "Proj"]


@dataclass(frozen=True)
class Proj:
    """A projection: tensor-list indices of its weight and bias; ``transposed`` for Conv1D's [in, out]."""

    weight: int
    bias: Optional[int]
    transposed: bool


@dataclass(frozen=True)
class LinearMLP:
    """How to run a plain MLP region with explicit matmuls."""

    kind: str  # "gated" | "gated_fused" | "plain"
    first: Proj  # gate (gated), gate_up (gated_fused) or fc1 (plain)
    up: Optional[Proj]  # gated only
    down: Proj  # down or fc2
    act: Callable[[torch.Tensor], torch.Tensor]  # parameter-free and RNG-free, element-wise
    gate_cols: Optional[slice] = None  # gated_fused: which output columns of `first` are gate / up
    up_cols: Optional[slice] = None


@dataclass(frozen=True)
class LossPlan:
    """How to run a matched projection + cross-entropy: tensor-list indices and the loss's arguments."""

    head: Proj  # the projection: weight [V, H] and bias, indices into the op's tensor list
    steps: Callable[[torch.Tensor], torch.Tensor]  # logits -> the cross-entropy's input (row-wise)
    fused: bool  # the steps are casts and flattening only
    ignore_index: int
    reduction: str  # "mean" | "sum"
    label_smoothing: float
    class_weight: Optional[int]  # index of the class weights, if any
    flattened: bool  # the steps flatten the logits to rows (else the logits must already be 2-D)


@dataclass(frozen=True)
class BankPlan:
    """A routed expert bank as explicit matmuls: tensor-list indices of its stacked first projection
    (``[E, 2I, H]`` gate and up fused, or ``[E, I, H]``; ``[E, H, .]`` stored transposed) and down
    projection, and one expert's MLP over ``[first[e], down[e]]`` (so its Proj indices are 0 and 1).
    Semantics (transformers' experts contract): ``out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t])``."""

    first: int  # index of the stacked first projection in the op's tensor list
    down: int  # index of the stacked down projection
    num_experts: int
    expert: LinearMLP  # one expert, over ``[first[e], down[e]]`` (its Proj indices are 0 and 1)

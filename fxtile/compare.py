"""One way to compare a tiled result with its reference, used by the self-check, ``fxtile convert`` and
the coverage sweep (tests wrap it in assertions).

The error is relative to the reference tensor's magnitude, ``max|got - ref| / max(max|ref|, floor)``:
a scale-free number, so one tolerance per dtype holds for logits, losses and gradients alike. ``floor``
is the magnitude below which a difference counts as absolute: a whole model's check uses 1 (a gradient
that is zero in exact arithmetic, such as an attention key bias's, is rounding noise in both models),
the region self-check a tiny one (its probe has no such cancellations, and small values must not hide
an error).
"""

from __future__ import annotations

import math

import torch

__all__ = ["max_error", "tolerance"]


def max_error(reference: torch.Tensor, got: torch.Tensor, floor: float = 0.0) -> float:
    """``max|got - ref| / max(max|ref|, floor)`` (0 for equal tensors; NaNs in the same places count as
    equal; ``inf`` for a shape mismatch or any difference from an all-zero reference without a floor)."""
    if reference.shape != got.shape:
        return math.inf
    if reference.numel() == 0:
        return 0.0
    wide = torch.float64 if reference.dtype == torch.float64 else torch.float32
    ref, out = reference.detach().to(wide), got.detach().to(reference.device, wide)
    worst = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    if math.isnan(worst) or math.isnan(scale):  # compare again, NaNs in the same places counting as equal
        both = torch.isnan(ref) & torch.isnan(out)
        if not torch.equal(torch.isnan(ref), both) or not torch.equal(torch.isnan(out), both):
            return math.inf
        worst = torch.where(both, 0.0, (out - ref).abs()).max().item()
        scale = torch.where(both, 0.0, ref.abs()).max().item()
    scale = max(scale, floor)
    if worst == 0.0:
        return 0.0
    return worst / scale if scale > 0 else math.inf


def tolerance(dtype: torch.dtype) -> float:
    """The relative error allowed for reordered sums in ``dtype`` (shards sum a weight gradient in another
    order than one call does); a computation that is not token-wise is off by O(1)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 4e-2)

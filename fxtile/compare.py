"""One way to compare a tiled result with its reference, used by the self-check, ``fxtile convert`` and
the coverage sweep (tests wrap it in assertions).

The error is relative to the reference tensor's magnitude, ``max|got - ref| / max(max|ref|, floor)``:
a scale-free number, so one tolerance per dtype holds for logits, losses and gradients alike. ``floor``
is the magnitude below which a difference counts as absolute: a whole model's check uses 1 (a gradient
that is zero in exact arithmetic, such as an attention key bias's, is rounding noise in both models),
the region self-check a tiny one (its probe has no such cancellations, and small values must not hide
an error).

Why in chunks: the tensors compared include weight gradients (a Llama-3-8B MLP's are 176 M values), and
comparing them in one piece allocates several temporaries of that size (the widened copy, the
difference, its absolute value). Chunks of :data:`CHUNK` elements keep the extra memory at a few MiB
and the cost at one pass over each tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CHUNK", "max_error", "tolerance"]

CHUNK = 1 << 20  # elements compared at a time


def _worst_and_scale(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """``(max|out - ref|, max|ref|)`` of two flat chunks; NaNs in the same places count as equal, NaNs
    elsewhere give ``inf``."""
    wide = torch.float64 if ref.dtype == torch.float64 else torch.float32
    ref, out = ref.to(wide), out.to(ref.device, wide)
    diff = (out - ref).abs_()
    worst, scale = diff.max().item(), ref.abs().max().item()
    if math.isnan(worst) or math.isnan(scale):
        ref_nan, out_nan = torch.isnan(ref), torch.isnan(out)
        if not torch.equal(ref_nan, out_nan):
            return math.inf, scale
        worst = torch.where(ref_nan, 0.0, diff).max().item()
        scale = torch.where(ref_nan, 0.0, ref.abs()).max().item()
    return worst, scale


def max_error(reference: torch.Tensor, got: torch.Tensor, floor: float = 0.0) -> float:
    """``max|got - ref| / max(max|ref|, floor)`` (0 for equal tensors; NaNs in the same places count as
    equal; ``inf`` for a shape mismatch or any difference from an all-zero reference without a floor)."""
    if reference.shape != got.shape:
        return math.inf
    if reference.numel() == 0:
        return 0.0
    ref, out = reference.detach().reshape(-1), got.detach().reshape(-1)
    worst, scale = 0.0, 0.0
    for start in range(0, ref.numel(), CHUNK):
        w, s = _worst_and_scale(ref[start:start + CHUNK], out[start:start + CHUNK])
        worst, scale = max(worst, w), max(scale, s)
    scale = max(scale, floor)
    if worst == 0.0:
        return 0.0
    return worst / scale if scale > 0 else math.inf


def tolerance(dtype: torch.dtype) -> float:
    """The relative error allowed for reordered sums in ``dtype`` (shards sum a weight gradient in another
    order than one call does); a computation that is not token-wise is off by O(1)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 4e-2)

"""The self-check: run every rewrite numerically before it is installed.

Why: the matcher admits token-wise code only, but no static rule sees every module: an ``nn.Linear``
subclass whose forward centres its input over the tokens looks like a projection and is not token-wise.
So each region, once built, runs on a small random probe twice, through the tiled op in 3 uneven shards
and through the original region untiled (its meta template on the live tensors, one call over all rows),
forward and backward, and its gradients for every input and every weight that needs one are compared.
A region that disagrees is not installed; ``fxtile.find(model).skipped`` gives the measured error.

The probe runs in the region's own dtype and device, in the train/eval modes its modules have (the modes
the next call will run in: a module may take another path in eval mode, and bitsandbytes' 4-bit layers
even repack their weights on a CPU eval call), with the caller's RNG state and autocast left untouched.
A region that draws random numbers (dropout in training) is compared with the same shards run untiled
from the same generator state: that checks the op and its replay of the draws, while its token-wise
structure rests on the matcher alone. Regions
whose weights are on the meta device or partitioned (DeepSpeed ZeRO-3) cannot run: they are reported as
not verified. Cost: on 8 rows, the region's forward and backward twice (tiled and untiled) and one more
forward that tells whether it draws random numbers (then its shard-wise reference runs too); see the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .compare import max_error, tolerance
from .kernels.shards import shard_bounds
from .region import TiledRegion

__all__ = ["Check", "check_region"]

PROBE_ROWS, PROBE_SHARDS = 8, 3  # uneven shards of 2, 3 and 3 rows


@dataclass(frozen=True)
class Check:
    """``passed`` is None when the check could not run (``detail`` says why)."""

    passed: Optional[bool]
    error: Optional[float]  # the largest error relative to the reference tensor's magnitude
    detail: str


def _unavailable(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    if any(t.device.type == "meta" for t in tensors):
        return "not verified: its weights are on the meta device"
    if any(hasattr(t, "ds_id") and t.numel() == 0 for t in tensors):
        return "not verified: its weights are partitioned (DeepSpeed ZeRO-3)"
    return None


def _probe(tiled: TiledRegion, like: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for spec in tiled.region.inputs:
        shape = (PROBE_ROWS,) if spec.width is None else (PROBE_ROWS, spec.width)
        if spec.high is not None:
            out.append(torch.randint(0, spec.high, shape, generator=gen).to(like.device))
        else:
            out.append(torch.randn(shape, generator=gen).to(like.device, like.dtype).requires_grad_())
    return out


def _run(fn, inputs: list[torch.Tensor], tensors: Sequence[torch.Tensor], cotangent_seed: int):
    """Output, input grads and tensor grads of ``fn(inputs, tensors)`` under a fixed cotangent."""
    ins = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
    ts = [t.detach().requires_grad_() if (t.requires_grad and t.is_floating_point()) else t for t in tensors]
    out = fn(ins, ts)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed)).to(out.device, out.dtype)
    wrt = [x for x in (*ins, *ts) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(out, wrt, cot, allow_unused=True) if wrt else ()
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def _seeded(fn, seed: int = 0):
    torch.manual_seed(seed)
    return fn()


def check_region(tiled: TiledRegion, tensors: Sequence[torch.Tensor], modes: Sequence[bool]) -> Check:
    """Compare ``tiled`` with its untiled region on a probe, forward and every gradient, in ``modes`` (the
    live train/eval modes of the region's modules, in ``tiled.region.moded`` order)."""
    why = _unavailable(tensors)
    if why:
        return Check(None, None, why)
    region = tiled.region
    like = next((t for t in tensors if t.is_floating_point()), torch.empty(0))
    counters = dict(vars(region.counters))
    try:
        with torch.random.fork_rng(devices=[like.device] if like.device.type == "cuda" else []), \
                torch.enable_grad(), torch.autocast(like.device.type, enabled=False):
            inputs = _probe(tiled, like, torch.Generator().manual_seed(0))
            whole = _seeded(lambda: _run(lambda i, t: region.run(i, t, modes), inputs, tensors, 1))
            draws = not torch.equal(whole[0], _seeded(lambda: region.run(inputs, tensors, modes), seed=1))
            if draws and region.loss is not None:
                return Check(None, None, "not verified: it draws random numbers, and its output (one loss) "
                                         "cannot be compared shard by shard")
            if draws:  # random draws (dropout in training): shards draw other numbers than
                # one call, so compare with the same shards run untiled from the same generator state
                shard_wise = lambda i, t: torch.cat([region.run([x[lo:hi] for x in i], t, modes)  # noqa: E731
                                                     for lo, hi in shard_bounds(PROBE_ROWS, PROBE_SHARDS)])
                whole = _seeded(lambda: _run(shard_wise, inputs, tensors, 1))
            ref = whole
            got = _seeded(lambda: _run(lambda i, t: tiled.run_tiled(i, t, modes, PROBE_SHARDS), inputs, tensors, 1))
    except Exception as exc:  # noqa: BLE001 - a region that cannot run on the probe is not installed
        return Check(False, None, f"self-check could not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    finally:
        vars(region.counters).update(counters)  # the probe is not the user's work
    worst = 0.0
    names = ["output"] + [f"gradient {i}" for i in range(len(ref[1]))]
    # the lowest precision among the output and the gradients bounds the rounding (an fp32 loss of fp64 logits)
    limit = max(tolerance(t.dtype) for t in [ref[0], *ref[1]])
    for name, a, b in zip(names, [ref[0], *ref[1]], [got[0], *got[1]]):
        err = max_error(a, b, floor=1e-6)
        worst = max(worst, err)
        if not err <= limit:
            what = "output" if name == "output" else "a gradient"
            return Check(False, err, f"self-check failed: the tiled {what} differs from the untiled region's by "
                                     f"{err:.2g} (relative, {str(ref[0].dtype).removeprefix('torch.')}), so it is not token-wise")
    how = ", shard by shard: it draws random numbers" if draws else ""
    return Check(True, worst, f"verified (max relative error {worst:.1e}{how})")

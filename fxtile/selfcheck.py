"""The self-check: run every rewrite numerically before it is installed.

Why: the matcher admits token-wise code only, but no static rule sees every module: an ``nn.Linear``
subclass whose forward centres its input over the tokens looks like a projection and is not token-wise.
So each region, once built, runs on a small random probe twice, through the tiled op in 3 uneven shards
and through the original region untiled (its meta template on the live tensors, one call over all rows),
forward and backward, and its gradients for every input and every weight that needs one are compared.
A region that disagrees is not installed; ``fxtile.find(model).skipped`` gives the measured error.

The probe runs in the region's dtype and device, in the train/eval modes its modules have (the modes
the next call will run in: a module may take another path in eval mode, and bitsandbytes' 4-bit layers
even repack their weights on a CPU eval call), with the caller's RNG state and autocast left untouched.
A region that draws random numbers (dropout in training; seen as the generator's state moving during
the untiled run) is compared with the same shards run untiled from the same generator state: that
checks the op and its replay of the draws, while its token-wise structure rests on the matcher alone.
Regions whose weights are on the meta device or partitioned (DeepSpeed ZeRO-3) cannot run: they are
reported as not verified.

What it costs, and the shortcuts that keep it cheap at real sizes without weakening it:

* **Once per structure.** Regions with the same generated code, leaf types and Python state, tensor
  shapes, dtypes and devices, and modes compute the same function of their weights; whether that
  function is token-wise and whether the op reproduces it does not depend on the weights' values (the
  failures the check exists for are structural: a leaf that mixes tokens, a mode-dependent path, a
  random draw the recompute does not replay). So the 32 MLPs of a Llama are checked once
  (:func:`structure_key`; the caller keeps the verdicts).
* **Narrowed where the matcher read every node.** The explicit-matmul MLP (exact ``nn.Linear`` layers or
  ``F.linear`` around a whitelisted, parameter-free, RNG-free element-wise activation) and the loss head
  (an exact ``nn.Linear``/``F.linear`` and whitelisted row-wise steps into a cross-entropy) contain nothing
  the matcher did not read, so what the check tests there is the op's plan (the kernel's matmuls, the
  loss's options), which does not depend on the hidden width. They run with the hidden width cut to
  :data:`NARROW` (the weights sliced; ``nn.Linear``'s forward reads nothing but its tensors): cost
  independent of the model's size. Everything else (``Conv1D``, which reads its stored width, custom
  leaves, adapters, dropout, expert banks) runs at full size, as does a narrowed probe that raises.
* **fp32 where the dtype has no fast kernels.** On a CPU without native bf16/fp16 matmuls (AVX2 hosts)
  a full-size low-precision region is checked on fp32 copies of its weights: the failure classes are
  dtype-independent and fp32's tolerance is tighter. A region whose tensors are not all floating
  (quantized weights) or that fails in fp32 is checked in its own dtype.
* **One pass.** Randomness is read off the generator's state instead of a second forward, and weight
  gradients are compared in chunks (:func:`fxtile.compare.max_error`), never copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .compare import max_error, tolerance
from .passes.kernel_plans import LinearMLP, Proj
from .kernels.shards import shard_bounds
from .region import TiledRegion, python_state

__all__ = ["Check", "NARROW", "check_region", "structure_key"]

PROBE_ROWS, PROBE_SHARDS = 8, 3  # uneven shards of 2, 3 and 3 rows
NARROW = 64  # the hidden width a narrowed probe runs at


@dataclass(frozen=True)
class Check:
    """``passed`` is None when the check could not run (``detail`` says why)."""

    passed: Optional[bool]
    error: Optional[float]  # the largest error relative to the reference tensor's magnitude
    detail: str


def _kind(t: object) -> str:
    """A tensor's class for the structure key; ``nn.Parameter`` counts as a plain tensor (FSDP1 swaps
    parameters for plain views inside a wrapped module's forward, where a block traced per call may meet
    a new call signature: the verdict given at transform must still be found)."""
    cls = torch.Tensor if type(t) is nn.Parameter else type(t)
    return f"{cls.__module__}.{cls.__qualname__}"


def structure_key(tiled: TiledRegion, tensors: Sequence[torch.Tensor], modes: Sequence[bool]) -> tuple:
    """What decides the self-check's verdict on a region (see the module docstring): two regions with the
    same key compute the same function of their weights."""
    region = tiled.region
    return (
        getattr(region.template, "code", None) or _kind(region.template),
        tuple(f"{t.__module__}.{t.__qualname__}" for t in region.module_types),
        # public attributes only: frameworks add private ones later (FSDP's ``_fsdp_use_orig_params``, HF's
        # ``_is_hf_initialized``), while a module's configuration (PEFT's ``scaling``, ``r``) is public
        tuple(sorted(((k, v) for k, v in python_state(region.template).items() if not k[1].startswith("_")), key=repr)),
        tuple((tuple(t.shape), t.dtype, t.device.type, t.requires_grad, _kind(t)) for t in tensors),
        tuple(modes),
    )


def _unavailable(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    if any(t.device.type == "meta" for t in tensors):
        return "not verified: its weights are on the meta device"
    if any(hasattr(t, "ds_id") and t.numel() == 0 for t in tensors):
        return "not verified: its weights are partitioned (DeepSpeed ZeRO-3)"
    return None


def _plain(tensors: Sequence[torch.Tensor]) -> bool:
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


def _reads_no_width(cls: type) -> bool:
    """Module classes whose forward reads nothing but its tensors and its input: exact ``nn.Linear``,
    torch's activation modules and ``nn.CrossEntropyLoss``."""
    return cls in (nn.Linear, nn.CrossEntropyLoss) or cls.__module__ == "torch.nn.modules.activation"


def _narrowed(tiled: TiledRegion, tensors: Sequence[torch.Tensor]) -> Optional[tuple[int, list[torch.Tensor]]]:
    """``(hidden width, weights sliced to it)`` for a region the matcher read node by node (see the module
    docstring), or None. The input side of the first projections and the output side of the down
    projection (and its bias) are cut; the intermediate width, the vocabulary and every other tensor stay."""
    region = tiled.region
    if region.hidden_size <= NARROW or not _plain(tensors):
        return None
    if not all(_reads_no_width(t) for t in region.module_types):  # Conv1D's forward reads its stored width
        return None
    cuts: list[tuple[Proj, str]] = []
    if isinstance(region.fast, LinearMLP):
        plan = region.fast
        cuts = [(plan.first, "in"), (plan.down, "out")] + ([(plan.up, "in")] if plan.up is not None else [])
    elif region.loss is not None:
        cuts = [(region.loss.head, "in")]
    else:
        return None
    out = list(tensors)
    for proj, side in cuts:  # the output side to its own width (an MLP may map to another width than it reads)
        dim = (1 if side == "in" else 0) if not proj.transposed else (0 if side == "in" else 1)
        keep = min(NARROW, tensors[proj.weight].shape[dim])
        out[proj.weight] = tensors[proj.weight].detach().narrow(dim, 0, keep).contiguous()
        if side == "out" and proj.bias is not None:
            out[proj.bias] = tensors[proj.bias].detach()[:keep].contiguous()
    return NARROW, [t.requires_grad_(o.requires_grad) if t is not o else t for t, o in zip(out, tensors)]


def _fast_kernels(dtype: torch.dtype, device: torch.device) -> bool:
    """Does ``device`` have native matmuls for ``dtype``? (CPUs without AVX512-BF16/AMX emulate bf16.)"""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return True
    check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported
    try:
        return bool(check())
    except (AttributeError, RuntimeError):
        return False


def _widened(tiled: TiledRegion, tensors: Sequence[torch.Tensor]) -> Optional[tuple[int, list[torch.Tensor]]]:
    """``(hidden width, fp32 copies of the weights)`` for a low-precision region whose dtype has no fast
    kernels on its device, else None."""
    if not tensors or not _plain(tensors) or not all(t.is_floating_point() for t in tensors):
        return None
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or _fast_kernels(tensors[0].dtype, tensors[0].device):
        return None
    return tiled.region.hidden_size, [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def _probe(tiled: TiledRegion, like: torch.Tensor, gen: torch.Generator, width: int) -> list[torch.Tensor]:
    out = []
    for i, spec in enumerate(tiled.region.inputs):
        cols = width if i == 0 else spec.width  # the first input is the hidden states
        shape = (PROBE_ROWS,) if cols is None else (PROBE_ROWS, cols)
        if spec.high is not None:
            if cols is None:
                out.append(torch.randint(0, spec.high, shape, generator=gen).to(like.device))
            else:  # expert ids: distinct per row
                out.append(torch.stack([torch.randperm(spec.high, generator=gen)[:cols] for _ in range(PROBE_ROWS)])
                           .to(like.device))
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


def _generator_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _compare(tiled: TiledRegion, tensors: Sequence[torch.Tensor], modes: Sequence[bool], width: int):
    """``(reference, got, draws)`` on one probe: the untiled region (shard by shard from the same generator
    state if it draws random numbers) and the tiled op."""
    region = tiled.region
    like = next((t for t in tensors if t.is_floating_point()), torch.empty(0))
    inputs = _probe(tiled, like, torch.Generator().manual_seed(0), width)
    torch.manual_seed(0)
    before = _generator_state(like.device)
    ref = _run(lambda i, t: region.run(i, t, modes), inputs, tensors, 1)
    draws = not torch.equal(before, _generator_state(like.device))
    if draws and region.loss is not None:
        return None, None, draws
    if draws:  # random draws (dropout in training): shards draw other numbers than one call
        def shard_wise(i, t):
            return torch.cat([region.run([x[lo:hi] for x in i], t, modes) for lo, hi in shard_bounds(PROBE_ROWS, PROBE_SHARDS)])
        torch.manual_seed(0)
        ref = _run(shard_wise, inputs, tensors, 1)
    torch.manual_seed(0)
    got = _run(lambda i, t: tiled.run_tiled(i, t, modes, PROBE_SHARDS), inputs, tensors, 1)
    return ref, got, draws


def check_region(tiled: TiledRegion, tensors: Sequence[torch.Tensor], modes: Sequence[bool]) -> Check:
    """Compare ``tiled`` with its untiled region on a probe, forward and every gradient, in ``modes`` (the
    live train/eval modes of the region's modules, in ``tiled.region.moded`` order)."""
    why = _unavailable(tensors)
    if why:
        return Check(None, None, why)
    region = tiled.region
    counters = dict(vars(region.counters))
    # cheapest first; a cheaper probe that raises (a leaf refusing fp32 copies) falls back to the full one
    attempts = (_narrowed, _widened, lambda tiled, tensors: (region.hidden_size, list(tensors)))
    like = next((t for t in tensors if t.is_floating_point()), torch.empty(0))
    try:
        with torch.random.fork_rng(devices=[like.device] if like.device.type == "cuda" else []), \
                torch.enable_grad(), torch.autocast(like.device.type, enabled=False):
            for k, attempt in enumerate(attempts):
                try:
                    probe = attempt(tiled, tensors)
                    if probe is None:
                        continue
                    ref, got, draws = _compare(tiled, probe[1], modes, probe[0])
                    break
                except Exception:  # noqa: BLE001
                    if k == len(attempts) - 1:
                        raise
    except Exception as exc:  # noqa: BLE001 - a region that cannot run on the probe is not installed
        return Check(False, None, f"self-check could not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    finally:
        vars(region.counters).update(counters)  # the probe is not the user's work
    if ref is None:
        return Check(None, None, "not verified: it draws random numbers, and its output (one loss) "
                                 "cannot be compared shard by shard")
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

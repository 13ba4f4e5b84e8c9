"""How much memory a region takes in training, untiled and tiled, measured by replaying its own kernels.

Why replay rather than a formula: what autograd keeps depends on how each activation is written
(``F.silu`` keeps one tensor, GPT-2's tanh-GELU written as Python arithmetic keeps four), and the tiled
op's backward has its own working set (the recomputed shard, the input gradient it fills, the
weight-gradient sums). So the region's own code runs forward and backward, untiled under autograd and
tiled through the op's kernels (:mod:`fxtile.op`), and :class:`LiveBytes` counts every tensor storage
created from its allocation until it is freed. On the **meta device** this costs milliseconds at any
size (shapes only); an expert bank, whose routing is data-dependent, replays on its real weights at a few
dozen rows instead (its cost per row is small: only ``k`` experts run per row), or, with its weights on
the meta device, on small real instances of its class whose bytes are carried to its widths (:func:`scaled`).

What is counted: every byte the region adds above its input, its output, the gradient arriving at its
output, its weights and their ``.grad`` (which exist before the step, as in any step after the first:
so the untiled step's weight gradients count as the transients they are, added into ``.grad`` one at a
time, while the tiled op hands back every weight's gradient at once and, for bf16/fp16 weights with
fp32 sums, holds the sums first). That is the scenario least favourable to tiling, so a call the policy
tiles is cheaper in the others too.

:func:`profile` fits :class:`fxtile.policy.MemoryProfile` (peaks linear in the rows, and in the rows of
one shard) from five replays; :func:`replay_untiled` and :func:`replay_tiled` give the peak at one size,
as ``fxtile.estimate`` reports it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import weakref
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import op
from .kernels import loss as loss_kernel
from .passes.experts import shrink_factor, shrunk_region
from .policy import MemoryProfile
from .region import Region

__all__ = ["LiveBytes", "bank_terms", "uncounted", "profile", "profile_of", "replay_tiled", "replay_untiled", "replay_tensors", "replay_rows"]

META_ROWS = 2048  # replay sizes on meta (free at any size: large, where the kernels' peaks are reached)
REAL_ROWS = 64  # and on real weights (expert banks)
BANK_ROWS = 8192  # an expert bank without real weights: its profile is fitted at about these many rows and twice


_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("fxtile_live_bytes", default=())
_PAUSED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("fxtile_live_bytes_paused", default=frozenset())


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """What runs inside is no part of what the :class:`LiveBytes` counters active at entry count (counters
    entered inside count as usual). For fxtile's own one-time work during a counted step: a block traced
    per call builds its graph on its first call (copying each region's weights onto meta, checking and
    profiling a new region), which a real run does once, in its first step, and the planner does not count.
    The counters are this thread's (a context variable): the meta steps the planner counts run on its own."""
    token = _PAUSED.set(_PAUSED.get() | {id(counter) for counter in _ACTIVE.get()})
    try:
        yield
    finally:
        _PAUSED.reset(token)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it, from creation until it is freed.

    A storage's Python object lives exactly as long as the storage (PyTorch preserves it), so a weak
    reference's callback marks the free. Views share their base's storage and are counted once.
    Storages that existed before (weights, input, output gradient) are never counted, and neither is what
    runs under :func:`uncounted`.
    """

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._entered: list[contextvars.Token] = []  # one token per (nested) entry
        self._refs: dict[int, Optional[weakref.ref]] = {}
        self._existing = [t.untyped_storage() for t in existing]
        for storage in self._existing:
            self._refs[id(storage)] = None

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._refs:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self.live -= size
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def __enter__(self):
        self._entered.append(_ACTIVE.set(_ACTIVE.get() + (self,)))
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.reset(self._entered.pop())
        return super().__exit__(*exc)

    def counting(self) -> bool:
        return id(self) not in _PAUSED.get()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counting():
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    self._count(value)
        return out


def replay_tensors(tensors: Sequence[torch.Tensor], device: Union[str, torch.device],
                   dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """Stand-ins for a region's weights on ``device`` (``"meta"``: shapes only; else copies of the values),
    floating ones at ``dtype`` if given. Trainable ones get a ``.grad`` (see the module docstring)."""
    out = []
    for value in tensors:
        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if str(device) == "meta":  # a ZeRO-3 partitioned parameter is empty here: its full shape is ds_shape
            shape = getattr(value, "ds_shape", value.shape) if value.numel() == 0 else value.shape
            tensor = torch.empty(shape, dtype=cast, device="meta")
        else:
            tensor = value.detach().to(cast)
        tensor.requires_grad_(bool(value.requires_grad) and tensor.is_floating_point())
        if tensor.requires_grad:
            tensor.grad = torch.zeros_like(tensor)
        out.append(tensor)
    return out


def replay_rows(region: Region, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
    """A call's activation inputs at ``rows`` rows, shaped as ``region.inputs`` says (on ``like``'s device and
    dtype; class indices and expert ids below their bound, distinct per row for expert ids)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for spec in region.inputs:
        shape = (rows,) if spec.width is None else (rows, spec.width)
        if spec.high is None:
            t = torch.empty(shape, dtype=like.dtype, device=like.device) if like.device.type == "meta" else \
                torch.randn(shape, generator=gen).to(like.device, like.dtype)
            out.append(t.requires_grad_())
        elif like.device.type == "meta":
            out.append(torch.empty(shape, dtype=torch.long, device="meta"))
        elif spec.width is None:
            out.append(torch.randint(0, spec.high, shape, generator=gen).to(like.device))
        else:  # expert ids: ``width`` distinct experts per row
            out.append(torch.stack([torch.randperm(spec.high, generator=gen)[:spec.width] for _ in range(rows)])
                       .to(like.device))
    return out


def replay_untiled(region: Region, rows: list[torch.Tensor], tensors: list[torch.Tensor],
                   modes: Sequence[bool]) -> tuple[int, int]:
    """``(kept, peak)`` bytes of the region run once under autograd, forward and backward."""
    grads = [t.grad for t in tensors if t.grad is not None]
    with LiveBytes([*rows, *tensors, *grads]) as counter:
        y = region.run(rows, tensors, modes)
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()  # the output and its incoming gradient
        kept = counter.live - out_bytes
        torch.autograd.backward(y, dy)
        peak = counter.peak - out_bytes
        del y, dy
    for row in rows:
        row.grad = None
    return kept, peak


def _accumulate(tensors: list[torch.Tensor], needs: list[bool], result: list, n_rows: int) -> None:
    """What AccumulateGrad does with the op's weight gradients."""
    for tensor, need, grad in zip(tensors, needs[n_rows:], result[n_rows:]):
        if need and grad is not None:
            tensor.grad.add_(grad)


def replay_tiled(region: Region, rows: list[torch.Tensor], tensors: list[torch.Tensor], modes: Sequence[bool],
                 shards: int, fp32_sums: bool = True) -> tuple[int, int]:
    """``(kept, peak)`` bytes of the op's own forward and backward kernels, run as autograd runs them."""
    r_in, t_in = [r.detach() for r in rows], [t.detach() for t in tensors]
    grads = [t.grad for t in tensors if t.grad is not None]
    needs = [r.requires_grad for r in rows] + [t.requires_grad for t in tensors]
    n = len(rows)
    if region.loss is not None:  # the loss op: every gradient computed in its forward, kept until backward
        with LiveBytes([*r_in, *t_in, *grads]) as counter, torch.no_grad():
            _, result = loss_kernel.forward(region.loss, r_in[0], r_in[1], t_in, shards, needs[:1] + needs[2:], fp32_sums)
            kept = counter.live
            _accumulate(tensors, needs[:1] + needs[2:], result, 1)  # backward scales them in place, hands them over
            del result
            return kept, counter.peak
    with LiveBytes([*r_in, *t_in, *grads]) as counter, torch.no_grad():
        y = op.forward_kernel(region, r_in, t_in, shards, modes)
        dy = torch.empty_like(y)
        out_bytes = 2 * y.untyped_storage().nbytes()
        kept = counter.live - out_bytes  # the op saves its inputs and weights: nothing new
        no_rng = torch.empty(0, dtype=torch.uint8)
        result = op.backward_kernel(region, dy, r_in, t_in, shards, modes, no_rng, needs, fp32_sums=fp32_sums)
        _accumulate(tensors, needs, result, n)
        del result, y, dy
        return kept, counter.peak - out_bytes


def _raw(region: Region, live: Sequence[torch.Tensor], modes: Sequence[bool], device, a: int) -> dict[tuple, int]:
    """``(kept, peak)`` bytes of the profile's replays, by ``("untiled", m, 0)`` and ``("tiled", m, shards, fp32)``
    for ``m x a`` rows: untiled at ``a`` and ``2a`` rows, tiled at ``(a, 1)``, ``(2a, 2)``, ``(2a, 1)`` per precision."""
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in live if t.is_floating_point())
    like = torch.empty(0, dtype=next(t for t in live if t.is_floating_point()).dtype, device=device)
    raw: dict[tuple, int] = {}
    with torch.random.fork_rng(devices=[]):
        for rows in (a, 2 * a):
            raw["untiled", rows // a, 0] = replay_untiled(region, replay_rows(region, rows, like), replay_tensors(live, device),
                                                     modes)
        for fp32 in ((False, True) if low else (True,)):
            for rows, shards in ((a, 1), (2 * a, 2), (2 * a, 1)):
                raw["tiled", rows // a, shards, fp32] = replay_tiled(region, replay_rows(region, rows, like),
                                                                replay_tensors(live, device), modes, shards, fp32)
    return raw


def _terms(raw: dict[tuple, float], a: float) -> dict[str, float]:
    """The fitted terms (bytes) of the region's peaks and of what it keeps, from :func:`_raw`'s replays at ``a``
    and ``2a`` rows: ``untiled_fixed``, ``untiled_per_row``, ``kept_fixed``, ``kept_per_row``, and per precision
    of the sums ``i`` (0: the weights' dtype, 1: fp32) ``tiled_fixed_i``, ``tiled_per_row_i``,
    ``tiled_per_shard_row_i``, ``tiled_kept_i`` (what the op keeps, per row)."""
    u1, u2 = raw["untiled", 1, 0], raw["untiled", 2, 0]
    terms = {"untiled_per_row": (u2[1] - u1[1]) / a, "kept_per_row": (u2[0] - u1[0]) / a}
    terms["untiled_fixed"] = u1[1] - terms["untiled_per_row"] * a
    terms["kept_fixed"] = u1[0] - terms["kept_per_row"] * a
    for fp32 in (False, True):
        i = int(fp32)
        if ("tiled", 1, 1, fp32) not in raw:  # one precision (fp32 weights): its terms stand for both
            fp32 = True
        t = {(m * a, shards): raw["tiled", m, shards, fp32] for m, shards in ((1, 1), (2, 2), (2, 1))}
        per_row = (t[2 * a, 2][1] - t[a, 1][1]) / a
        per_shard_row = (t[2 * a, 1][1] - t[2 * a, 2][1]) / a
        terms[f"tiled_fixed_{i}"] = t[a, 1][1] - (per_row + per_shard_row) * a
        terms[f"tiled_per_row_{i}"], terms[f"tiled_per_shard_row_{i}"] = per_row, per_shard_row
        terms[f"tiled_kept_{i}"] = t[2 * a, 2][0] / (2 * a)
    return terms


def profile_of(terms: dict[str, float]) -> MemoryProfile:
    return MemoryProfile(
        untiled_fixed=max(0.0, terms["untiled_fixed"]), untiled_per_row=terms["untiled_per_row"],
        tiled_fixed=(terms["tiled_fixed_0"], terms["tiled_fixed_1"]),
        tiled_per_row=(terms["tiled_per_row_0"], terms["tiled_per_row_1"]),
        tiled_per_shard_row=(terms["tiled_per_shard_row_0"], terms["tiled_per_shard_row_1"]),
    )


def _failed(exc: BaseException) -> str:
    return f"not profiled: its replay failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def profile(region: Region, live: Sequence[torch.Tensor], modes: Sequence[bool]) -> Union[MemoryProfile, str]:
    """The region's :class:`~fxtile.policy.MemoryProfile` for weights like ``live``, or why it could not be
    measured. Five replays: untiled at ``a`` and ``2a`` rows, tiled at ``(a rows, 1 shard)``, ``(2a, 2)``
    and ``(2a, 1)``, which separate the fixed workspace, the buffers over every row and one shard's
    working set; per precision of the sums where the weights are bf16/fp16. An expert bank whose
    weights are on the meta device is measured on small real instances and scaled (:func:`bank_terms`)."""
    on_meta = not _routed(region)
    if not on_meta and any(t.device.type == "meta" for t in live):
        found = bank_terms(region, live, modes)
        return found if isinstance(found, str) else profile_of(found)
    device = "meta" if on_meta else live[0].device
    if not on_meta and any(hasattr(t, "ds_id") and t.numel() == 0 for t in live):
        return "not profiled: its routing needs real weights, and they are partitioned"
    if not any(t.is_floating_point() for t in live):
        return "not profiled: it reads no floating tensor"
    try:
        a = META_ROWS if on_meta else _bank_rows(region)
        terms = _terms(_raw(region, live, modes, device, a), a)
    except Exception as exc:  # noqa: BLE001 - code that cannot replay (a leaf without meta kernels) is not profiled
        return _failed(exc)
    return profile_of(terms)


# ---------------------------------------------------------------------------------------------
# Expert banks without real weights: small real instances, scaled

SCALES = (1, 2, 3)  # the small instances: widths (full // factor) x scale, rows x scale


def _routed(region: Region) -> bool:
    return any(spec.high is not None and spec.width is not None for spec in region.inputs)


def _bank_rows(region: Region) -> int:
    """Rows for a bank's replays: enough that every expert gets routed rows (about 8 per expert)."""
    ids = next(spec for spec in region.inputs if spec.high is not None)
    return max(REAL_ROWS, -(-8 * ids.high // ids.width))


def _small_region(region: Region, live: Sequence[torch.Tensor], factor: int, scale: int,
                  dtype: torch.dtype) -> tuple[Region, list[torch.Tensor]]:
    """The bank as a small real region: the same class, its widths ``// factor * scale``, the same kernel plan
    (the hypothesis at the same place in its list), the same routed inputs (experts, top-k)."""
    small, _, spec = shrunk_region(region.template, region.label, factor, scale, dtype)
    plan = None
    if region.fast is not None:
        plan = spec.hypotheses[region.spec.hypotheses.index(region.fast)]
    spec = dataclasses.replace(spec, plan=plan, inputs=(spec.inputs[0], *region.inputs[1:]))
    params = dict(small.named_parameters())
    tensors = [params[p].detach().requires_grad_(t.requires_grad) for p, t in zip(spec.tensor_paths, live)]
    return Region(spec), tensors


def scaled(region: Region, live: Sequence[torch.Tensor], rows: int,
           replays: Callable[[Region, list[torch.Tensor], int], dict]) -> dict:
    """``replays(small, tensors, rows)`` (a dict of byte counts) for an expert bank at its full widths and
    ``rows`` rows, from small real CPU instances of its class, without its weights.

    Its routing is data-dependent (``nonzero``, ``histc``, ``bincount().tolist()``), so it cannot replay on
    the meta device. Every width of a bank (``H``, ``I``, ``2I``) is divided by one factor ``f``; a small
    instance with widths ``s/f`` of the full ones, run on ``s/f`` of the rows, allocates exactly ``(s/f)^2``
    of every tensor that is rows x width (activations, their gradients, shards) or width x width (weight
    gradients and their sums), at every moment: so its peak is the same moment as the full bank's. What
    does not scale so (index tensors of width ``k``, ``E x H`` biases, ``E``-sized counts) is at most linear
    in ``s``; three scales ``s = 1, 2, 3`` fix ``a s^2 + b s + c``, which is read at ``s = f``. The
    replays run in the weights' dtype with uniform random routing (every expert gets rows).
    """
    dtype = next((t.dtype for t in live if t.is_floating_point()), torch.float32)
    factor = shrink_factor(region.template)
    base = max(1, round(rows / factor))  # the smallest instance's rows (rows not a multiple of f: rounded)
    measured = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and several wait on each other on a busy host
    try:
        for s in SCALES:
            small, tensors = _small_region(region, live, factor, s, dtype)
            measured[s] = replays(small, tensors, base * s)
    finally:
        torch.set_num_threads(threads)

    def at_full(values: list[float]) -> float:  # Lagrange through the three scales, at s = factor
        return sum(v * math.prod((factor - o) / (s - o) for o in SCALES if o != s) for v, s in zip(values, SCALES))

    out = {}
    for key, value in measured[SCALES[0]].items():
        if isinstance(value, tuple):
            out[key] = tuple(at_full([measured[s][key][j] for s in SCALES]) for j in range(len(value)))
        else:
            out[key] = at_full([measured[s][key] for s in SCALES])
    return out


def bank_terms(region: Region, live: Sequence[torch.Tensor], modes: Sequence[bool]) -> Union[dict[str, float], str]:
    """:func:`_terms` for an expert bank at its full widths, without its weights (:func:`scaled`),
    fitted at ``BANK_ROWS`` and twice as many rows: about where tiling a bank starts to pay (``E x H / k``
    tokens for Mixtral-sized banks: see the shard policy)."""
    factor = shrink_factor(region.template)
    a = max(1, BANK_ROWS // factor) * factor
    try:
        raw = scaled(region, live, a, lambda small, tensors, rows: _raw(small, tensors, modes, "cpu", rows))
    except Exception as exc:  # noqa: BLE001
        return _failed(exc)
    return _terms(raw, a)


def bank_replay(region: Region, live: Sequence[torch.Tensor], modes: Sequence[bool], rows: int, shards: int,
                fp32_sums: bool) -> dict[str, tuple]:
    """An expert bank's ``(kept, peak)`` bytes at its full widths and ``rows`` rows without its weights
    (:func:`scaled`): ``"untiled"``, ``"tiled"`` in ``shards`` shards, and ``"frozen"`` (tiled, no weight
    gradients: the difference is the weight-gradient workspace)."""
    def replays(small: Region, tensors: list[torch.Tensor], n: int) -> dict:
        like = torch.empty(0, dtype=next(t for t in tensors if t.is_floating_point()).dtype)
        with torch.random.fork_rng(devices=[]):
            out = {"untiled": replay_untiled(small, replay_rows(small, n, like), replay_tensors(tensors, "cpu"), modes)}
            if shards > 1:
                out["tiled"] = replay_tiled(small, replay_rows(small, n, like), replay_tensors(tensors, "cpu"), modes,
                                            shards, fp32_sums)
                frozen = [t.detach() for t in replay_tensors(tensors, "cpu")]
                out["frozen"] = replay_tiled(small, replay_rows(small, n, like), frozen, modes, shards, fp32_sums)
        return out

    return scaled(region, live, rows, replays)

"""The tiled operator: run an MLP region over row shards, keep no activations, recompute in backward.

Why a ``torch.library.custom_op`` and not a plain ``autograd.Function``: under ``torch.compile`` a
custom op stays one opaque node whose backward is ours, so the memory saving survives compilation
(a traced ``autograd.Function`` gets inlined and its intermediates saved again). Inside a custom
op's kernel autograd is off, so each shard's backward is ``torch.func.vjp`` of the region.

The region's *structure* is a meta-device template (see ``passes.rewrite.meta_template``) found by
an integer id; its *tensors* are explicit inputs. So:

* every weight gets its gradient once per backward, summed over shards (DDP and FSDP see one
  gradient, never one per shard), also when the input needs no gradient;
* low-precision weight gradients are summed in fp32 and cast once;
* the recompute runs under the forward's autocast state and replays the forward's RNG state, so
  dropout masks and matmul precisions match the forward it differentiates;
* a deep copy of the model shares the template (structure), never its weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call, vjp

from . import linear_mlp
from .policy import ShardPolicy

__all__ = ["TiledRegion", "backward_kernel", "forward_kernel", "register_template", "shard_bounds"]


class _Region(NamedTuple):
    template: nn.Module  # the region's structure, tensors on the meta device
    names: tuple[str, ...]  # the template's tensor names, in the op's tensor-list order
    fast: Optional[linear_mlp.LinearMLP]  # explicit-matmul plan, when the region has that shape
    moded: tuple[nn.Module, ...]  # the template's copies of the live modules passed to the op, flattened


_TEMPLATES: list[_Region] = []  # id -> region; templates hold no memory, so they are never freed


def register_template(template: nn.Module, tensor_paths: tuple[str, ...], module_paths: tuple[str, ...] = ()) -> int:
    """Keep a region's meta template (and its fast-path plan, if any) for the op's kernels; returns its id.

    ``template`` is an fx region (``passes.rewrite.meta_template``) or a whole module run as one region
    (a routed expert bank); only a one-input fx region can have the explicit-matmul plan.
    """
    one_input = isinstance(template, fx.GraphModule) and sum(n.op == "placeholder" for n in template.graph.nodes) == 1
    fast = linear_mlp.plan(template, tensor_paths) if one_input else None
    moded = tuple(m for p in module_paths for m in template.get_submodule(p).modules())
    _TEMPLATES.append(_Region(template, tensor_paths, fast, moded))
    return len(_TEMPLATES) - 1


def fast_plan(
    region: int, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], autocast_dtype: str
) -> Optional[linear_mlp.LinearMLP]:
    """The explicit-matmul plan when it applies to this call: plain dtypes (autocast and mixed dtypes
    take the generic kernel, which follows autocast's casting rules op by op)."""
    fast = _TEMPLATES[region].fast
    if fast is None or autocast_dtype:
        return None
    return fast if all(t.dtype == rows[0].dtype for t in tensors) else None


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Exact, non-empty ``[lo, hi)`` row ranges (never assume ``torch.chunk`` returns ``shards`` pieces)."""
    n = max(1, min(shards, rows))
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def _run(region: int, modes: Sequence[bool], rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The region on these rows; every module in the template takes its live counterpart's train/eval
    mode (``modes``, flattened in ``_Region.moded`` order)."""
    template, names, _, moded = _TEMPLATES[region]
    for module, mode in zip(moded, modes):
        module.training = mode
    return functional_call(template, dict(zip(names, tensors)), tuple(rows), tie_weights=False, strict=True)


def autocast_dtype_of(device: torch.device) -> str:
    """The caller's autocast dtype on ``device`` by name ("" when off), handed to the op explicitly: the
    kernels must not read it from thread-local state, which a compiled graph does not carry into an
    opaque op, and which backward (run outside the forward's autocast context) no longer holds. A
    string, not ``Optional[dtype]``: custom ops flatten a ``None`` argument differently in backward."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return ""
    return str(torch.get_autocast_dtype(kind)).removeprefix("torch.")


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def _rng_state(device: torch.device) -> torch.Tensor:  # the generator dropout on `device` draws from
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: Optional[torch.Tensor]) -> Iterator[None]:
    """Run the recompute from the forward's RNG state, then put the caller's RNG back."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


@torch.library.custom_op("fxtile::tiled_forward", mutates_args=())
def tiled_forward(
    rows: list[torch.Tensor], tensors: list[torch.Tensor], region: int, shards: int, modes: list[bool],
    rng_state: Optional[torch.Tensor], autocast_dtype: str,
) -> torch.Tensor:
    """``region(*rows)`` shard by shard (``rng_state`` is only kept for the backward's replay)."""
    with _autocast(rows[0].device, autocast_dtype):
        return forward_kernel(rows, tensors, region, shards, modes, autocast_dtype)


def forward_kernel(
    rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], region: int, shards: int, modes: list[bool],
    autocast_dtype: str = "",
) -> torch.Tensor:
    """The forward op's kernel (autograd off): each shard written into one preallocated output.

    ``rows`` are the region's activation inputs, aligned on dim 0 (one row per token); every one is
    split at the same row bounds. Public so ``fxtile.estimate`` can replay it on the meta device.
    """
    fast = fast_plan(region, rows, tensors, autocast_dtype)
    if fast is not None:
        x, down = rows[0], tensors[fast.down.weight]
        out = x.new_empty((x.shape[0], down.shape[1] if fast.down.transposed else down.shape[0]))
        for lo, hi in shard_bounds(x.shape[0], shards):
            linear_mlp.forward_shard(fast, x[lo:hi], tensors, out[lo:hi])
        return out
    out: Optional[torch.Tensor] = None
    for lo, hi in shard_bounds(rows[0].shape[0], shards):
        y = _run(region, modes, [r[lo:hi] for r in rows], tensors)
        if out is None:
            out = y.new_empty((rows[0].shape[0], *y.shape[1:]))
        out[lo:hi] = y
    assert out is not None
    return out


@tiled_forward.register_fake
def _(rows, tensors, region, shards, modes, rng_state, autocast_dtype):
    with _autocast(rows[0].device, autocast_dtype):  # on fake tensors: shape and dtype only, no compute
        return _run(region, modes, rows, tensors)


@torch.library.custom_op("fxtile::tiled_backward", mutates_args=())
def tiled_backward(
    grad: torch.Tensor, rows: list[torch.Tensor], tensors: list[torch.Tensor], region: int, shards: int,
    modes: list[bool], rng_state: Optional[torch.Tensor], needs_grad: list[bool], autocast_dtype: str,
) -> list[torch.Tensor]:
    """Gradients ``[*d rows, *d tensors]`` by recomputing each shard (empty tensors where not needed),
    under the forward's autocast dtype."""
    with _autocast(rows[0].device, autocast_dtype):
        return backward_kernel(grad, rows, tensors, region, shards, modes, rng_state, needs_grad, autocast_dtype)


def backward_kernel(
    grad: torch.Tensor, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], region: int, shards: int,
    modes: list[bool], rng_state: Optional[torch.Tensor], needs_grad: Sequence[bool],
    autocast_dtype: str = "",
) -> list[torch.Tensor]:
    """The backward op's kernel (autograd off); public so ``fxtile.estimate`` can replay it on meta."""
    inputs = [*rows, *tensors]
    n_rows = len(rows)
    wanted = [i for i, need in enumerate(needs_grad) if need]
    row_grads = {i: torch.empty_like(rows[i]) for i in wanted if i < n_rows}
    sums: dict[int, torch.Tensor] = {}  # input index -> gradient summed over shards
    fast = fast_plan(region, rows, tensors, autocast_dtype)
    if fast is not None:
        x, grad_x, weight_sums = rows[0], row_grads.get(0), {}
        for lo, hi in shard_bounds(x.shape[0], shards):
            shard_grad_x = grad_x[lo:hi] if grad_x is not None else None
            linear_mlp.backward_shard(fast, x[lo:hi], grad[lo:hi], tensors, needs_grad[1:], weight_sums, shard_grad_x)
        sums = {i + n_rows: s for i, s in weight_sums.items()}
    else:
        with _replayed_rng(rows[0].device, rng_state):
            for lo, hi in shard_bounds(rows[0].shape[0], shards):
                shard = [r[lo:hi] for r in rows] + list(tensors)

                def shard_fn(*primals: torch.Tensor) -> torch.Tensor:
                    args = list(shard)
                    for i, value in zip(wanted, primals):
                        args[i] = value
                    return _run(region, modes, args[:n_rows], args[n_rows:])

                _, pullback = vjp(shard_fn, *[shard[i] for i in wanted])
                grads = pullback(grad[lo:hi], retain_graph=False)  # frees the shard's residuals as they are used
                del _, pullback  # before the next shard's recompute: one shard's intermediates alive at a time
                for i, g in zip(wanted, grads):
                    if i < n_rows:
                        row_grads[i][lo:hi] = g
                    else:
                        linear_mlp.accumulate(sums, i, g)
                del grads
    grads = {**row_grads, **{i: s.to(inputs[i].dtype) for i, s in sums.items()}}
    return [grads[i] if i in grads else rows[0].new_empty(0) for i in range(len(inputs))]  # fresh empties: no aliases


@tiled_backward.register_fake
def _(grad, rows, tensors, region, shards, modes, rng_state, needs_grad, autocast_dtype):
    return [torch.empty_like(t) if need else rows[0].new_empty(0) for t, need in zip([*rows, *tensors], needs_grad)]


def _setup_context(ctx, inputs, output) -> None:
    rows, tensors, region, shards, modes, rng_state, autocast_dtype = inputs
    ctx.save_for_backward(*rows, *tensors)
    ctx.n_rows = len(rows)
    ctx.rng_state = rng_state
    ctx.args = (region, shards, modes)
    ctx.autocast_dtype = autocast_dtype
    ctx.needs_grad = [t.requires_grad for t in (*rows, *tensors)]


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    rows, tensors = saved[: ctx.n_rows], saved[ctx.n_rows :]
    region, shards, modes = ctx.args
    grads = tiled_backward(
        grad, rows, tensors, region, shards, modes, ctx.rng_state, ctx.needs_grad, ctx.autocast_dtype
    )
    grads = [g if need else None for g, need in zip(grads, ctx.needs_grad)]
    # torch flattens a non-empty list[bool] argument as one leaf, an empty one as an empty list of tensors
    no_grad_for_modes = None if modes else []
    return grads[: ctx.n_rows], grads[ctx.n_rows :], None, None, no_grad_for_modes, None, None


tiled_forward.register_autograd(_backward, setup_context=_setup_context)


_SIMPLE = (bool, int, float, str, type(None))
_NOT_STATE = {"training", "_parameters", "_buffers", "_modules"}


def _freeze(value: object) -> object:
    """A comparable copy of plain Python state (scalars and containers of them); None for the rest."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_freeze(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items)
    if isinstance(value, dict):
        return tuple(sorted(((str(k), _freeze(v)) for k, v in value.items()), key=repr))
    return None


def _python_state(module: nn.Module) -> dict:
    """Plain Python attributes of ``module`` and its children, by (child index, name). Attributes a
    framework adds later (FSDP, DeepSpeed) are not compared: only the ones present when tiled."""
    return {
        (i, k): frozen
        for i, m in enumerate(module.modules())
        for k, v in vars(m).items()
        if k not in _NOT_STATE and "hook" not in k and (frozen := _freeze(v)) is not None
    }


class TiledRegion:
    """The callable an fx call node targets in place of a matched MLP region.

    ``region(inputs, modules, tensors)`` flattens every leading dim of the inputs into rows (any batch size),
    picks the shard count from its :class:`ShardPolicy`, and calls the tiled op, or the region
    directly when that count is 1 (short inputs keep the untiled speed).
    """

    def __init__(
        self, template_id: int, module_paths: tuple[str, ...], module_types: tuple[type, ...],
        tensor_paths: tuple[str, ...], policy: ShardPolicy, hidden_size: int, intermediate_size: int,
        stochastic: bool, label: str,
    ) -> None:
        self.template_id = template_id
        self.module_paths, self.module_types, self.tensor_paths = module_paths, module_types, tensor_paths
        self.policy, self.hidden_size, self.intermediate_size = policy, hidden_size, intermediate_size
        self.stochastic = stochastic
        template = _TEMPLATES[template_id].template  # its Python state is fixed: snapshot it once
        self._tiled_states = tuple(_python_state(template.get_submodule(p)) for p in module_paths)
        self.__name__ = self.__qualname__ = f"fxtile_{label}"  # how the generated forward names it
        self.__module__ = __name__

    def __repr__(self) -> str:
        return f"{self.__name__}(shards={self.policy.describe()})"

    def _check_state(self, modules: Sequence[nn.Module]) -> None:
        """The op runs a copy of the region's structure taken at transform time: refuse to run it if
        a module's Python state changed since (PEFT's disable_adapter/merge_adapter, a new scaling)."""
        for path, module, tiled_state in zip(self.module_paths, modules, self._tiled_states):
            live = _python_state(module)
            if any(live.get(key) != value for key, value in tiled_state.items()):
                raise RuntimeError(
                    f"fxtile: {path!r} inside {self.__name__} changed since fxtile.transform (its non-tensor "
                    "state differs, e.g. PEFT's disable_adapter() or merge_adapter()); call fxtile.restore(model) "
                    "before such changes and fxtile.transform(model) after them"
                )

    def __reduce__(self):
        raise TypeError(
            f"{self.__name__}: a tiled model cannot be pickled (its regions live in this process); "
            "call fxtile.restore(model) first, or save its state_dict()"
        )

    def shards_for(self, rows: int) -> int:
        return self.policy.count(rows, self.hidden_size, self.intermediate_size)

    def __call__(
        self, inputs: Sequence[torch.Tensor], modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        for path, module, expected in zip(self.module_paths, modules, self.module_types):
            if type(module) is not expected:
                raise RuntimeError(
                    f"fxtile: submodule {path!r} is now {type(module).__name__}, but was {expected.__name__} when "
                    "it was tiled; call fxtile.restore(model) and then fxtile.transform(model) again after "
                    "replacing submodules (e.g. apply PEFT before fxtile)"
                )
        modes = [m.training for module in modules for m in module.modules()]
        training = any(modes)
        if not torch.compiler.is_compiling():
            self._check_state(modules)
        lead = inputs[0].shape[:-1]  # every input shares these leading (token) dims
        rows = [t.reshape(lead.numel(), *t.shape[len(lead):]) for t in inputs]
        shards = self.shards_for(rows[0].shape[0])
        if shards == 1:
            out = _run(self.template_id, modes, rows, tensors)
        else:
            needs_rng = self.stochastic and training and torch.is_grad_enabled()
            rng = _rng_state(inputs[0].device) if needs_rng else None
            autocast_dtype = autocast_dtype_of(inputs[0].device)
            out = tiled_forward(rows, list(tensors), self.template_id, shards, modes, rng, autocast_dtype)
        return out.reshape(*lead, out.shape[-1])

"""A matched region, built once, and the callable that runs it tiled (the runtime side of a region).

:class:`Region` is built from the graph package's plain description (``fxtile.passes.cut.RegionSpec``:
the region's structure as a meta-device template, the paths of every tensor and module it reads, its
sizes, its probe, the explicit plan its kernel follows). It adds what lives at run time: the op's
counters, the memory profile the shard policy reads, and its registration with the op (held weakly
there), so it is freed with the model that owns it.

:class:`TiledRegion` is the fx call target that replaces the region in a rewritten forward: it owns its
``Region`` and a :class:`~fxtile.ShardPolicy`, flattens the leading dims of its inputs into rows, picks
the shard count and calls the op (or the region directly when one shard is enough). :class:`TiledLoss`
does the same for a projection and its cross-entropy; :func:`tiled` picks the class a plan needs.

A call whose input has another dtype than the region's weights (:meth:`TiledRegion.mismatched`) is first
tried untiled on one row: a region that casts its input itself takes it, and the call runs tiled as any
other. One the region refuses never enters the op, where it would fail dozens of frames deep
in ``torch._library`` and dynamo: it runs the region untiled, as the untouched model would, and so raises
at the call, the untiled region's own error with the region's name and the remedy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from . import op
from .passes.cut import RegionSpec
from .passes.kernel_plans import LossPlan
from .passes.specialize import ROOT
from .policy import CallPlan, MemoryProfile, ShardPolicy, Thresholds

__all__ = ["Mismatch", "Region", "TiledLoss", "TiledRegion", "python_state", "tiled"]


@dataclass(frozen=True)
class Mismatch:
    """An input of another dtype or device than a region's weights: what is wrong, the remedy, and whether
    the device differs."""

    why: str
    remedy: str
    device: bool


class Region:
    """Everything the op needs to run one matched region; built once, from its description."""

    def __init__(self, spec: RegionSpec) -> None:
        self.spec = spec
        self.template = spec.template  # the region's structure, tensors on the meta device, no hooks
        self.tensor_paths, self.module_paths, self.module_types = spec.tensor_paths, spec.module_paths, spec.module_types
        self.inputs, self.hidden_size, self.width = spec.inputs, spec.hidden_size, spec.width
        self.may_draw_random, self.label = spec.may_draw_random, spec.label
        # the explicit plan: the loss's (the region's output is the loss), or the fast path's (None: generic)
        self.loss: Optional[LossPlan] = spec.plan if isinstance(spec.plan, LossPlan) else None
        self.fast = None if self.loss is not None else spec.plan
        # its peak untiled and tiled as functions of the rows, set once built (fxtile.memory); None: not
        # profiled (``profile_note`` says why) and the shard rules decide alone
        self.profile: Optional[MemoryProfile] = None
        self.profile_note = "not profiled yet"
        # the template's copies of the live modules passed to the call, flattened: they take the live modes
        self.moded = tuple(m for p in self.module_paths for m in self.template.get_submodule(p).modules())
        self.counters = op.Counters()
        self.id = op.register(self)

    def run(self, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], modes: Sequence[bool]) -> torch.Tensor:
        """The region, untiled, on these rows and live tensors; every module of the template takes its
        live counterpart's train/eval mode (``modes``, in ``moded`` order)."""
        for module, mode in zip(self.moded, modes):
            module.training = mode
        return functional_call(self.template, dict(zip(self.tensor_paths, tensors)), tuple(rows),
                               tie_weights=False, strict=True)


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


def _class_names(*classes: type) -> list[str]:
    """Class names as a reader tells them apart: qualified where two share a name (PEFT's ``lora.Linear``
    and ``torch.nn.Linear``)."""
    short = [c.__qualname__ for c in classes]
    if len(set(short)) == len(short):
        return short
    return [f"{c.__module__}.{c.__qualname__}" for c in classes]


def python_state(module: nn.Module) -> dict:
    """Plain Python attributes of ``module`` and its children, by (child index, name). Attributes a
    framework adds later (FSDP, DeepSpeed) are not compared: only the ones present when tiled."""
    return {
        (i, k): frozen
        for i, m in enumerate(module.modules())
        for k, v in vars(m).items()
        if k not in _NOT_STATE and "hook" not in k and (frozen := _freeze(v)) is not None
    }


class TiledRegion:
    """The callable an fx call node targets in place of a matched region.

    ``tiled(inputs, modules, tensors)`` flattens every leading dim of the inputs into rows (any batch
    size), picks the shard count from its :class:`ShardPolicy`, and calls the tiled op, or the region
    directly when that count is 1 (short inputs keep the untiled speed). Deep copies of a model share it
    (it holds structure only: modules and tensors are arguments of each call).
    """

    def __init__(self, region: Region, policy: ShardPolicy, path: Optional[str] = None) -> None:
        self.region, self.policy = region, policy
        self._tiled_states = tuple(python_state(region.template.get_submodule(p)) for p in region.module_paths)
        self.thresholds: Optional[Thresholds] = None  # set with the region's profile (set_profile)
        self.itemsize = 4  # bytes per element of its weights (set when built): the loss's floor is counted in them
        self.path = path  # the block it was tiled in, for messages ("" the root; None: not said)
        self._warned_untiled = False  # a call the op does not cover was said once (run_untiled)
        self._accepted: dict[tuple, bool] = {}  # (input dtype, device) -> the region casts such an input itself
        self.__name__ = self.__qualname__ = region.label  # the generated forward calls it fxtile_<label>
        self.__module__ = "fxtile"

    def __repr__(self) -> str:
        return f"fxtile_{self.__name__}(shards={self.policy.describe()})"

    def __deepcopy__(self, memo: dict) -> "TiledRegion":
        return self

    def __reduce__(self):
        raise TypeError(
            f"fxtile_{self.__name__}: a tiled model cannot be pickled (its regions live in this process); "
            "call fxtile.restore(model) first, or save its state_dict()"
        )

    @property
    def module_paths(self) -> tuple[str, ...]:  # what passes.rewrite reads to build the call node
        return self.region.module_paths

    @property
    def tensor_paths(self) -> tuple[str, ...]:
        return self.region.tensor_paths

    def shards_for(self, rows: int) -> int:
        """The shard count the rules give ``rows`` rows, before the memory check of :meth:`call_plan`."""
        return self.policy.count(rows, self.region.hidden_size, self.region.width)

    def set_profile(self, profile: Optional[MemoryProfile], note: str) -> None:
        """The region's memory profile (None: not profiled, ``note`` says why), and the thresholds a call's plan
        is read from."""
        self.region.profile, self.region.profile_note = profile, note
        self.thresholds = self.policy.thresholds(self.shards_for, profile) if profile is not None else None

    def tiled_from(self) -> Optional[int]:
        """About the smallest number of rows at which a call runs tiled (below it, one untiled call costs less
        memory or the rules ask for one shard); None if no call does (within 2**26 rows)."""
        if self.thresholds is not None:
            return self.thresholds.tiled_from
        return next((rows for rows in (2 ** k for k in range(1, 27)) if self.call_plan(rows).shards > 1), None)

    def call_plan(self, rows: int) -> CallPlan:
        """How a call over ``rows`` rows runs: the rules' shard count, or untiled where the region's memory
        profile says tiling would not lower its peak, and the precision of the weight-gradient sums."""
        shards = self.shards_for(rows)
        if self.thresholds is None or self.policy.shards is not None:
            return CallPlan(shards, self.policy.accumulate != "param")
        plan = self.thresholds.plan(rows, shards)
        return plan if self.policy.accumulate == "auto" or plan.shards == 1 else CallPlan(shards, self.policy.accumulate == "fp32")

    def _check_modules(self, modules: Sequence[nn.Module]) -> None:
        """The op runs a copy of the region's structure taken at transform time: refuse to run it if a
        module was replaced or its Python state changed since (PEFT's disable_adapter/merge_adapter)."""
        for path, module, expected in zip(self.region.module_paths, modules, self.region.module_types):
            if type(module) is not expected:
                now, was = _class_names(type(module), expected)
                raise RuntimeError(
                    f"fxtile: submodule {path!r} is now {now}, but was {was} when it was tiled; call "
                    "fxtile.restore(model) and then fxtile.transform(model) again after replacing submodules "
                    "(e.g. apply PEFT before fxtile)"
                )
        if torch.compiler.is_compiling():
            return
        for path, module, tiled_state in zip(self.region.module_paths, modules, self._tiled_states):
            live = python_state(module)
            if any(live.get(key) != value for key, value in tiled_state.items()):
                raise RuntimeError(
                    f"fxtile: {path!r} inside region {self.__name__} changed since fxtile.transform (its non-tensor "
                    "state differs, e.g. PEFT's disable_adapter() or merge_adapter()); call fxtile.restore(model) "
                    "before such changes and fxtile.transform(model) after them"
                )

    def describe(self) -> str:
        """The region as messages name it: label, block (where known) and the submodules or tensors it reads."""
        names = ", ".join(n.removeprefix(ROOT + ".") for n in self.region.module_paths or self.region.tensor_paths)
        block = f" of {self.path}" if self.path else ""  # the model itself, or not said: no block to name
        return f"tiled region {self.__name__}{block} ({names})"

    @staticmethod
    def mismatched(x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Optional[Mismatch]:
        """What is wrong when ``x`` (the rows the region's first step reads) does not fit the op, else None:
        another device than the region's weights, or another floating dtype with autocast off, where the
        weights share one floating dtype and device. Mixed weights (quantized, an fp32 adapter on bf16
        layers) and the meta device are left to the op, and so is every call under ``torch.compile`` (the
        untiled region cannot be tried there: dynamo reports the error itself). Runs on every forward:
        dtypes and devices compared, nothing computed."""
        if (torch.compiler.is_compiling() or not tensors or not x.is_floating_point()
                or x.device.type == "meta"):
            return None
        dtype, device = tensors[0].dtype, tensors[0].device
        if not tensors[0].is_floating_point() or device.type == "meta":
            return None
        if any(t.dtype != dtype or t.device != device for t in tensors):
            return None
        if x.device != device:
            return Mismatch(f"got an input on {x.device}, but its weights are on {device}",
                            f"move the input with .to({str(device)!r}) or the model with model.to({str(x.device)!r})",
                            device=True)
        if x.dtype != dtype and not op.autocast_dtype_of(x.device):
            name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
            return Mismatch(f"got a {name(x.dtype)} input, but its weights are {name(dtype)}",
                            f"cast the input with .to({dtype}), convert the model with model.to({x.dtype}), or run "
                            "under torch.autocast", device=False)
        return None

    def accepts(self, mismatch: Mismatch, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
                modes: Sequence[bool]) -> bool:
        """Does the region take an input of this other dtype (it casts the input itself)? Then the call goes to
        the op as any other: for mixed dtypes the op runs the region's own code shard by shard, casts
        included. Tried once per input dtype, untiled on the first row, without gradients and with the
        random state put back (a region with dropout draws the same numbers afterwards). An input on another
        device never goes to the op (its explicit kernels do not move inputs): it runs untiled."""
        if mismatch.device:
            return False
        key = (rows[0].dtype, rows[0].device)
        if key not in self._accepted:
            cuda = torch.cuda.is_available()  # (a fake CUDA tensor on a CPU-only build has no generator to save)
            devices = sorted({t.device.index or 0 for t in (*rows, *tensors) if cuda and t.device.type == "cuda"})
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    self.region.run([r[:1] for r in rows], tensors, modes)
                self._accepted[key] = True
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, ValueError):
                self._accepted[key] = False
        return self._accepted[key]

    def run_mismatched(self, mismatch: Mismatch, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
                       modes: Sequence[bool]) -> torch.Tensor:
        """The region untiled on an input :meth:`mismatched` refused and :meth:`accepts` did not take, as the
        untouched model runs it: its own error, raised here with the region's name and the remedy (one short
        traceback instead of the op's; out-of-memory errors as they are), or its result (said once)."""
        try:
            return self.run_untiled(f"it {mismatch.why}", rows, tensors, modes)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError) as exc:
            message = f"fxtile: {self.describe()} {mismatch.why} (untiled: {exc}); {mismatch.remedy}"
            try:
                error = type(exc)(message)
            except Exception:  # noqa: BLE001 - a subclass that takes other arguments: its builtin base
                error = next(k for k in (RuntimeError, TypeError, ValueError) if isinstance(exc, k))(message)
            raise error from None

    def run_untiled(self, why: str, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
                    modes: Sequence[bool]) -> torch.Tensor:
        """The region untiled for a call the op does not cover, said once (the first call's reason)."""
        out = self.region.run(rows, tensors, modes)
        if not self._warned_untiled:
            self._warned_untiled = True
            warnings.warn(f"fxtile: {self.describe()} runs untiled for this call: {why}", stacklevel=4)
        return out

    @staticmethod
    def live_modes(modules: Sequence[nn.Module]) -> list[bool]:
        """The train/eval modes the call runs its template in: its live modules', in ``Region.moded`` order."""
        return [m.training for module in modules for m in module.modules()]

    def run_tiled(
        self, rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], modes: Sequence[bool], shards: int,
        fp32_sums: bool = True,
    ) -> torch.Tensor:
        """The op on these rows: differentiable, with the generator state captured when it will be."""
        needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (*rows, *tensors))
        autocast_dtype = op.autocast_dtype_of(rows[0].device)
        out, _ = op.tiled_forward(list(rows), list(tensors), self.region.id, shards, list(modes), needs_backward,
                                  autocast_dtype, fp32_sums)
        return out

    def __call__(
        self, inputs: Sequence[torch.Tensor], modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        self._check_modules(modules)
        modes = self.live_modes(modules)
        lead = inputs[0].shape[:-1] if self.region.inputs[0].width is not None else inputs[0].shape
        rows = [t.reshape(lead.numel(), *t.shape[len(lead):]) for t in inputs]
        mismatch = self.mismatched(inputs[0], tensors)
        if mismatch is not None and not self.accepts(mismatch, rows, tensors, modes):
            out = self.run_mismatched(mismatch, rows, tensors, modes)
            return out.reshape(*lead, *out.shape[1:])
        plan = self.call_plan(rows[0].shape[0])
        if plan.shards == 1:
            out = self.region.run(rows, tensors, modes)
        else:
            out = self.run_tiled(rows, tensors, modes, plan.shards, plan.fp32_sums)
        return out.reshape(*lead, *out.shape[1:])


class TiledLoss(TiledRegion):
    """The call target that replaces a projection + cross-entropy: ``tiled((h, targets), modules, tensors)``
    returns the loss, computed shard by shard without ever holding more than one shard of logits.

    A call the plan does not cover (targets that are not one class index per row, logits the graph does
    not flatten from a 2-D input) runs the region untiled, and says so once."""

    def shards_for(self, rows: int) -> int:
        return self.policy.loss_count(rows, self.region.hidden_size, self.region.width, self.itemsize)

    def run_tiled(self, rows, tensors, modes, shards, fp32_sums=True):
        h, targets = rows
        needs = [t.requires_grad and torch.is_grad_enabled() for t in (h, *tensors)]
        autocast_dtype = op.autocast_dtype_of(h.device)
        return op.tiled_cross_entropy(h, targets, list(tensors), self.region.id, shards, needs, autocast_dtype,
                                      fp32_sums)[0]

    def __call__(self, inputs, modules, tensors):
        self._check_modules(modules)
        modes = self.live_modes(modules)
        h, targets = inputs
        if not self.region.loss.flattened and h.dim() != 2:
            return self.run_untiled(f"its logits are {h.dim()}-D and never flattened to rows", inputs, tensors, modes)
        rows = h.reshape(-1, h.shape[-1])
        if targets.is_floating_point() or targets.numel() != rows.shape[0]:
            return self.run_untiled("its targets are not one class index per row", inputs, tensors, modes)
        flat = [rows, targets.reshape(-1)]
        mismatch = self.mismatched(h, tensors)
        if mismatch is not None and not self.accepts(mismatch, flat, tensors, modes):  # one row, not one sequence
            return self.run_mismatched(mismatch, flat, tensors, modes)
        plan = self.call_plan(rows.shape[0])
        if plan.shards == 1:
            return self.region.run(flat, tensors, modes)
        return self.run_tiled(flat, tensors, modes, plan.shards, plan.fp32_sums)


def tiled(spec: RegionSpec, policy: ShardPolicy, path: Optional[str] = None) -> TiledRegion:
    """The tiled callable for a region of the block at ``path``: a loss region returns its loss through the
    loss op."""
    region = Region(spec)
    return (TiledLoss if region.loss is not None else TiledRegion)(region, policy, path)

"""The memory of one whole training step, untiled and with fxtile, and the longest sequence that fits.

Activations (and the step's working memory) are *measured*: the real step,
``model(input_ids=ids, labels=ids).loss.backward()`` with activation checkpointing on, runs on the meta
device under :class:`StepBytes` (:class:`fxtile.memory.LiveBytes` that also follows marked storages).
States (weights, gradients, optimizer) are added arithmetically, sharded as ZeRO shards them
(:func:`states`). ``--sp K`` (Ulysses) is approximated by ``seq / K`` tokens per rank (all-to-all buffers
not counted). ``offload``: the hidden states entering each checkpointed decoder layer are marked; the
device peak is the highest point of the unmarked bytes plus one hidden state; optimizer states go to the
host too (ALST's single-GPU setup). On meta, ``F.scaled_dot_product_attention`` would pick its math
kernel (a tokens x tokens matrix): during the step it runs ``aten._scaled_dot_product_flash_attention_for_cpu``
instead (linear, as CUDA's flash kernels are). See docs/planner.md.
"""

from __future__ import annotations

import copy
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .api import transform
from .memory import LiveBytes

__all__ = ["StepBytes", "StepPeak", "States", "Plan", "prepare", "step_peak", "states", "longest",
           "plan_step"]

class StepBytes(LiveBytes):
    """LiveBytes that also follows *marked* storages: ``peak_unmarked`` is the highest point of the others."""

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__(existing)
        self.marked = 0
        self.marked_at_peak = 0
        self.peak_unmarked = 0
        self._marks: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counting():  # fxtile building a call's graph on its first call (memory.uncounted)
            return func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add.Tensor and not kwargs and len(args) == 2:
            self._summed_in_place(args[0], args[1], out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out

    def _summed_in_place(self, old: torch.Tensor, new, out: torch.Tensor) -> None:
        """The autograd engine summing two gradients of one tensor (a tied weight: the loss op's ``dW`` and the
        embedding's) adds the second into the first in place when it holds the last reference to it
        (``InputBuffer::accumulate``), so no new storage is made; under any dispatch mode it adds out of place
        (a mode makes every tensor "subclass-like"), so the count sees a second weight-sized storage that a
        real step never allocates. Here the sum takes the first one's bytes: it is not counted until that
        one is freed."""
        if (torch._C._current_graph_task_id() == -1 or torch.is_grad_enabled() or not isinstance(new, torch.Tensor)
                or old.shape != out.shape or old.dtype != out.dtype or not old.is_contiguous()):
            return
        storage = old.untyped_storage()
        size = storage.nbytes()
        if self._refs.get(id(storage)) is None or size != out.untyped_storage().nbytes():
            return  # not a gradient made in the step (or not the size of the sum)
        self.live -= size  # _count adds the sum's bytes back next

        def freed() -> None:
            self.live += size

        weakref.finalize(storage, freed)

    def _count(self, tensor: torch.Tensor) -> None:
        before = self.peak
        super()._count(tensor)
        if self.peak != before:
            self.marked_at_peak = self.marked
        self.peak_unmarked = max(self.peak_unmarked, self.live - self.marked)

    def mark(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._marks or self._refs.get(key) is None:  # not created in the step, or marked already
            return
        self._marks[key] = storage.nbytes()
        self.marked += storage.nbytes()

        def unmark(key: int = key) -> None:
            self.marked -= self._marks.pop(key, 0)

        weakref.finalize(storage, unmark)


@dataclass(frozen=True)
class StepPeak:
    tokens: int
    peak: int
    offload_peak: int
    marked_at_peak: int
    hidden: int
    grads_preset: bool


def _layers(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if found:
            return found
    except ImportError:
        pass
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def prepare(model: nn.Module, checkpointing: bool = True) -> nn.Module:
    """Training mode, no cache, activation checkpointing on (transformers' default: non-reentrant)."""
    model.train()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable()
    return model


class _OnMeta:
    """While planning: no packed-sequence check (it reads values), and sdpa on meta as the flash kernel."""

    def __enter__(self):
        self._undo = []
        try:
            from transformers import masking_utils

            old = masking_utils.find_packed_sequence_indices
            masking_utils.find_packed_sequence_indices = lambda position_ids: None
            self._undo.append(lambda: setattr(masking_utils, "find_packed_sequence_indices", old))
        except (ImportError, AttributeError):
            pass
        sdpa = F.scaled_dot_product_attention

        def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if query.device.type != "meta" or attn_mask is not None:
                return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
            if key.shape[-3] != query.shape[-3]:  # GQA: CUDA's kernels read shared heads; counted as a copy here
                rep = query.shape[-3] // key.shape[-3]
                key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=None, scale=scale)[0]

        F.scaled_dot_product_attention = flash
        self._undo.append(lambda: setattr(F, "scaled_dot_product_attention", sdpa))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        return False


def step_peak(model: nn.Module, tokens: int, batch: int = 1, grads_preset: bool = True) -> StepPeak:
    """One training step of ``model`` (meta) at ``batch x tokens`` under :class:`StepBytes`: bytes above the
    weights (and above the gradients if ``grads_preset``, else the step's new gradients are in the peak)."""
    params = list(model.parameters())  # each shared (tied) parameter once
    for p in params:
        p.grad = torch.zeros_like(p) if grads_preset and p.requires_grad else None
    box: list[StepBytes] = []

    def mark(_module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor) and box:
            box[0].mark(hidden)

    handles = [layer.register_forward_pre_hook(mark, with_kwargs=True) for layer in _layers(model)]
    try:
        existing = [*params, *[p.grad for p in params if p.grad is not None], *model.buffers()]
        with _OnMeta(), StepBytes(existing) as counter:
            box.append(counter)
            ids = torch.zeros((batch, tokens), dtype=torch.long, device=params[0].device)
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None
    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    dtype = next(p for p in params if p.is_floating_point()).dtype
    hidden = batch * tokens * width * torch.empty(0, dtype=dtype).element_size()
    offload = counter.peak_unmarked + (hidden if counter.peak_unmarked < counter.peak else 0)
    return StepPeak(tokens, counter.peak, min(counter.peak, offload), counter.marked_at_peak, hidden, grads_preset)


@dataclass(frozen=True)
class States:
    weights: int
    grads: int
    optimizer: int
    gathered: int
    host: int

    @property
    def device(self) -> int:
        return self.weights + self.grads + self.optimizer + self.gathered


def states(model: nn.Module, optimizer: str = "adamw", zero: int = 0, world: int = 1, offload: bool = False) -> States:
    """Weights (/world under ZeRO-3), grads (/world under ZeRO>=2), optimizer (/world under ZeRO>=1): AdamW 8
    bytes per parameter (+4 fp32 master for bf16/fp16), SGD the master only, none 0; offload: optimizer on host.
    ZeRO-3 over >1 ranks also holds one gathered block (the largest decoder layer or embedding)."""
    params = list(model.parameters())  # each shared (tied) parameter once
    trainable = [p for p in params if p.requires_grad]
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable)
    per = {"adamw": 8 + (4 if low else 0), "sgd": 4 if low else 0, "none": 0}[optimizer]
    w = max(1, world)
    size = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt = sum(p.numel() for p in trainable) * per
    weights = size // w if zero >= 3 else size
    grads = grads // w if zero >= 2 else grads
    opt = opt // w if zero >= 1 else opt
    gathered = 0
    if zero >= 3 and w > 1:
        blocks = [*_layers(model), *[m for m in model.modules() if isinstance(m, nn.Embedding)]]
        gathered = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
    return States(weights, grads, 0 if offload else opt, gathered, opt if offload else 0)


def longest(total: Callable[[int], int], budget: int, multiple: int = 1024, known: Iterable[int] = ()) -> tuple[int, int]:
    """Longest multiple of ``multiple`` (at most 2**31) with ``total(seq) <= budget``, and the evaluations made.

    ``total`` must not decrease as ``seq`` grows (a step's memory does not; where more shards lower a tiled
    call's peak at some length, the answer is the first length past which it no longer fits). It grows nearly
    linearly (a tiled call's shard count changes in steps). So each
    guess is where the line through the two nearest measured points meets the budget (extrapolated from
    the two longest that fit until one does not, then interpolated between the longest that fits and the
    shortest that does not), and a guess that fits is confirmed by its neighbour one multiple beyond: on a
    line that takes four evaluations; bisection takes over where the line makes no progress (or after
    eight evaluations).
    ``known``: lengths already measured (free for a caching ``total``), used as points."""
    calls = 0
    seen: dict[int, int] = {}

    def at(seq: int) -> int:
        nonlocal calls
        if seq not in seen:
            calls += 1
            seen[seq] = total(seq)
        return seen[seq]

    for seq in known:
        if seq > 0 and seq % multiple == 0:
            seen[seq] = total(seq)
    if at(multiple) > budget:
        return 0, calls
    at(4 * multiple)
    limit = 2**31 // multiple * multiple
    while True:
        fits = sorted(s for s, v in seen.items() if v <= budget)
        over = sorted(s for s, v in seen.items() if v > budget)
        good, bad = fits[-1], (over[0] if over else None)
        if bad is not None and bad - good <= multiple:
            return good, calls
        if bad is None and good >= limit:
            return good, calls
        lo, hi = (fits[-2], good) if bad is None else (good, bad)
        slope = (seen[hi] - seen[lo]) / (hi - lo)
        guess = None
        if slope > 0:
            guess = int((lo + (budget - seen[lo]) / slope) // multiple * multiple)
        if bad is None:
            guess = min(limit, max(guess or 0, good + multiple) if guess and guess > good else 2 * good)
        elif guess is None or not good < guess < bad or calls >= 8:  # no progress on the line: bisect
            guess = (good + bad) // 2 // multiple * multiple
        if at(guess) <= budget:
            if (bad is None and guess < limit) or (bad is not None and guess + multiple < bad):
                at(guess + multiple)  # its neighbour: one more multiple may fit
        elif guess - multiple > good:
            at(guess - multiple)


@dataclass
class Plan:
    seq_len: int
    sp: int
    offload: bool
    states: States
    budget: int
    rows: dict = field(default_factory=dict)  # name -> (activation bytes, device total, longest seq)
    evaluations: int = 0
    layers_measured: dict = field(default_factory=dict)  # name -> decoder layer counts the meta steps ran
    assumptions: list = field(default_factory=list)


def _text_config(model: nn.Module) -> object:
    """A transformers model's (text) config, or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _layer_list(model: nn.Module) -> Optional[tuple[nn.Module, str]]:
    """``(parent, attribute)`` of the ``nn.ModuleList`` that holds ``model``'s decoder layers, or None where
    they are not known for sure: transformers' checkpointing layers, or a list as long as the config's
    layer count (not the longest list: that may be a bank's experts)."""
    layers = _layers(model)
    if len(layers) < 2:
        return None
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        known = all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)
    except ImportError:
        known = False
    if not known and getattr(_text_config(model), "num_hidden_layers", None) != len(layers):
        return None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == len(layers) and all(a is b for a, b in zip(child, layers)):
                return parent, name
    return None


def _layer_signature(layer: nn.Module) -> tuple:
    """What decides a decoder layer's share of the step's memory: its modules' types (and whether fxtile
    replaced their forward), and every parameter's name, shape, dtype and trainability."""
    return (tuple((name, type(m), "forward" in m.__dict__) for name, m in layer.named_modules()),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in layer.named_parameters()))


def _alike_layers(model: nn.Module) -> bool:
    """True when every decoder layer is built the same way (same modules, same parameter shapes, one layer
    type in the config): then the step's peak grows by the same bytes with each layer."""
    kinds = getattr(_text_config(model), "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:  # sliding and full attention, linear attention
        return False
    layers = _layers(model)
    first = _layer_signature(layers[0])
    return all(_layer_signature(layer) == first for layer in layers[1:])


def _first_layers(model: nn.Module, where: tuple[nn.Module, str], count: int) -> nn.Module:
    """A deep copy of ``model`` (meta) that keeps only its first ``count`` decoder layers, held at ``where``
    (:func:`_layer_list`). Only those layers are copied: the list is swapped for a shorter one while copying."""
    parent, name = where
    full = parent._modules[name]
    parent._modules[name] = nn.ModuleList(list(full)[:count])
    try:
        return copy.deepcopy(model)
    finally:
        parent._modules[name] = full


class _StepCost:
    """``bytes(seq)``: the activation peak of ``model``'s training step at ``seq`` tokens per sequence.

    Why not always the whole model: a meta step of Llama-3-8B's 32 layers at 131072 tokens takes about 7 s
    on a CPU (the tiled ops replay every shard), and the longest-sequence search needs several. With
    activation checkpointing (or without it) each decoder layer adds the same bytes when the layers are
    alike: the checkpointed input it keeps (or all it keeps without checkpointing), while the peak is
    reached in one place whatever the count: in the backward of the last layer or in the loss. So the
    step is measured on the first one and two layers and extended linearly to all ``L`` of them:
    ``peak(L) = peak(1) + (L - 1) * (peak(2) - peak(1))``. This is checked once, on three layers at the
    first length asked for, to the byte; where the check fails, a cut copy does not run, or the layers differ,
    the whole model is measured."""

    def __init__(self, model: nn.Module, batch: int, offload: bool, progress: Callable[[str], None], name: str):
        self.model, self.batch, self.offload, self.progress, self.name = model, batch, offload, progress, name
        self.evaluations = 0
        self.layers = len(_layers(model))
        self.parts = None  # (one-layer copy, two-layer copy) while the linear extension holds
        self.where = _layer_list(model) if self.layers > 3 else None
        if self.where is not None and _alike_layers(model):
            self.parts = (_first_layers(model, self.where, 1), _first_layers(model, self.where, 2))
        self.checked = self.parts is None
        self.cache: dict[int, int] = {}

    @property
    def measured(self) -> tuple[int, ...]:
        """The decoder layer counts the meta steps ran: ``(1, 2, 3)`` for the linear extension, else all."""
        return (1, 2, 3) if self.parts is not None else (self.layers,)

    def _peak(self, model: nn.Module, tokens: int) -> int:
        self.evaluations += 1
        r = step_peak(model, tokens, self.batch, grads_preset=True)
        return r.offload_peak if self.offload else r.peak

    def __call__(self, tokens: int) -> int:
        if tokens in self.cache:
            return self.cache[tokens]
        start = time.perf_counter()
        if self.parts is not None:
            try:
                one, two = (self._peak(m, tokens) for m in self.parts)
                three = None if self.checked else self._peak(_first_layers(self.model, self.where, 3), tokens)
            except Exception:  # noqa: BLE001 - a model that will not run cut short (it counts its layers)
                one = two = three = None
            if one is None or (three is not None and three != one + 2 * (two - one)):  # to the byte, or not linear
                self.parts = None  # measure the whole model from here on
                self.cache.clear()
                return self(tokens)
            self.checked = True
            value = one + (self.layers - 1) * (two - one)
        else:
            value = self._peak(self.model, tokens)
        self.cache[tokens] = value
        self.progress(f"{self.name} step at {tokens} tokens per rank: {value / 2**30:.1f} GiB "
                      f"({time.perf_counter() - start:.1f} s)")
        return value


def plan_step(model: nn.Module, seq_len: int, budget: int, *, batch: int = 1, sp: int = 1, offload: bool = False,
              zero: int = 0, world: int = 1, optimizer: str = "adamw", checkpointing: bool = True,
              shards="auto", tiled: Optional[nn.Module] = None,
              progress: Optional[Callable[[str], None]] = None) -> Plan:
    """Untiled ``model`` (meta) and ``tiled`` (default: a deep copy after ``fxtile.transform(copy, loss=True)``).
    ``progress`` is told each measured step (the CLI prints it on stderr)."""
    progress = progress or (lambda line: None)
    base = prepare(model, checkpointing)
    if tiled is None:
        tiled = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transform(tiled, shards=shards, loss=True)
    tiled = prepare(tiled, checkpointing)
    st = states(model, optimizer, zero, world, offload)
    plan = Plan(seq_len, sp, offload, st, budget)
    for name, m in (("untiled", base), ("fxtile", tiled)):
        cost = _StepCost(m, batch, offload, progress, name)
        act = lambda seq, cost=cost: cost(max(1, seq // sp))  # noqa: E731
        a = act(seq_len)
        fit, _ = longest(lambda s: st.device + act(s), budget, 1024 * sp, known=(seq_len,))
        plan.rows[name] = (a, st.device + a, fit)
        plan.evaluations += cost.evaluations
        plan.layers_measured[name] = cost.measured
    measured = plan.layers_measured
    shortcut = all(v == (1, 2, 3) for v in measured.values())
    plan.assumptions = [
        f"activation checkpointing {'on' if checkpointing else 'off'}; step measured on meta at batch {batch} x "
        f"{seq_len // sp} tokens per rank" + (f" (Ulysses --sp {sp}: seq/sp per rank; all-to-all buffers not "
                                              "counted)" if sp > 1 else "") + "; sdpa as a flash kernel"
        + (f"; the {len(_layers(base))} decoder layers are alike: measured on 1 and 2 of them, "
           "extended linearly, checked on 3" if shortcut else ""),
        f"states: {optimizer}, ZeRO-{zero} over {world} rank(s)"
        + ("; offload: checkpointed layer inputs and optimizer states on the host" if offload else ""),
        "not counted: CUDA context, allocator fragmentation, communication buffers (leave a few GiB)",
    ]
    return plan

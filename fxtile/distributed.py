"""Distributed training with tiled MLPs: what fxtile does for DDP, FSDP and DeepSpeed ZeRO, and the rule.

Why nothing is needed for DDP, FSDP1, FSDP2 and ZeRO-1/2: the tiled op takes the weights as explicit
inputs and returns each weight's gradient **once** per backward (summed over shards), exactly like one
``nn.Linear`` call. So a framework's per-parameter gradient hook fires once, with the full gradient
(DeepSpeed's ``TiledMLP`` runs ``backward`` per shard on the module's own parameters instead, and DDP
stops it with "Expected to mark a variable ready only once").

Why ZeRO-3 needs one flag: ZeRO-3 gathers a module's parameters in that module's own forward and
backward hooks. The forward fxtile writes for a tiled block reads its projections' weights
(``self.gate_proj.weight``) without calling ``self.gate_proj(...)``, so the projections' hooks never run
and their weights would stay partitioned (empty). fxtile therefore marks every block it tiles as a
ZeRO-3 *leaf module* (DeepSpeed's own ``_z3_leaf`` flag, what ``deepspeed.utils.set_z3_leaf_module``
sets): DeepSpeed then gathers **all** the block's parameters in the block's pre-forward hook and again
in its pre-backward hook, before the recompute needs them, and reduces their gradients once the
block's backward is done. The flag is a plain attribute that only DeepSpeed reads, so fxtile sets it
on every tiled block without importing DeepSpeed (it costs nothing elsewhere).

Why not rely on DeepSpeed's fallback: ZeRO-3 (0.19.8) also gathers a partitioned parameter that is
read during an eager forward outside its module, one blocking all-gather per weight, and registers it
as an "external parameter" of the running module. That getter is skipped while ``torch.compile``
traces (``torch.compiler.is_compiling()``), and it is an implementation detail; the leaf flag is
DeepSpeed's documented mechanism for blocks that use their children's weights without calling them.

Where no leaf flag can serve, that fallback is what gathers the weights under the engine's forward (and
the running module's pre-backward hook gathers them again for the recompute): the loss head, whose tiled
forward is the causal LM's own (flagging the whole model as a leaf would gather every weight at once),
and a block tiled after ``deepspeed.initialize``. Both are exact with every parameter partitioned
(``tests/test_alst.py``, ``tests/test_distributed.py``). ZeRO-3's gathering hooks on the modules inside
such a region then have nothing left to do, so they are not reported as hooks that stop running
(:func:`user_hooks`).

Order: DeepSpeed lays out its hooks when it wraps the model, so call ``fxtile.transform`` **before**
``deepspeed.initialize`` (or before handing the model to ``Trainer``/``accelerate``), and outside
``deepspeed.zero.Init`` (a model built under ``zero.Init``, as ``from_pretrained`` does with a ZeRO-3
config, can be tiled as it is once the context has exited). The same holds for FSDP.

FSDP1 and FSDP2 unshard per wrapped unit: wrap decoder layers (or anything that contains whole tiled
blocks), not the projections inside a tiled block, whose own unshard hooks would never run.

The shard-count rule: **shard counts are local and may differ across ranks.** No collective runs
inside the tiled op or its recompute: every gather (FSDP unshard, ZeRO-3 fetch) and every gradient
reduction happens around the module that owns the weights, once per forward and once per backward,
whatever the number of shards. So each rank picks its count from its own token count
(``ShardPolicy.count``) for each call, and ranks with different sequence lengths (different counts)
issue the same collectives in the same order.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mark_zero3_leaf", "unmark_zero3_leaf", "user_hooks", "ZERO3_LEAF_FLAG"]

ZERO3_LEAF_FLAG = "_z3_leaf"  # deepspeed.utils.z3_leaf_module reads exactly this attribute
_SET_BY_FXTILE = "_fxtile_set_z3_leaf"  # set only when fxtile (not the user) turned the flag on
_CALLABLE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def mark_zero3_leaf(module: nn.Module) -> None:
    """Flag a tiled block as a ZeRO-3 leaf so DeepSpeed gathers all its parameters around it.

    A flag the user (or DeepSpeed's ``stage3_module_granularity_threshold``) already set is kept as
    it is and left alone by :func:`unmark_zero3_leaf`.
    """
    if ZERO3_LEAF_FLAG in module.__dict__:
        return
    object.__setattr__(module, ZERO3_LEAF_FLAG, True)
    object.__setattr__(module, _SET_BY_FXTILE, True)


def unmark_zero3_leaf(module: nn.Module) -> None:
    """Undo :func:`mark_zero3_leaf` (on ``fxtile.restore``), unless DeepSpeed already relies on it.

    Once ZeRO-3 has wrapped the model (the block carries DeepSpeed's ``ds_id``), its hooks were laid out
    for a leaf block: the block's children got none. Clearing the flag then would leave the restored
    forward calling projections whose weights nobody gathers, so the flag stays.
    """
    if not module.__dict__.get(_SET_BY_FXTILE, False) or hasattr(module, "ds_id"):
        return
    del module.__dict__[_SET_BY_FXTILE]
    del module.__dict__[ZERO3_LEAF_FLAG]


def user_hooks(module: nn.Module) -> list:
    """``module``'s own hooks, less DeepSpeed's on a module ZeRO-3 has wrapped (it numbers each one,
    ``ds_id``, parameterless ones included, and lays its gathering hooks on it, some wrapped by its NVTX
    decorator: hence the package, not one function's name). The other per-instance hook dicts only hold
    flags for these."""
    zero3 = hasattr(module, "ds_id")
    return [
        hook for hooks in _CALLABLE_HOOKS for hook in getattr(module, hooks).values()
        if not (zero3 and str(getattr(hook, "__module__", "")).startswith("deepspeed."))
    ]

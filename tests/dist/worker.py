"""One rank of fxtile's distributed tests: one SGD step of a tiny tiled Llama per setup and case.

``tests/test_distributed.py`` launches it once, for every job, with ``torchrun`` on 2 CPU processes::

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 tests/dist/worker.py --out /tmp/d \
        --jobs ddp:equal,zero3:ragged_ckpt

One process group (gloo) serves all jobs, so the start-up (imports, rendezvous) is paid once. For each
``setup:case`` job rank 0 saves ``<out>/<setup>-<case>.pt``: the full parameters before and after the
step (gathered from the shards), both ranks' batches, what the op ran on each rank (calls and shards,
forward and backward, per tiled block: ``fxtile.testing.shard_counts``), which blocks were tiled and how much of their weights each rank holds between steps. The test
builds the single-process reference and compares; nothing is compared here. A job that raises on
both ranks is saved as ``<setup>-<case>.err`` (both tracebacks) and the next job runs. A job that
raises on one rank only leaves the other in a collective: the process group's timeout
(``--pg-timeout``) ends it, and torchrun stops the group.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as common  # noqa: E402  (tests/dist/dist_common.py: model, cases, batches, reference)

import fxtile  # noqa: E402
import fxtile.testing  # noqa: E402


@dataclass
class Trained:
    """What a setup hands back: a step function and a way to read full parameters on every rank."""

    step: Callable[[torch.Tensor], None]
    full_params: Callable[[], dict[str, torch.Tensor]]
    module: torch.nn.Module  # the (unwrapped) model, to check what fxtile tiled


def _clean(name: str) -> str:
    """The parameter's name in the unwrapped model (FSDP1 and DDP/DeepSpeed add wrapper prefixes)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=common.LR)


def _plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def step(ids: torch.Tensor) -> None:
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def setup_ddp(case: common.Case) -> Trained:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = common.tiled_model(case)
    ddp = DDP(model)
    params = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    return Trained(_plain_step(ddp, _sgd(ddp.parameters())), params, model)


def setup_fsdp2(case: common.Case) -> Trained:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = common.tiled_model(case)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def params() -> dict[str, torch.Tensor]:
        return {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()
        }

    return Trained(_plain_step(model, _sgd(model.parameters())), params, model)


def setup_fsdp1(case: common.Case) -> Trained:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = common.tiled_model(case)
    fsdp = FSDP(
        model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
        device_id=torch.device("cpu"), sync_module_states=False,  # CPU: see FACTS; ranks are seeded alike
    )

    def params() -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(fsdp):
            return {_clean(n): p.detach().clone() for n, p in fsdp.named_parameters()}

    return Trained(_plain_step(fsdp, _sgd(fsdp.parameters())), params, model)


def _setup_zero(stage: int, case: common.Case, late: bool = False) -> Trained:
    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401  (importing it inside zero.Init breaks dynamo)

    config = common.deepspeed_config(stage)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = common.build_model()
        if not late:  # built partitioned, then tiled outside zero.Init (the order of from_pretrained + Trainer)
            model = common.tiled_model(case, model)
    else:
        model = common.tiled_model(case)
    engine, *_ = deepspeed.initialize(model=model, optimizer=_sgd(model.parameters()), config=config)
    if late:  # tiled after DeepSpeed wrapped it (not the documented order)
        common.tiled_model(case, engine.module)

    def step(ids: torch.Tensor) -> None:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    def params() -> dict[str, torch.Tensor]:
        named = list(engine.module.named_parameters())
        if stage != 3:
            return {n: p.detach().clone() for n, p in named}
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}

    return Trained(step, params, engine.module)


SETUPS: dict[str, Callable[[common.Case], Trained]] = {
    "ddp": setup_ddp,
    "fsdp2": setup_fsdp2,
    "fsdp1": setup_fsdp1,
    "zero1": lambda case: _setup_zero(1, case),
    "zero2": lambda case: _setup_zero(2, case),
    "zero3": lambda case: _setup_zero(3, case),
    "zero3_late": lambda case: _setup_zero(3, case, late=True),
}


def run_case(setup: str, case: common.Case, rank: int, world: int) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = SETUPS[setup](case)
    said_at_setup = [str(w.message) for w in caught if str(w.message).startswith("fxtile")]
    tiled = sorted(m.path for m in fxtile.find(trained.module) if m.tiled)
    in_tiled = lambda name: any(_clean(name).startswith(path + ".") for path in tiled)  # noqa: E731
    # What each rank holds of the tiled blocks' weights between steps (less than the full tensor when
    # sharded: then the tiled forward and its recompute only work if the framework gathers them).
    visible = {
        _clean(n): (p.to_local() if hasattr(p, "to_local") else p).numel()
        for n, p in trained.module.named_parameters() if in_tiled(n)
    }
    leaf_params = sorted(  # ZeRO-3: parameters DeepSpeed registered as belonging to a leaf module
        _clean(n) for n, p in trained.module.named_parameters() if hasattr(p, "ds_z3_leaf_module")
    )
    before = trained.full_params()
    ran_before = fxtile.testing.shard_counts(trained.module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained.step(common.batch(case, rank))
    said = [str(w.message) for w in caught if str(w.message).startswith("fxtile")]
    ran = {  # what the op itself ran on this rank in the step: calls and shards, forward and backward
        _clean(path): tuple(a - b for a, b in zip(vars(c).values(), vars(ran_before[path]).values()))
        for path, c in fxtile.testing.shard_counts(trained.module).items()
    }
    after = trained.full_params()
    all_counts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(all_counts, ran)
    all_said: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(all_said, said)
    return {
        "before": before, "after": after, "batches": [common.batch(case, r) for r in range(world)],
        "shard_counts": all_counts, "warnings": all_said, "setup_warnings": said_at_setup,
        "tiled": tiled, "visible_numel": visible, "leaf_params": leaf_params,
        "z3_leaf": sorted(_clean(n) for n, m in trained.module.named_modules() if getattr(m, "_z3_leaf", False)),
    }


def record_outcome(stem: str, result, error: str, rank: int, world: int) -> str:
    """After a job on every rank: rank 0 writes ``stem.pt`` (its result) or, if any rank failed,
    ``stem.err`` (every failing rank's traceback) for the test to show. Returns "done" or "FAILED"."""
    errors: list[str] = [""] * world
    dist.all_gather_object(errors, error)  # hangs (and times out) only if a rank is stuck elsewhere
    if rank == 0:
        if any(errors):
            with open(stem + ".err", "w") as f:
                f.write("\n".join(f"[rank {r}]\n{e}" for r, e in enumerate(errors) if e))
        else:
            torch.save(result, stem + ".pt")
    return "FAILED" if any(errors) else "done"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--jobs", default=",".join(f"{s}:{c}" for s in SETUPS if s != "zero3_late" for c in common.CASES),
        help="comma-separated setup:case pairs, run in this order",
    )
    parser.add_argument("--pg-timeout", type=float, default=120.0, help="seconds a collective may wait")
    args = parser.parse_args()
    jobs = [tuple(job.split(":")) for job in args.jobs.split(",")]
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    if any(setup.startswith("zero") for setup, _ in jobs):
        import deepspeed
        import deepspeed.ops

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel when it starts (g++,
        # tens of seconds on a fresh machine); gloo does all the communication these tests need.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # two ranks on a two-core machine
    for setup, name in jobs:
        start = time.perf_counter()
        try:
            result, error = run_case(setup, common.CASES[name], rank, world), ""
        except Exception:  # noqa: BLE001 - recorded for the test to show (record_outcome)
            result, error = None, traceback.format_exc()
        status = record_outcome(os.path.join(args.out, f"{setup}-{name}"), result, error, rank, world)
        print(f"[rank {rank}] {setup}:{name} {status} in {time.perf_counter() - start:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of fxtile's ALST tests: tiling + checkpointing + Ulysses sequence parallelism, one SGD step per job.

``tests/test_alst.py`` launches it once, for every job, with ``torchrun`` on 2 CPU processes (gloo)::

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 tests/dist/alst_worker.py --out /tmp/a \
        --jobs zero3,zero1,zero1_ds_recipe

Both ranks form ONE sequence-parallel group (sp=2, dp=1). Each job builds the tiny Llama of
``dist_common`` (sdpa attention: Ulysses refuses eager), tiles it with ``fxtile.transform(model,
shards=3, loss=True)`` (checkpointing enabled before or after, as the job says), wraps it with DeepSpeed
(``mpu=`` the Ulysses groups) or Accelerate (``ParallelismConfig(sp_backend="deepspeed", sp_size=2)``),
cuts one batch of ``SEQ``-token sequences in two with DeepSpeed's ``UlyssesSPDataLoaderAdapter``, and
runs one SGD step (lr 1.0, no clipping) on each rank's half, with ``shift_labels`` passed INTO the
model so that the tiled loss head runs.

How the ranks' losses are combined (``Job.combine``):

* ``tokens`` (the correct recipe): every rank passes ``num_items_in_batch`` = the labelled tokens of the
  whole sequence (an all-reduced count, no autograd), so its loss is its summed token loss over that
  global count, and backpropagates it times :func:`sp_gradient_factor`: 1 where DeepSpeed's reduction
  SUMS the sequence-parallel ranks' gradients (ZeRO-1/2; ZeRO-3 with ``reduce_scatter: false``), sp where
  it averages them (ZeRO-3 with the default ``reduce_scatter: true``).
* ``tokens_no_factor`` (a control): the same without the factor: half the gradient under default ZeRO-3.
* ``ds_recipe`` (a control): DeepSpeed 0.19.8's own test (``tests/unit/ulysses_alst/test_ulysses_sp_hf.py``)
  and Accelerate's ALST test script gather every rank's mean loss with the *differentiable*
  ``torch.distributed.nn.functional.all_gather`` and backpropagate the token-weighted mean on every rank:
  the gather's backward sums the ``sp`` identical upstream gradients, a factor sp on every rank's loss,
  right under default ZeRO-3 and sp x the gradient under ZeRO-1/2.

For each job rank 0 saves ``<out>/<job>.pt`` (parameters before/after, the batch and its labels, the
combined loss, each rank's ``fxtile.testing.shard_counts`` delta and fxtile warnings, the local shapes
and whether the adapter's shards came contiguous). The test builds the single-process untiled reference
and compares; nothing is compared here. A job that raises on a rank is saved as ``<job>.err``.
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

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as common  # noqa: E402  (tests/dist/dist_common.py: the tiny model's config, LR, DeepSpeed config)
from worker import record_outcome  # noqa: E402  (tests/dist/worker.py: how a job's result or errors are written)

import fxtile  # noqa: E402
import fxtile.testing  # noqa: E402

SEQ = 24  # tokens per sequence: 12 per rank, 3 shards of 4 rows each
SHARDS = 3
SP = 2
ORIGINAL_SDPA = None  # transformers' sdpa attention before any Ulysses registration (set in main)


@dataclass(frozen=True)
class Job:
    """``stage``: 1 or 3 (DeepSpeed directly) or ``"accelerate"`` (ZeRO-3 through Accelerate's
    ParallelismConfig); ``combine``: how the ranks' losses are combined (see the module docstring);
    ``checkpointing``: ``"before"`` / ``"after"`` fxtile.transform, or None; ``prompt``: leading tokens whose
    labels are -100 (SFT-style), so the ranks hold different numbers of labelled tokens;
    ``micro_batch``: sequences per batch (> 1: the adapter's shards are not contiguous);
    ``reduce_scatter``: DeepSpeed's ``zero_optimization.reduce_scatter`` (ZeRO-3 averages over the SP ranks with it)."""

    name: str
    stage: object
    combine: str = "tokens"
    checkpointing: str | None = None
    prompt: int = 0
    micro_batch: int = 1
    reduce_scatter: bool = True


JOBS = {
    j.name: j
    for j in [
        Job("zero3", 3),
        Job("zero3_allreduce", 3, reduce_scatter=False),
        Job("zero1", 1),
        Job("zero2", 2),
        Job("zero3_ckpt_before", 3, checkpointing="before"),
        Job("zero3_ckpt_after", 3, checkpointing="after"),
        Job("zero1_ckpt_before", 1, checkpointing="before"),
        # Prompt tokens masked: rank 0 holds 12 - 9 = 3 labelled targets per sequence, rank 1 holds 11 (the
        # last token has none), so a plain mean of the ranks' means would be wrong; two sequences per batch.
        Job("zero3_prompt_mb2", 3, prompt=9, micro_batch=2),
        # Controls. DeepSpeed's own recipe: sp x the gradient under ZeRO-1/2, right under ZeRO-3 (default
        # reduce_scatter). The summed-token recipe without the ZeRO-3 factor: half the gradient.
        Job("zero1_ds_recipe", 1, combine="ds_recipe"),
        Job("zero3_ds_recipe", 3, combine="ds_recipe"),
        Job("zero3_no_factor", 3, combine="tokens_no_factor"),
        # Last: Accelerate registers the Ulysses attention and the groups itself.
        Job("accelerate", "accelerate"),
    ]
}


def build_model() -> torch.nn.Module:
    """``dist_common``'s tiny Llama with sdpa attention (Ulysses refuses eager), seeded, in train mode."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(**common.CONFIG, use_cache=False, attn_implementation="sdpa")
    return T.LlamaForCausalLM(config).train()


def enable_checkpointing(model: torch.nn.Module) -> None:
    model.activation_checkpointing_enable()  # transformers 5.25; gradient_checkpointing_enable is its alias


def prepared_model(job: Job, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """``build_model()`` (or ``model``), checkpointing enabled before or after tiling, tiled with the loss head."""
    model = build_model() if model is None else model
    if job.checkpointing == "before":
        enable_checkpointing(model)
    fxtile.transform(model, shards=SHARDS, loss=True)
    if job.checkpointing == "after":
        enable_checkpointing(model)
    return model


def sample(job: Job) -> dict[str, torch.Tensor]:
    """The job's batch, the same on every rank: ``input_ids``, ``position_ids``, ``labels`` (-100 on the prompt)."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, common.CONFIG["vocab_size"], (job.micro_batch, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : job.prompt] = -100
    return {"input_ids": ids, "position_ids": torch.arange(SEQ).expand(job.micro_batch, SEQ).clone(), "labels": labels}


def ds_config(stage: int, micro_batch: int) -> dict:
    config = common.deepspeed_config(stage)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    # DeepSpeed derives train_batch_size: zero.Init counts every rank as data-parallel (it gets no mpu),
    # the engine counts dp = world / sp = 1, so no single value passes both checks.
    del config["train_batch_size"]
    return config


def sp_gradient_factor(engine, sp: int) -> int:
    """What each rank's loss must be multiplied by so that DeepSpeed's gradient reduction SUMS the
    sequence-parallel ranks' gradients (DeepSpeed 0.19.8, read from its code and measured here).

    ZeRO-1/2 and ZeRO-3 with ``reduce_scatter: false`` divide the reduced gradients by ``dp_world / sp``:
    they sum over the sequence-parallel ranks (and average over data-parallel groups). ZeRO-3 with
    ``reduce_scatter: true`` (the default) goes through ``reduce_scatter_coalesced``, which divides by the
    whole world: it AVERAGES over the sequence-parallel ranks too, so each rank's loss needs a factor sp.
    """
    return sp if engine.zero_optimization_stage() == 3 and engine.zero_reduce_scatter() else 1


def step_loss(engine, batch: dict, group, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this rank backpropagates, the whole sequence's mean token loss, for logging)."""
    shift = batch["shift_labels"]
    n_local = (shift != -100).sum()
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    sp = dist.get_world_size(group)
    if combine in ("tokens", "tokens_no_factor"):
        n_total = n_local.clone()
        dist.all_reduce(n_total, group=group)  # a count: no autograd
        # labels must not be None (transformers computes no loss without them); shift_labels wins over them.
        # num_items_in_batch: the loss is this rank's SUMMED token loss over the sequence's labelled tokens
        # (0 for a rank without labelled tokens, where a mean would be nan).
        loss = engine(**inputs, labels=shift, shift_labels=shift, num_items_in_batch=n_total).loss
        logged = loss.detach().clone()
        dist.all_reduce(logged, group=group)  # the sequence's mean token loss
        factor = sp_gradient_factor(engine, sp) if combine == "tokens" else 1
        return loss * factor, logged
    if combine == "ds_recipe":  # DeepSpeed's and Accelerate's ALST test scripts
        loss = engine(**inputs, labels=shift, shift_labels=shift).loss
        losses = torch.distributed.nn.functional.all_gather(loss, group=group)
        counts = torch.distributed.nn.functional.all_gather(n_local, group=group)
        total = sum(l * c for l, c in zip(losses, counts) if c > 0) / sum(counts)
        return total, total.detach().clone()
    raise ValueError(f"unknown combine {combine!r}")


def _contiguous(batch: dict) -> dict:
    return {k: (v.contiguous() if torch.is_tensor(v) else v) for k, v in batch.items()}


def _engine_deepspeed(job: Job, mpu):
    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401  (importing it inside zero.Init breaks dynamo)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    config = ds_config(job.stage, job.micro_batch)
    config["zero_optimization"]["reduce_scatter"] = job.reduce_scatter
    if job.stage == 3:  # built partitioned, tiled once zero.Init has exited (the order of from_pretrained)
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build_model()
        model = prepared_model(job, model)
    else:
        model = prepared_model(job)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=common.LR), config=config, mpu=mpu
    )
    group = mpu.get_sequence_parallel_group()
    loader = UlyssesSPDataLoaderAdapter(
        [sample(job)], sp_rank=mpu.get_sequence_parallel_rank(), sp_group=group,
        sp_world_size=mpu.get_sequence_parallel_world_size(), device=torch.device("cpu"),
    )

    def backward_and_step(objective: torch.Tensor) -> None:
        engine.backward(objective)
        engine.step()

    return engine, next(iter(loader)), group, backward_and_step


def _engine_accelerate(job: Job):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig
    from deepspeed.utils import groups

    _forget_ulysses_registration()  # Accelerate registers the attention and the groups again itself
    config = ds_config(3, job.micro_batch)
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        parallelism_config=ParallelismConfig(
            sp_backend="deepspeed", sp_size=SP,
            sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa"),
        ),
    )
    model = prepared_model(job)  # tiled before prepare (before DeepSpeed wraps it)
    # The same sequence on every rank, whichever way Accelerate shards the loader over the processes.
    rows = [{k: v[i] for k, v in sample(job).items()} for i in range(job.micro_batch)]
    data = torch.utils.data.DataLoader(rows * SP, batch_size=job.micro_batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LR)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, data)
    assert type(loader).__name__ == "UlyssesSPDataLoaderAdapter", type(loader)
    assert engine.zero_optimization_stage() == 3 and engine.gradient_clipping() == 0.0

    def backward_and_step(objective: torch.Tensor) -> None:
        accelerator.backward(objective)  # DeepSpeed: engine.backward + engine.step
        optimizer.step()  # a no-op under DeepSpeed
        optimizer.zero_grad()

    return engine, next(iter(loader)), groups._get_sequence_parallel_group(), backward_and_step


def _forget_ulysses_registration() -> None:
    """Undo ``register_with_transformers``: its groups (which it refuses to build twice) and its
    attention wrapper (registering again would wrap the wrapper: two all-to-alls per attention)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mpu._release_sequence_parallel_groups()
    ALL_ATTENTION_FUNCTIONS["sdpa"] = ORIGINAL_SDPA



def run_job(job: Job, mpu, world: int) -> dict:
    import deepspeed

    engine, batch, group, backward_and_step = _engine_accelerate(job) if job.stage == "accelerate" else _engine_deepspeed(job, mpu)
    contiguous = {k: v.is_contiguous() for k, v in batch.items() if torch.is_tensor(v)}
    batch = _contiguous(batch)  # the adapter slices [B, S] on S: not contiguous when B > 1

    def full_params() -> dict[str, torch.Tensor]:
        named = list(engine.module.named_parameters())
        if engine.zero_optimization_stage() != 3:
            return {n: p.detach().clone() for n, p in named}
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}

    before = full_params()
    counts_before = fxtile.testing.shard_counts(engine.module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objective, logged = step_loss(engine, batch, group, job.combine)
        backward_and_step(objective)
    said = [str(w.message) for w in caught if str(w.message).startswith("fxtile")]
    counts = {
        path: tuple(a - b for a, b in zip(vars(c).values(), vars(counts_before[path]).values()))
        for path, c in fxtile.testing.shard_counts(engine.module).items()
    }
    after = full_params()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (counts, said, tuple(batch["input_ids"].shape), contiguous))
    s = sample(job)
    return {
        "before": before, "after": after, "input_ids": s["input_ids"], "labels": s["labels"], "loss": logged.item(),
        "shard_counts": [g[0] for g in gathered], "warnings": [g[1] for g in gathered],
        "local_shapes": [g[2] for g in gathered], "contiguous": [g[3] for g in gathered],
        "tiled": sorted(m.path for m in fxtile.find(engine.module, loss=True) if m.tiled),
        "checkpointing": engine.module.is_gradient_checkpointing, "factor": sp_gradient_factor(engine, SP),
        "zero_stage": engine.zero_optimization_stage(), "reduce_scatter": engine.zero_reduce_scatter(),
    }


def main() -> None:
    global ORIGINAL_SDPA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated job names, run in this order")
    parser.add_argument("--pg-timeout", type=float, default=90.0, help="seconds a collective may wait")
    args = parser.parse_args()

    import deepspeed
    import deepspeed.ops
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel when it starts (g++, tens of
    # seconds on a fresh machine); gloo does all the communication (all_to_all included) these tests need.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == SP, "the ALST worker expects 2 ranks (one sequence-parallel group)"
    torch.set_num_threads(1)  # two ranks on a two-core machine
    ORIGINAL_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
    mpu, registered = None, None  # registered: the micro-batch size the Ulysses attention was registered for (it checks shapes)
    for name in args.jobs.split(","):
        start = time.perf_counter()
        job = JOBS[name]
        try:
            if job.stage != "accelerate" and registered != job.micro_batch:
                if registered is not None:
                    _forget_ulysses_registration()
                # register_with_transformers takes a model object (it reads .config): a throwaway copy here.
                mpu = UlyssesSPAttentionHF.register_with_transformers(
                    model_name_or_path=build_model(), core_attn_implementation="sdpa", sequence_parallel_size=SP,
                    micro_batch_size=job.micro_batch, seq_length_is_variable=True,
                )
                registered = job.micro_batch
            if job.stage == "accelerate":
                registered = -1  # Accelerate registered its own: a later job registers again
            result, error = run_job(job, mpu, world), ""
        except Exception:  # noqa: BLE001 - recorded for the test to show
            result, error = None, traceback.format_exc()
        status = record_outcome(os.path.join(args.out, name), result, error, rank, world)
        print(f"[rank {rank}] {name} {status} in {time.perf_counter() - start:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

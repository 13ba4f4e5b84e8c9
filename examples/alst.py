"""ALST recipe: fxtile tiling + activation checkpointing (optionally offloaded) + DeepSpeed Ulysses sequence parallelism.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 examples/alst.py
    torchrun --nproc-per-node 8 examples/alst.py --model /path/to/config_dir --seq-len 131072 --sp 8 \\
        --zero 3 --dtype bfloat16 --offload --shards auto

Every ``--sp`` ranks form one sequence-parallel group (``world / sp`` data-parallel groups): each step, one
sequence per group is cut into ``sp`` pieces by DeepSpeed's ``UlyssesSPDataLoaderAdapter``; each rank runs
the model on its piece (attention all-to-alls heads <-> sequence). ``shift_labels`` go INTO the model so
that fxtile's tiled loss head runs (the logits are never materialized), with ``num_items_in_batch`` = the
labelled tokens of the whole sequence, so each rank's loss is its share of the sequence's mean; the
factor of ``sp_gradient_factor`` makes DeepSpeed's gradient reduction add the shares (docs/alst.md).

Downloads nothing: ``--model`` is a local config (or model) directory, or a transformers model type
(``llama``, the default) built tiny from its config with random weights; the data is a synthetic
next-token task (``t[i+1] = t[i] + step mod vocab``).

``--offload`` calls ``model.activation_checkpointing_enable(offload=True)``: checkpointed layer inputs go to
pinned host memory. It needs an accelerator: on CPU-only torch the first forward raises "pin_memory=True
requires a CUDA or other accelerator backend". Without it, checkpointing is on, not offloaded.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import fxtile
import fxtile.testing
from fxtile.noise import quiet_library_noise

TINY = dict(
    hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_hidden_layers=2, vocab_size=128, max_position_embeddings=4096, tie_word_embeddings=False,
)


def build_config(spec: str, dtype: torch.dtype):
    import transformers as T

    config = T.AutoConfig.from_pretrained(spec) if os.path.isdir(spec) else T.AutoConfig.for_model(spec, **TINY)
    config.use_cache = False
    config._attn_implementation = "sdpa"  # Ulysses refuses eager; must equal core_attn_implementation
    config.dtype = dtype
    return config


def ds_config(stage: int, dtype: torch.dtype) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 10**7, "allgather_bucket_size": 10**7,
                              "stage3_prefetch_bucket_size": 10**7},
        "steps_per_print": 10**9,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    return config


def sp_gradient_factor(engine, sp: int) -> int:
    """1 where DeepSpeed (0.19.8) sums the sequence-parallel ranks' gradients (ZeRO-1/2, ZeRO-3 with
    ``reduce_scatter: false``), sp where it averages them (ZeRO-3's default reduce-scatter)."""
    return sp if engine.zero_optimization_stage() == 3 and engine.zero_reduce_scatter() else 1


def batches(seq_len: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (1, 1), generator=gen)
        step = torch.randint(1, 4, (1, 1), generator=gen)
        ids = (start + step * torch.arange(seq_len)) % vocab
        yield {"input_ids": ids, "position_ids": torch.arange(seq_len)[None], "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="a config/model directory, or a model type built tiny")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (divisible by --sp)")
    parser.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (default: the world size)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--zero", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--shards", default="4", help="fxtile shards per tiled call, or 'auto' (fxtile's policy)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--offload", action="store_true", help="offload checkpointed activations (needs an accelerator)")
    args = parser.parse_args()
    quiet_library_noise()

    import deepspeed
    import transformers as T
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter

    cuda = torch.cuda.is_available()
    if not cuda:  # DeepSpeed's CPU backend would JIT-build a shared-memory all-reduce op; gloo does it all
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = args.sp or world
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype)
    config = build_config(args.model, dtype)
    ds = ds_config(args.zero, dtype)

    # 1. Ulysses: wrap the "sdpa" attention of transformers; returns the process groups (mpu) for DeepSpeed.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=type("Loaded", (), {"config": config})(),  # anything with .config (a model works too)
        core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=1, seq_length_is_variable=True,
    )
    torch.manual_seed(0)
    if args.zero == 3:  # partitioned as it is built (from_pretrained does this under a ZeRO-3 config)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()

    # 2. Activation checkpointing, offloaded to pinned host memory with --offload (before or after tiling).
    model.activation_checkpointing_enable(offload=args.offload)
    # 3. Tiling: the MLPs and the loss head over tokens, before DeepSpeed wraps the model.
    fxtile.transform(model, shards="auto" if args.shards == "auto" else int(args.shards), loss=True)

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr), config=ds, mpu=mpu
    )
    group = mpu.get_sequence_parallel_group()
    loader = UlyssesSPDataLoaderAdapter(
        batches(args.seq_len, config.vocab_size, seed=rank), sp_rank=mpu.get_sequence_parallel_rank(),
        sp_group=group, sp_world_size=mpu.get_sequence_parallel_world_size(), device=device,
    )
    factor = sp_gradient_factor(engine, sp)
    for step in range(args.steps):
        before = fxtile.testing.shard_counts(engine.module)
        # The adapter's shards are column slices of [B, S]: not contiguous when B > 1.
        batch = {k: v.contiguous().to(device) if torch.is_tensor(v) else v for k, v in next(loader).items()}
        shift = batch["shift_labels"]
        n_total = (shift != -100).sum()
        dist.all_reduce(n_total, group=group)  # the sequence's labelled tokens (a count, no autograd)
        # labels must be given (transformers computes no loss without them); shift_labels take precedence.
        loss = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=shift,
                      shift_labels=shift, num_items_in_batch=n_total).loss
        engine.backward(loss * factor)
        engine.step()
        logged = loss.detach().float()
        dist.all_reduce(logged, group=group)  # the sequence's mean token loss
        counts = {p or "(loss head)": (c.forward_calls - before[p].forward_calls, c.forward_shards - before[p].forward_shards)
                  for p, c in fxtile.testing.shard_counts(engine.module).items()}
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, (list(batch["input_ids"].shape), counts))
        if rank == 0:
            print(f"step {step}: loss {logged.item():.4f}", flush=True)
            for r, (shape, c) in enumerate(per_rank):
                print(f"  rank {r}: local input {shape}; tiled (calls, shards): {c}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Train a tiny Llama with Hugging Face ``Trainer`` + DeepSpeed ZeRO-3 on 2 CPU processes, MLPs tiled by fxtile.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 examples/train_zero3.py

The order that matters (see ``fxtile/distributed.py``):

1. ``TrainingArguments(deepspeed=...)`` first: with a ZeRO-3 config it makes ``from_config`` /
   ``from_pretrained`` build the model partitioned (``deepspeed.zero.Init``);
2. ``fxtile.transform(model)`` next, before ``Trainer`` wraps the model: it marks each tiled MLP as a
   ZeRO-3 leaf module, so DeepSpeed gathers all of the MLP's weights around it (the tiled forward reads
   ``self.gate_proj.weight`` without calling ``self.gate_proj``);
3. ``Trainer(...).train()``.

``examples/ds_zero3.json`` sets ``stage3_param_persistence_threshold`` to 0 so that even this tiny
model's weights are partitioned (by default ZeRO-3 keeps parameters under 1e5 elements whole), and
small communication buckets (the 5e8-element defaults cost seconds of allocation on CPU). Downloads
nothing: the data is a synthetic next-token task (``t[i+1] = t[i] + step mod vocab``) that the model
learns in a few dozen steps.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import transformers as T

import fxtile

HERE = os.path.dirname(os.path.abspath(__file__))


class Progressions(torch.utils.data.Dataset):
    """Sequences ``start, start + step, ...`` modulo ``vocab``: learnable from the context alone."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=gen)
        step = torch.randint(1, 5, (n, 1), generator=gen)
        self.ids = (start + step * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _cpu_only_setup() -> None:
    """For this CPU demo only: no JIT-built kernel, no warning flood from DeepSpeed's collectives."""
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel when it starts (needs g++,
    # tens of seconds on a fresh machine); gloo is all two CPU processes need.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed 0.19.8 calls torch.distributed functions that torch 2.13 deprecates, on every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4, help="tiny model: force tiling (default policy: 'auto')")
    parser.add_argument("--deepspeed", default=os.path.join(HERE, "ds_zero3.json"))
    parser.add_argument("--output-dir", default="/tmp/fxtile_train_zero3")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on as well")
    args = parser.parse_args()
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        _cpu_only_setup()

    checkpointing = (  # transformers 5.24 renamed gradient_checkpointing (kept as a deprecated alias)
        "activation_checkpointing" if "activation_checkpointing" in T.TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    training_args = T.TrainingArguments(  # first: a ZeRO-3 config makes from_config build partitioned
        output_dir=args.output_dir, deepspeed=args.deepspeed, use_cpu=True, max_steps=args.steps,
        per_device_train_batch_size=4, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **{checkpointing: args.checkpointing},
    )
    config = T.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=args.seq_len, use_cache=False,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)

    fxtile.transform(model, shards=args.shards)  # before Trainer wraps the model with DeepSpeed
    tiled = [m for m in fxtile.find(model) if m.tiled]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"fxtile tiled {len(tiled)} MLPs ({', '.join(m.path for m in tiled)}), shards={args.shards}; "
              f"ZeRO-3 partitioned weights: {model.model.layers[0].mlp.gate_proj.weight.numel() == 0}", flush=True)

    trainer = T.Trainer(model=model, args=training_args, train_dataset=Progressions(512, args.seq_len, config.vocab_size))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if rank == 0:
        print(f"loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}, "
              f"train_loss {result.training_loss:.3f} after {result.global_step} steps", flush=True)
    # Tear the gloo group down explicitly: left to interpreter exit, a rank can abort in C++
    # ("terminate called without an active exception") after training has finished.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

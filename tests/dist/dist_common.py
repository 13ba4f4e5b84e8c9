"""What the distributed worker and the test share: the tiny model, the cases, the batches, the step.

Kept free of ``torch.distributed`` so the test process can build the single-process reference with
exactly the same model and data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fxtile

LR = 1.0  # SGD, no momentum, no weight decay: updated = before - LR * grad, so the step shows the gradient
WORLD = 2
BATCH = 2  # sequences per rank
CONFIG = dict(
    hidden_size=32, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_hidden_layers=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Case:
    """Per-rank sequence lengths, the ``shards`` given to ``fxtile.transform``, checkpointing, and
    whether the loss head is tiled too (``loss=True``)."""

    name: str
    seq_lens: tuple[int, ...]
    shards: object
    checkpointing: bool
    loss: bool = False


CASES = {
    c.name: c
    for c in [
        # The setup: every rank the same length, 3 shards everywhere.
        Case("equal", (12, 12), 3, False),
        # Ranks with different lengths in the same step AND different shard counts: the auto rule with
        # min_tokens=6 picks rows // 6 shards, 18 rows -> 3 on rank 0, 34 rows -> 5 on rank 1.
        Case("ragged", (9, 17), fxtile.ShardPolicy(min_tokens=6), False),
        # The same under activation checkpointing (how long-context training runs): every tiled call
        # runs twice in forward (once more in the recompute of the checkpointed decoder layer).
        Case("ragged_ckpt", (9, 17), fxtile.ShardPolicy(min_tokens=6), True),
        # The head and its loss tiled as well, ranks at different lengths, checkpointing on: the loss
        # op computes the head's gradients in its forward and hands them over once, in backward.
        Case("loss", (9, 17), fxtile.ShardPolicy(min_tokens=6), True, loss=True),
    ]
}


def build_model() -> torch.nn.Module:
    """A tiny random ``LlamaForCausalLM``, identical on every rank (seeded), in train mode."""
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG, use_cache=False))
    return model.train()


def tiled_model(case: Case, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """``build_model()`` (or ``model``), with checkpointing as the case says, tiled by fxtile."""
    model = build_model() if model is None else model
    if case.checkpointing:  # transformers 5.24 renamed gradient_checkpointing_enable (kept as a deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    return fxtile.transform(model, shards=case.shards, loss=case.loss)


def batch(case: Case, rank: int) -> torch.Tensor:
    """Rank ``rank``'s token ids: its own data (a different seed per rank) and its own length."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, CONFIG["vocab_size"], (BATCH, case.seq_lens[rank]), generator=gen)


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH * WORLD,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0, which would change the step
        "zero_allow_untested_optimizer": True,  # a torch SGD client optimizer (nothing to JIT-build)
        "zero_optimization": {
            "stage": stage,
            # ZeRO-3 keeps parameters under 1e5 elements whole by default, i.e. all of a tiny model:
            # 0 partitions every parameter, so the MLP weights really must be gathered.
            "stage3_param_persistence_threshold": 0,
            # The defaults (5e8 elements) allocate GiB-sized communication buffers: tens of seconds on CPU.
            "reduce_bucket_size": 10**6,
            "allgather_bucket_size": 10**6,
            "stage3_prefetch_bucket_size": 10**6,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def reference_step(before: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One untiled single-process SGD step over every rank's batch.

    DDP, FSDP and ZeRO average gradients over ranks, and each rank's loss is the mean over its own
    tokens, so the matching single-process loss is the mean over ranks of the per-rank losses.
    """
    model = build_model()
    missing, unexpected = model.load_state_dict(before, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    loss = sum(model(input_ids=ids, labels=ids).loss for ids in batches) / len(batches)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}

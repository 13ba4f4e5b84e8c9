"""Tile a tiny random Llama with fxtile and show what was tiled and the activation memory saved.

Runs on CPU and downloads nothing:  python examples/tile_llama.py [--seq-len 4096]
On a 2-core CPU it takes about 30 s at the default 4096 tokens (the two training steps, untiled and tiled,
are 19 s of it) and about 16 s with ``--seq-len 1024``.

Every MLP and the output projection with its loss are tiled (``fxtile.transform(model, loss=True)``),
then one training step (``model(input_ids=ids, labels=ids).loss.backward()``) runs untiled and tiled.
"Activation memory" is what autograd keeps for backward (counted with saved-tensor hooks, parameters
excluded): the memory that grows with sequence length. Peak-memory and time benchmarks against
DeepSpeed and torch live in benchmarks/.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers as T

import fxtile
import fxtile.testing
from fxtile.noise import quiet_library_noise


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(bytes autograd keeps for backward, loss) of one training step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values()), loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--shards", default="auto", help="'auto' or a positive int")
    args = parser.parse_args()
    shards = args.shards if args.shards == "auto" else int(args.shards)
    quiet_library_noise()  # torchao's CPU-only import noise: not this example's

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=32000, max_position_embeddings=args.seq_len)
    model = T.LlamaForCausalLM(config).train()
    tiled = fxtile.transform(copy.deepcopy(model), shards=shards, loss=True)

    found = fxtile.find(tiled, loss=True)
    print(f"fxtile tiled {len(found)} regions of a LlamaForCausalLM (no registry, matched by graph shape):")
    for m in found:
        roles = ", ".join(f"{k}={v}" for k, v in m.roles.items())
        print(f"  {m.path or '(root)':<20} {m.pattern:<21} {roles}  {m.check}")

    ids = torch.randint(0, config.vocab_size, (1, args.seq_len))
    before, ref = training_step(model, ids)
    after, loss = training_step(tiled, ids)
    ran = fxtile.testing.shard_counts(tiled)  # what the tiled op really ran, from its own counters
    print(f"  in the step below ({args.seq_len} tokens): " + ", ".join(
        f"{path or '(root)'} in {count.forward_shards} shards" for path, count in ran.items()))
    worst = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), tiled.parameters()))
    mib = 2**20
    print(f"\ntraining step at seq_len={args.seq_len} (model.train(); model(input_ids=ids, labels=ids)):")
    print(f"  activations kept for backward: untiled {before / mib:8.1f} MiB   fxtile {after / mib:8.1f} MiB   "
          f"saved {(before - after) / mib:.1f} MiB ({100 * (before - after) / before:.0f}%)")
    print(f"  |loss diff| {(loss - ref).abs().item():.2e}   max |grad diff| {worst:.2e}")


if __name__ == "__main__":
    main()

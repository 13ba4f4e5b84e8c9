"""Tile a tiny random Llama with fxtile and show what was tiled and the activation memory saved.

Runs on CPU in seconds, downloads nothing:  python examples/tile_llama.py [--seq-len 4096]

"Activation memory" here is what autograd keeps for backward (counted with saved-tensor hooks,
parameters excluded): the memory that grows with sequence length. Peak-memory and time benchmarks
against DeepSpeed's TiledMLP live in benchmarks/.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers as T

import fxtile


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(bytes autograd keeps for backward, logits) of one forward+backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids).logits
    logits.float().square().mean().backward()
    return sum(seen.values()), logits.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--shards", default="auto", help="'auto' or a positive int")
    args = parser.parse_args()
    shards = args.shards if args.shards == "auto" else int(args.shards)

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=args.seq_len)
    model = T.LlamaForCausalLM(config)
    tiled = fxtile.transform(copy.deepcopy(model), shards=shards)

    print(f"fxtile tiled {len(fxtile.find(tiled))} MLPs of a LlamaForCausalLM (no registry, matched by graph shape):")
    for m in fxtile.find(tiled):
        roles = ", ".join(f"{k}={v}" for k, v in m.roles.items())
        print(f"  {m.path:<22} {m.pattern:<8} {m.activation:<15} {roles}  shards={m.shards}")
    policy = fxtile.ShardPolicy() if shards == "auto" else fxtile.ShardPolicy(shards=shards)
    print(f"  each runs in {policy.count(args.seq_len, 256, 1024)} shards at {args.seq_len} tokens")

    ids = torch.randint(0, config.vocab_size, (1, args.seq_len))
    before, ref = saved_activation_bytes(model, ids)
    after, out = saved_activation_bytes(tiled, ids)
    worst = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), tiled.parameters()))
    mib = 2**20
    print(f"\nforward+backward at seq_len={args.seq_len}:")
    print(f"  activations kept for backward: untiled {before / mib:8.1f} MiB   fxtile {after / mib:8.1f} MiB   "
          f"saved {(before - after) / mib:.1f} MiB ({100 * (before - after) / before:.0f}%)")
    print(f"  max |logits diff| {(out - ref).abs().max().item():.2e}   max |grad diff| {worst:.2e}")


if __name__ == "__main__":
    main()

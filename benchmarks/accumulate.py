"""How far bf16 weight gradients land from an fp64 reference: untiled, and tiled with each ``accumulate``.

    python benchmarks/accumulate.py                          # Llama-shaped MLP, H=512, I=1792, 8192 tokens
    python benchmarks/accumulate.py --hidden 4096 --inter 14336 --tokens 4096 --device cuda

A tiled backward sums each weight's gradient over the shards. ``ShardPolicy(accumulate="fp32")`` keeps
those sums in fp32 (a workspace of 4 bytes per weight element while the backward runs); ``"param"``
keeps them in the weights' dtype (no workspace, as DeepSpeed's and Axolotl's ``TiledMLP`` do), so each
shard's partial sum is rounded to bf16 once more. This prints, per shard count, the worst relative error
(norm of the difference over the norm of the reference, over every weight) of each against the same
MLP's backward in fp64 on the same bf16-representable inputs, next to the untiled bf16 backward's own
error, and what the fp32 workspace costs. No timing: this is about accuracy, measured in one process.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers as T

import fxtile


def relative_error(model, reference) -> float:
    return max(((p.grad.double() - r.grad).norm() / r.grad.norm()).item()
               for p, r in zip(model.parameters(), reference.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1792)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shards", default="4,16,64", help="comma-separated shard counts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter)
    bf16 = T.models.llama.modeling_llama.LlamaMLP(config).to(args.device, torch.bfloat16)
    x = torch.randn(args.tokens, args.hidden, device=args.device).to(torch.bfloat16)
    dy = torch.randn(args.tokens, args.hidden, device=args.device).to(torch.bfloat16)
    reference = copy.deepcopy(bf16).double()  # the same bf16 values, computed exactly enough
    reference(x.double()).backward(dy.double())

    def error(policy) -> float:
        mlp = copy.deepcopy(bf16)
        if policy is not None:
            fxtile.transform(mlp, shards=policy)
        mlp(x).backward(dy)
        return relative_error(mlp, reference)

    untiled = error(None)
    workspace = sum(p.numel() for p in bf16.parameters()) * 4 / 2**20
    saved = args.tokens * args.inter * 2 * 3 / 2**20  # gate, up and their product, bf16, that tiling does not keep
    print(f"MLP hidden {args.hidden}, intermediate {args.inter}, {args.tokens} tokens, bf16 on {args.device}; "
          f"fp32 sums' workspace {workspace:.1f} MiB (the untiled step keeps about {saved:.0f} MiB of intermediates)")
    print()
    print("| shards | untiled | accumulate=\"fp32\" | accumulate=\"param\" | param / fp32 |")
    print("|---|---|---|---|---|")
    for shards in (int(s) for s in args.shards.split(",")):
        fp32 = error(fxtile.ShardPolicy(shards=shards, accumulate="fp32"))
        param = error(fxtile.ShardPolicy(shards=shards, accumulate="param"))
        print(f"| {shards} | {untiled:.2e} | {fp32:.2e} | {param:.2e} | {param / fp32:.1f}x |")


if __name__ == "__main__":
    main()

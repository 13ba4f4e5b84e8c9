"""Peak memory and time of one forward+backward of a routed expert bank: untiled vs ``shards="auto"``.

    python benchmarks/experts.py                              # the two banks below, fp32, CPU
    python benchmarks/experts.py --dtype bf16 --impl eager     # another dtype / experts implementation
    python benchmarks/experts.py --bank 2048,768,128,8 --tokens 16384   # hidden,intermediate,experts,top-k

The bank is transformers' ``Qwen3MoeExperts`` (fused ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
with the experts implementation a model uses (``grouped_mm`` by default on CPU; ``--impl eager`` is the
per-expert loop a standalone bank falls back to), called as ``experts(x, top_k_ids, top_k_weights)``
on random routed rows (distinct experts per row), with every weight and the routing weights trained.

Default rows: a bank with wide experts (hidden 256, intermediate 1024, 8 experts, top-2) and one with
fine-grained experts (hidden 512, moe_intermediate 256, 64 experts, top-2, Qwen3-MoE's ratio), at 4096
and 16384 tokens. The fine-grained bank's weights are large next to what 4096 tokens keep, so
``shards="auto"`` must run it untiled there (its peak the untiled one) and tile it where that pays.

Each measurement runs in a fresh process, memory and time in separate ones (``benchmarks/measure.py``
says how and why); medians over rounds. Peak is above the step's start (weights allocated, their
gradients from the warm-up step existing, input allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import measure, run_fresh  # noqa: E402  (benchmarks/measure.py)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BANKS = [(256, 1024, 8, 2), (512, 256, 64, 2)]


def worker(impl: str, hidden: int, inter: int, experts: int, top_k: int, tokens: int, dtype_name: str,
           experts_impl: str, device: str) -> dict:
    import torch
    import transformers as T

    import fxtile
    from fxtile import testing

    torch.set_num_threads(int(os.environ.get("FXTILE_THREADS", "2")))
    dtype = getattr(torch, DTYPES[dtype_name])
    config = T.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                              num_experts_per_tok=top_k)
    config._experts_implementation = experts_impl
    torch.manual_seed(0)
    bank = T.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config).to(device, dtype)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(std=0.05)
    if impl == "fxtile":
        fxtile.transform(bank)
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(device)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = torch.rand(tokens, top_k, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, generator=gen).to(device, dtype)

    class Step:
        def __call__(self) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            bank(x, ids, w).backward(dy)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        def clear(self) -> None:
            x.grad = w.grad = None

    result = measure(Step(), device, repeats=2)
    counts = testing.shard_counts(bank)
    result["shards"] = max((c.forward_shards // max(1, c.forward_calls) for c in counts.values()), default=0)
    result["tiled_from"] = next((m.tiled_from for m in fxtile.find(bank)), None) if impl == "fxtile" else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", action="append", help="hidden,intermediate,experts,top_k (repeatable)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--impl", default="grouped_mm", help="transformers experts implementation (grouped_mm, eager, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, h, i, e, k, t, dtype, experts_impl, device = args.worker
        print(json.dumps(worker(impl, int(h), int(i), int(e), int(k), int(t), dtype, experts_impl, device)))
        return
    banks = [tuple(int(v) for v in b.split(",")) for b in args.bank] if args.bank else BANKS
    print(f"expert bank forward+backward, {args.dtype} on {args.device}, experts implementation {args.impl}, "
          f"median of {args.rounds} fresh processes")
    print("| hidden | intermediate | experts | top-k | tokens | untiled (s) | auto (s) | time ratio | untiled peak (MiB) | "
          "auto peak (MiB) | peak ratio | auto shards | auto tiles from (tokens) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for h, i, e, k in banks:
        for tokens in args.tokens:
            res = {}
            for impl in ("untiled", "fxtile"):
                cmd = [__file__, "--worker", impl, str(h), str(i), str(e), str(k), str(tokens), args.dtype, args.impl,
                       args.device]
                mem = [run_fresh(cmd, memory=True, device=args.device) for _ in range(args.rounds)]
                tim = [run_fresh(cmd, memory=False, device=args.device) for _ in range(args.rounds)]
                res[impl] = {"peak": statistics.median(m["peak"] for m in mem), "time": statistics.median(t["time"] for t in tim),
                             "shards": mem[0]["shards"], "tiled_from": mem[0]["tiled_from"]}
            u, f = res["untiled"], res["fxtile"]
            shards = f["shards"] or "untiled"
            print(f"| {h} | {i} | {e} | {k} | {tokens} | {u['time']:.2f} | {f['time']:.2f} | {f['time'] / u['time']:.2f} | "
                  f"{u['peak'] / 2**20:.0f} | {f['peak'] / 2**20:.0f} | {f['peak'] / u['peak']:.2f} | {shards} | "
                  f"{f['tiled_from']} |", flush=True)


if __name__ == "__main__":
    main()

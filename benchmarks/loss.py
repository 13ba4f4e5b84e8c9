"""Peak memory and time of one training step of the output projection + cross-entropy loss.

    python benchmarks/loss.py                       # S=16384, H=512, V=32000, fp32, CPU
    python benchmarks/loss.py --vocab 128256
    python benchmarks/loss.py --model --seq 8192    # whole tiny Llama (V=32000): loss=True + MLP tiling vs untiled
    python benchmarks/loss.py --device cuda --dtype bf16

Implementations, each in fresh processes (``benchmarks/measure.py``), alternating, medians over rounds:

* ``untiled``: what transformers' ``ForCausalLMLoss`` runs: ``lm_head(h).float().view(-1, V)`` and
  ``F.cross_entropy`` (logits, their fp32 copy, the log-softmax and their gradients all materialized);
* ``fxtile``: the same module after ``fxtile.transform(module, loss=True)`` (``shards="auto"``);
* ``torch``: ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` (chunked);
* ``deepspeed``: ``TiledFusedLogitsLoss`` with the same number of shards as fxtile and its ``mean``
  reduction (the mean of the shard means: exact here, where the shards are equal and no row is ignored;
  its weight gradients are accumulated in its forward for an upstream gradient of 1, so the loss cannot
  be rescaled afterwards);
* ``liger`` (only when named in ``--impls``): Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
  (Triton, CUDA only; chunked, gradients computed in its forward).

The floor is what any implementation must hold: the hidden states, their gradient and the head
weight's gradient, ``(2 x S x H + V x H) x bytes``. The input gradient and the loss are computed, so the
max difference of every gradient against untiled is printed too. A process that runs out of memory (or
past ``--mem-gb``) is reported as such, with fxtile's own estimate of what the untiled step needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import measure, run_fresh  # noqa: E402  (benchmarks/measure.py)

IMPLS = ("untiled", "fxtile", "torch", "deepspeed", "liger")
DEFAULT_IMPLS = ("untiled", "fxtile", "torch", "deepspeed")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _fresh(cmd: list[str], memory: bool, device: str) -> dict:
    """``run_fresh``, saying why a worker failed (its stderr) before the error ends the benchmark."""
    try:
        return run_fresh(cmd, memory, device)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(f"worker {' '.join(map(str, cmd[1:3]))} failed; its stderr ends:\n{(exc.stderr or '')[-3000:]}\n")
        raise


def _head(hidden: int, vocab: int, dtype, device: str):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Head(nn.Module):  # transformers' causal-LM head and loss, labels already shifted
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(hidden, vocab, bias=False)

        def forward(self, h, labels):
            logits = self.lm_head(h).float()
            return F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100)

    torch.manual_seed(0)
    return Head().to(device=device, dtype=dtype)


def _loss_fn(impl: str, head, rows: int, hidden: int, vocab: int):
    """``loss(h, labels)`` for one implementation."""
    import torch
    import torch.nn.functional as F

    import fxtile

    policy = fxtile.ShardPolicy()
    shards = int(policy.loss_count(rows, hidden, vocab, head.lm_head.weight.element_size()))  # fxtile's own count
    if impl == "fxtile":
        return fxtile.transform(head, loss=True)
    if impl == "torch":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, y: F.linear_cross_entropy(h.view(-1, hidden), head.lm_head.weight, y.view(-1),
                                                   ignore_index=-100, options=options)
    if impl == "deepspeed":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        def shard_loss(module, x, y):
            return F.cross_entropy(module.lm_head(x).float().view(-1, vocab), y.view(-1))

        return lambda h, y: TiledFusedLogitsLoss.apply(shard_loss, head, h, y, None, shards, [head.lm_head.weight], "mean")
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, y: liger(head.lm_head.weight, h.view(-1, hidden), y.view(-1))
    return head


def worker(args: argparse.Namespace) -> dict:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.mem_gb:
        cap = int(args.mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    dtype = getattr(torch, DTYPES[args.dtype])
    head = _head(args.hidden, args.vocab, dtype, args.device)
    fn = _loss_fn(args.impl, head, args.batch * args.seq, args.hidden, args.vocab)
    gen = torch.Generator(device=args.device).manual_seed(1)
    h0 = torch.randn(args.batch, args.seq, args.hidden, dtype=dtype, device=args.device, generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=gen)

    def step() -> float:
        head.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn(h, labels)
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        step.h_grad, step.loss = h.grad, loss.detach()
        return time.perf_counter() - start

    step.clear = lambda: head.zero_grad(set_to_none=True)
    try:
        result = measure(step, args.device, args.repeats)
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {"oom": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    if args.grads:
        torch.save({"h": step.h_grad.cpu(), "weight": head.lm_head.weight.grad.cpu(), "loss": step.loss.cpu()}, args.grads)
    return result


def model_worker(args: argparse.Namespace) -> dict:
    """A tiny Llama (V=32000 by default), one training step at a long sequence: untiled, or every MLP and
    the loss tiled (``fxtile.transform(model, loss=True)``)."""
    import torch
    import transformers as T

    import fxtile

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, vocab_size=args.vocab,
                           max_position_embeddings=args.seq, use_cache=False)
    model = T.LlamaForCausalLM(config).train()
    model.gradient_checkpointing_enable()
    if args.impl == "fxtile":
        fxtile.transform(model, loss=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    step.clear = lambda: model.zero_grad(set_to_none=True)
    return measure(step, "cpu", args.repeats)


def _estimate_untiled(args: argparse.Namespace) -> float:
    """What fxtile's estimate says the untiled loss keeps and peaks at, in bytes (meta device, no memory)."""
    import torch

    import fxtile
    from fxtile.estimate import mlp_memory

    with torch.device("meta"):
        head = _head(args.hidden, args.vocab, getattr(torch, DTYPES[args.dtype]), "meta")
    fxtile.transform(head, loss=True)
    (entry,) = mlp_memory(head, args.batch * args.seq)
    return entry.peak_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per process after the first")
    parser.add_argument("--mem-gb", type=float, default=0.0, help="address-space cap per process (0: none)")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--model", action="store_true", help="whole tiny Llama: untiled vs fxtile (loss=True)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        print(json.dumps(model_worker(args) if args.model else worker(args)))
        return
    impls = ("untiled", "fxtile") if args.model else tuple(args.impls.split(","))
    results: dict[str, list[dict]] = {i: [] for i in impls}
    flags = ["--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--batch", str(args.batch),
             "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats), "--mem-gb", str(args.mem_gb)]
    flags += ["--model"] if args.model else []
    with tempfile.TemporaryDirectory() as tmp:
        grads = {i: os.path.join(tmp, f"{i}.pt") for i in impls}
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                mem = _fresh([__file__, "--worker", impl, *flags, *(["--grads", grads[impl]] if r == 0 and not args.model else [])],
                                True, args.device)
                if "oom" in mem:
                    results[impl].append(mem)
                    continue
                timing = _fresh([__file__, "--worker", impl, *flags], False, args.device)
                results[impl].append({"peak": mem["peak"], "time": timing["time"]})
        diffs = {}
        if not args.model and os.path.exists(grads.get("untiled", "")):
            import torch

            ref = torch.load(grads["untiled"])
            for i in impls[1:]:
                if os.path.exists(grads[i]):
                    got = torch.load(grads[i])
                    diffs[i] = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
    mib, bytes_per = 2**20, {"fp32": 4, "bf16": 2}[args.dtype]
    rows = args.batch * args.seq
    floor = (2 * rows * args.hidden + args.vocab * args.hidden) * bytes_per
    med = {i: {k: statistics.median(r[k] for r in results[i]) for k in ("peak", "time")}
           for i in impls if results[i] and "oom" not in results[i][0]}
    what = (f"tiny Llama (2 layers, H={args.hidden}, V={args.vocab}, checkpointing), loss=True + MLP tiling"
            if args.model else f"projection + cross-entropy: S={rows} H={args.hidden} V={args.vocab}")
    print(f"{what}, {args.dtype} on {args.device}, median of {args.rounds} fresh processes"
          + ("" if args.model else f"; floor (2*S*H + V*H)*bytes = {floor / mib:.0f} MiB"))
    base = med.get("untiled")
    cols = ["impl", "time (s)", "peak (MiB)"] + ([] if args.model else ["x floor"]) + ["time/untiled", "peak/untiled"]
    cols += [] if args.model else ["max grad diff vs untiled"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for i in impls:
        if i not in med:
            note = results[i][0].get("oom", "no result") if results[i] else "no result"
            extra = f"; fxtile's estimate of its peak: {_estimate_untiled(args) / mib:.0f} MiB" if i == "untiled" else ""
            print(f"| {i} | out of memory ({note}{extra}) |" + " |" * (len(cols) - 2))
            continue
        m = med[i]
        row = [i, f"{m['time']:.3f}", f"{m['peak'] / mib:.1f}"] + ([] if args.model else [f"{m['peak'] / floor:.2f}"])
        row += [f"{m['time'] / base['time']:.2f}", f"{m['peak'] / base['peak']:.2f}"] if base else ["-", "-"]
        if not args.model:
            row += [f"{diffs[i]:.1e}" if i in diffs else "-"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

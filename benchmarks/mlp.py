"""Peak memory and time of one forward+backward of a gated MLP: untiled vs fxtile vs DeepSpeed TiledMLP.

    python benchmarks/mlp.py                       # S=16384, H=512, I=2048, fp32, batch 1
    python benchmarks/mlp.py --seq 32768 --dtype bf16 --rounds 5
    python benchmarks/mlp.py --model               # a tiny Llama with gradient checkpointing
    python benchmarks/mlp.py --device cuda --dtype bf16 --impls untiled,fxtile,liger

``--impls`` picks the implementations (``untiled`` first; default untiled, fxtile, deepspeed). ``liger``
is Liger-Kernel's ``LigerTiledSwiGLUMLP`` (Triton SiLU-mul, CUDA only) with its default
``ceil(S/H)`` shards, given the same weights.

Each measurement runs in a fresh process (so one run's allocator state cannot leak into another),
memory and time in separate processes (``benchmarks/measure.py`` says how and why), the
implementations alternate within each round, and the table reports medians over rounds. Memory is
measured with the weights allocated and the input not yet. Every implementation's peak also holds
the weight gradients (3 x H x I), which the floor leaves out. The floor is
what any implementation must hold: input, output, output grad and input grad, ``4 x S x H x bytes``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import measure, run_fresh  # noqa: E402  (benchmarks/measure.py)

IMPLS = ("untiled", "fxtile", "deepspeed", "liger")
DEFAULT_IMPLS = ("untiled", "fxtile", "deepspeed")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _fresh(cmd: list[str], memory: bool, device: str) -> dict:
    """``run_fresh``, saying why a worker failed (its stderr) before the error ends the benchmark."""
    try:
        return run_fresh(cmd, memory, device)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(f"worker {' '.join(map(str, cmd[1:3]))} failed; its stderr ends:\n{(exc.stderr or '')[-3000:]}\n")
        raise


def _gated_mlp(hidden: int, inter: int, dtype, device: str):
    import torch
    from torch import nn

    class GatedMLP(nn.Module):  # the Llama MLP shape
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
            self.up_proj = nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    return GatedMLP().to(device=device, dtype=dtype)


def _wrap(impl: str, mlp, seq: int, hidden: int, shards: str):
    """The module to run: the MLP itself, fxtile's tiling of it, DeepSpeed's TiledMLP around it, or
    Liger's tiled SwiGLU MLP holding the same weights."""
    import torch

    if impl == "fxtile":
        import fxtile

        return fxtile.transform(mlp, shards="auto" if shards == "auto" else int(shards))
    if impl == "deepspeed":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        n = math.ceil(seq / hidden)  # TiledMLP's documented rule

        class DeepSpeedTiled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = mlp

            def forward(self, x):
                params = [self.mlp.down_proj.weight, self.mlp.gate_proj.weight, self.mlp.up_proj.weight]
                return TiledMLP.apply(lambda m, xs: m(xs), self.mlp, x, n, params)

        return DeepSpeedTiled()
    if impl == "liger":
        from types import SimpleNamespace

        from liger_kernel.transformers.tiled_mlp import LigerTiledSwiGLUMLP

        inter = mlp.gate_proj.out_features
        config = SimpleNamespace(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
        weight = mlp.gate_proj.weight
        with torch.device(weight.device):
            liger = LigerTiledSwiGLUMLP(config).to(weight.dtype)
        liger.load_state_dict(mlp.state_dict())  # same parameter names: gate_proj, up_proj, down_proj
        return liger
    return mlp


def worker(args: argparse.Namespace) -> dict:
    """One implementation in this (fresh) process: returns peak bytes above baseline and step times."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device
    module = _wrap(args.impl, _gated_mlp(args.hidden, args.inter, dtype, device), args.seq, args.hidden, args.shards)
    shape = (args.batch, args.seq, args.hidden)

    if args.compile:
        module = torch.compile(module, fullgraph=True)

    def step(shape=shape) -> float:
        for p in module.parameters():
            p.grad = None
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(shape, dtype=dtype, device=device, generator=gen).requires_grad_()
        dy = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        module(x).backward(dy)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        step.x_grad = x.grad
        return elapsed

    def clear() -> None:
        for p in module.parameters():
            p.grad = None
        step.x_grad = None

    step.clear = clear
    result = measure(step, device, args.repeats)
    if args.grads:
        torch.save({"x": step.x_grad.cpu(), **{n: p.grad.cpu() for n, p in module.named_parameters()}}, args.grads)
    return result


def model_worker(args: argparse.Namespace) -> dict:
    """A tiny Llama, gradient checkpointing on, one training step at a long sequence."""
    import torch
    import transformers as T

    import fxtile

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                           max_position_embeddings=args.seq, use_cache=False)
    model = T.LlamaForCausalLM(config).to(getattr(torch, DTYPES[args.dtype]))
    model.gradient_checkpointing_enable()
    model.train()
    if args.impl == "fxtile":
        fxtile.transform(model, shards=args.shards if args.shards == "auto" else int(args.shards))
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    step.clear = lambda: model.zero_grad(set_to_none=True)
    return measure(step, "cpu", args.repeats)


def _run_worker(impl: str, args: argparse.Namespace, grads: str | None, what: str) -> dict:
    cmd = [__file__, "--worker", impl, "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--inter", str(args.inter), "--dtype", args.dtype, "--batch", str(args.batch), "--repeats",
           str(args.repeats), "--shards", args.shards, "--device", args.device]
    cmd += ["--model"] if args.model else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--grads", grads] if grads else []
    return _fresh(cmd, what == "memory", args.device)


def _max_grad_diff(a: str, b: str) -> float:
    import torch

    ga, gb = ({k.removeprefix("mlp."): v for k, v in torch.load(f).items()} for f in (a, b))  # DS wraps as .mlp
    assert ga.keys() == gb.keys(), (sorted(ga), sorted(gb))
    return max((ga[k].float() - gb[k].float()).abs().max().item() for k in ga)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shards", default="auto", help="fxtile's shards: 'auto' or an int")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process after the first")
    parser.add_argument("--model", action="store_true", help="whole tiny Llama with gradient checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) untiled and fxtile")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated, 'untiled' first, from {', '.join(IMPLS)} (--model, --compile: untiled,fxtile)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model and args.device != "cpu":
        parser.error("--model measures on CPU only")
    if args.worker:
        args.impl = args.worker
        print(json.dumps(model_worker(args) if args.model else worker(args)))
        return

    impls = ("untiled", "fxtile") if args.model or args.compile else tuple(args.impls.split(","))
    if impls[0] != "untiled" or not set(impls) <= set(IMPLS):
        parser.error(f"--impls: 'untiled' first, then any of {', '.join(IMPLS[1:])}; got {args.impls!r}")
    results: dict[str, list[dict]] = {i: [] for i in impls}
    with tempfile.TemporaryDirectory() as tmp:
        grads = {i: os.path.join(tmp, f"{i}.pt") for i in impls}
        for r in range(args.rounds):
            order = impls if r % 2 == 0 else impls[::-1]  # alternate so drift hits every impl alike
            for impl in order:
                memory = _run_worker(impl, args, grads[impl] if r == 0 and not args.model else None, "memory")
                timing = _run_worker(impl, args, None, "time")
                results[impl].append({"peak": memory["peak"], "time": timing["time"]})
        diffs = {} if args.model else {i: _max_grad_diff(grads["untiled"], grads[i]) for i in impls[1:]}
    with_ds = "deepspeed" in impls

    mib = 2**20
    bytes_per = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    floor = 4 * args.batch * args.seq * args.hidden * bytes_per
    med = {i: {k: statistics.median(r[k] for r in results[i]) for k in ("peak", "time")} for i in impls}
    what = "tiny Llama, 2 layers, gradient checkpointing" if args.model else "gated MLP"
    what += ", torch.compile(fullgraph=True)" if args.compile else ""
    print(f"{what}: batch={args.batch} S={args.seq} H={args.hidden} I={args.inter} {args.dtype} on {args.device}, "
          f"median of {args.rounds} fresh processes" + ("" if args.model else f"; floor 4*S*H*bytes = {floor / mib:.0f} MiB"))
    head = f"| {'impl':<10} | {'time (s)':>8} | {'peak (MiB)':>10} |"
    head += "" if args.model else f" {'x floor':>7} |"
    head += f" {'time/untiled':>12} | {'peak/untiled':>12} |"
    head += f" {'time/DS':>7} | {'peak/DS':>7} |" if with_ds else ""
    head += "" if args.model else f" {'max grad diff vs untiled':>24} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for i in impls:
        m, u = med[i], med["untiled"]
        row = f"| {i:<10} | {m['time']:8.3f} | {m['peak'] / mib:10.1f} |"
        row += "" if args.model else f" {m['peak'] / floor:7.2f} |"
        row += f" {m['time'] / u['time']:12.2f} | {m['peak'] / u['peak']:12.2f} |"
        if with_ds:
            d = med["deepspeed"]
            row += f" {m['time'] / d['time']:7.2f} | {m['peak'] / d['peak']:7.2f} |"
        if not args.model:
            row += f" {diffs[i]:.1e}".rjust(25) + " |" if i in diffs else f" {'-':>24} |"
        print(row)


if __name__ == "__main__":
    main()

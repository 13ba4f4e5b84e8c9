"""What ``fxtile.transform`` costs, with and without its numerical self-check (``verify=True|False``),
from tiny models to a Llama-3-8B-shaped one in bf16 with its 128256-token head.

    python benchmarks/transform.py                    # every row below, this CPU's own kernels
    python benchmarks/transform.py --avx2             # as on a host without bf16 matmul kernels (AVX2)
    python benchmarks/transform.py --only 8b-4        # one row (tiny, llama-1b, 8b-4, 8b-32, qwen3-0.6b)

Each measurement runs in a fresh process (the first transform in a process also pays for imports and
for registering the custom op, so a tiny model is transformed first and not timed), builds the model
and times one ``fxtile.transform(model, ...)``; the table gives the median of ``--rounds`` processes.
Big models are built on the meta device and then allocated with ``to_empty`` and filled from a small
random buffer: their random initialization would take minutes on this CPU and is not what is measured
(the check's cost depends on the weights' shapes and dtypes, not their values).

``--avx2`` sets ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` in the workers: the CPU then
has no native bf16 matmul (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False), like many
training hosts where a bf16 model is loaded and prepared before it moves to the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (label, layers, hidden, intermediate, heads, kv heads, vocab, dtype, loss, tied)
MODELS = {
    "tiny": ("tiny Llama", 2, 64, 176, 4, 2, 1024, "fp32", False, False),
    "llama-1b": ("32-layer Llama", 32, 1024, 2816, 16, 4, 1024, "fp32", False, False),
    "8b-4": ("Llama-3-8B-shaped, 4 layers", 4, 4096, 14336, 32, 8, 128256, "bf16", True, False),
    "8b-32": ("Llama-3-8B-shaped", 32, 4096, 14336, 32, 8, 128256, "bf16", True, False),
    "qwen3-0.6b": ("Qwen3-0.6B-shaped", 28, 1024, 3072, 16, 8, 151936, "bf16", True, True),
}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def build(name: str):
    import torch
    import transformers as T

    _, layers, hidden, inter, heads, kv, vocab, dtype, _, tied = MODELS[name]
    cls, config_cls = (T.Qwen3ForCausalLM, T.Qwen3Config) if name.startswith("qwen") else (T.LlamaForCausalLM, T.LlamaConfig)
    config = config_cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                        head_dim=128 if name.startswith("qwen") else hidden // heads)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if layers * hidden < 2**16:  # small: an ordinary random init
        torch.manual_seed(0)
        return cls(config).to(torch_dtype)
    with torch.device("meta"):
        model = cls(config).to(torch_dtype)
    model.to_empty(device="cpu")
    source = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch_dtype)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), source.numel()):
                chunk = flat[start:start + source.numel()]
                chunk.copy_(source[: chunk.numel()])
    if tied:
        model.tie_weights()
    return model


def worker(name: str, verify: bool) -> dict:
    import torch

    import fxtile

    torch.set_num_threads(int(os.environ.get("FXTILE_THREADS", "2")))
    model = build(name)
    loss = MODELS[name][8]
    fxtile.transform(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))  # warm-up
    start = time.perf_counter()
    fxtile.transform(model, verify=verify, loss=loss)
    seconds = time.perf_counter() - start
    matches = fxtile.find(model, loss=loss)
    return {"seconds": seconds, "tiled": sum(m.tiled for m in matches), "verified": sum(m.verified is True for m in matches),
            "bf16_kernels": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=None)
    parser.add_argument("--avx2", action="store_true", help="run without the CPU's bf16 kernels (as on an AVX2 host)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, verify = args.worker
        print(json.dumps(worker(name, verify == "1")))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if args.avx2:
        env.update(AVX2)
    names = args.only or list(MODELS)
    print(f"fxtile.transform on CPU{' without bf16 kernels (--avx2)' if args.avx2 else ''}, median of {args.rounds} "
          "fresh processes (loss=True where the row says so)")
    print("| model | layers | hidden | intermediate | vocabulary | dtype | loss | verify=False (s) | verify=True (s) | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        label, layers, hidden, inter, _, _, vocab, dtype, loss, _ = MODELS[name]
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for verify in (False, True):
                out = subprocess.run([sys.executable, __file__, "--worker", name, "1" if verify else "0"],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"worker {name} verify={verify} failed:\n{out.stderr[-3000:]}")
                runs[verify].append(json.loads(out.stdout.strip().splitlines()[-1]))
        off, on = (statistics.median(r["seconds"] for r in runs[v]) for v in (False, True))
        tiled, verified = runs[True][0]["tiled"], runs[True][0]["verified"]
        print(f"| {label} | {layers} | {hidden} | {inter} | {vocab} | {dtype} | {loss} | {off:.2f} | {on:.2f} | "
              f"{verified}/{tiled} |", flush=True)


if __name__ == "__main__":
    main()

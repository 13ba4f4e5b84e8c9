"""Pre-train a causal LM for a few steps at a long sequence length, with and without fxtile.

    python examples/pretrain.py                      # tiny random Llama, 4096 tokens, CPU, < 1 min
    python examples/pretrain.py --seq-len 8192 --steps 1
    python examples/pretrain.py /path/to/hf_model    # a local Hugging Face directory (its weights)

Each variant runs in a fresh process, so its peak memory is its own: the peak resident memory
(VmHWM, reset just before the first step) minus the resident memory at that point, i.e. what the
training steps add on top of the loaded model: activations, gradients and AdamW state. glibc is told
to return every freed block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_), so resident memory follows
the live tensors. On a GPU, read torch.cuda.max_memory_allocated() instead.

The only change for fxtile is one line: ``fxtile.transform(model, shards="auto")``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident memory (Linux >= 4.0)
        return True
    except OSError:
        return False


def load_model(path: str | None, seq_len: int):
    import torch
    import transformers as T

    torch.manual_seed(0)
    if path:
        return T.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=seq_len)
    return T.LlamaForCausalLM(config)


def worker(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    import torch

    import fxtile

    torch.manual_seed(0)
    model = load_model(args.model, args.seq_len).train()
    tiled = 0
    if args.worker == "fxtile":
        fxtile.transform(model, shards="auto")
        tiled = sum(m.tiled for m in fxtile.find(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.get_text_config().vocab_size
    data = torch.randint(0, vocab, (args.steps, args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    has_proc = _reset_peak()
    base = _vm("VmRSS") if has_proc else 0
    losses, start = [], time.perf_counter()
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if has_proc:
        peak = _vm("VmHWM") - base
    else:  # no /proc: the whole process's peak, an upper bound
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"peak": peak, "losses": losses, "seconds": time.perf_counter() - start, "tiled": tiled,
                      "model": type(model).__name__}))


def run_variant(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)] + ([args.model] if args.model else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"the {name} run failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a local Hugging Face model directory (default: a tiny random Llama)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", choices=["untiled", "fxtile"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    mib = 2**20
    print(f"{args.steps} AdamW steps, batch {args.batch_size} x seq {args.seq_len}, fp32 on CPU, each run in a fresh process")
    results = {name: run_variant(name, args) for name in ("untiled", "fxtile")}
    for name, r in results.items():
        losses = " ".join(f"{v:.4f}" for v in r["losses"])
        extra = f"  ({r['tiled']} MLPs tiled)" if name == "fxtile" else ""
        print(f"  {name:<8} peak memory of the steps {r['peak'] / mib:8.1f} MiB   {r['seconds']:5.1f} s   "
              f"loss {losses}{extra}")
    before, after = results["untiled"]["peak"], results["fxtile"]["peak"]
    drift = max(abs(a - b) for a, b in zip(results["untiled"]["losses"], results["fxtile"]["losses"]))
    print(f"  fxtile saves {(before - after) / mib:.1f} MiB ({100 * (before - after) / before:.0f}%) of the "
          f"{results['untiled']['model']}'s training peak; max loss difference {drift:.1e}")


if __name__ == "__main__":
    main()

"""What ``fxtile.transform`` costs, with and without its numerical self-check (``verify=True|False``).

    python benchmarks/transform.py                 # tiny Llama (2 layers) and a 32-layer Llama, CPU fp32
    python benchmarks/transform.py --layers 32 --hidden 2048 --inter 5632

Each measurement runs in a fresh process (the first transform in a process also pays for imports and
for registering the custom op), builds the model with real random weights, and times one
``fxtile.transform(model)``; the table gives the median of ``--rounds`` processes. The self-check runs
each region forward and backward on 8 rows twice (tiled and untiled), so its cost grows with the
weights (the weight gradients it compares) and not with any sequence length.
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


def worker(layers: int, hidden: int, inter: int, verify: bool) -> dict:
    import torch
    import transformers as T

    import fxtile

    torch.set_num_threads(int(os.environ.get("FXTILE_THREADS", "2")))
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                           vocab_size=1024)
    model = T.LlamaForCausalLM(config)
    fxtile.transform(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))  # warm-up
    start = time.perf_counter()
    fxtile.transform(model, verify=verify)
    seconds = time.perf_counter() - start
    matches = fxtile.find(model)
    return {"seconds": seconds, "tiled": sum(m.tiled for m in matches), "verified": sum(m.verified is True for m in matches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        layers, hidden, inter, verify = args.worker
        print(json.dumps(worker(int(layers), int(hidden), int(inter), verify == "1")))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    models = [("tiny Llama", 2, 64, 176), (f"{args.layers}-layer Llama", args.layers, args.hidden, args.inter)]
    print(f"fxtile.transform on CPU (fp32, real random weights), median of {args.rounds} fresh processes")
    print("| model | layers | hidden | intermediate | verify=False (s) | verify=True (s) | self-check per region (ms) | verified |")
    print("|---|---|---|---|---|---|---|---|")
    for name, layers, hidden, inter in models:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for verify in (False, True):
                out = subprocess.run([sys.executable, __file__, "--worker", str(layers), str(hidden), str(inter),
                                      "1" if verify else "0"], capture_output=True, text=True, env=env, check=True)
                runs[verify].append(json.loads(out.stdout.strip().splitlines()[-1]))
        off, on = (statistics.median(r["seconds"] for r in runs[v]) for v in (False, True))
        tiled, verified = runs[True][0]["tiled"], runs[True][0]["verified"]
        print(f"| {name} | {layers} | {hidden} | {inter} | {off:.2f} | {on:.2f} | {1000 * (on - off) / max(1, tiled):.0f} | "
              f"{verified}/{tiled} |")


if __name__ == "__main__":
    main()

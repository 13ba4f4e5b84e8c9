"""One end-to-end training step of a Qwen3-0.6B-shaped model: untiled, DeepSpeed (ALST), fxtile MLPs, fxtile MLPs + loss.

    python benchmarks/step.py                          # 4 layers, S = 1024 1536 2048, fp32, CPU
    python benchmarks/step.py --seq 2048 4096 8192     # longer (about 3x the time; --mem-gb caps each worker)
    python benchmarks/step.py --layers 28 --device cuda --dtype bf16 --seq 8192 16384 32768

Why this benchmark: ``mlp.py`` and ``loss.py`` measure one block each; what a user gets is a whole
training step, where checkpointing, the recomputed layer, the tied embedding's gradient and the loss
head all meet. The step is the one training code runs: ``model.train()``, activation checkpointing on
(``activation_checkpointing_enable()``, transformers 5.25's name for ``gradient_checkpointing_enable``,
non-reentrant), ``use_cache=False``, ``model(input_ids=ids, labels=ids).loss.backward()``, batch 1,
gradients set to ``None`` before the step (what ``optimizer.zero_grad()`` leaves). The model is built
from ``transformers.Qwen3Config`` with Qwen3-0.6B's shapes (hidden 1024, intermediate 3072, 16 query
/ 8 key-value heads of 128, vocabulary 151936, tied embeddings, RMSNorm eps 1e-6, rope theta 1e6) and
random weights (no download); ``--layers`` of its 28 layers (4 by default: every layer costs the same,
so the per-token numbers of the recomputed layer do not depend on it). The default lengths start at
twice fxtile's 512-token MLP shard: at 512 tokens the MLP runs in one untiled call, another code path
whose peak is 15 MiB below the line the longer runs draw, so a fit through it is not a per-token cost.
They stop at 2048 so that the default run takes about 10 minutes on a 2-core CPU (9 minutes measured
on a nearly idle one: a step costs about 7 s per 1K tokens, mostly the 151936-word head, and each
process about 12 s more to import, build, tile and warm up; about twice that when the machine is
shared). Attention is transformers' default (``sdpa``; on CPU the flash kernel, whose memory grows
linearly with the tokens).

Implementations, each measured in its own fresh process (``benchmarks/measure.py``), memory and time in
separate processes:

* ``untiled``: the model as transformers builds it;
* ``deepspeed``: DeepSpeed 0.19.8's ``TiledMLP`` and ``TiledFusedLogitsLoss``
  (``deepspeed/runtime/sequence_parallel/ulysses_sp.py``) applied the way Arctic Training (ALST's
  reference trainer) applies them: ``Qwen3MLP.forward`` monkeypatched with
  ``arctic_training/model/tiled_compute.py::tiled_mlp_forward_common`` (``ceil(seqlen / hidden)``
  shards, the same example as ``TiledMLP``'s docstring), and the causal-LM loss computed as
  ``arctic_training/trainer/sft_trainer.py::SFTTrainer.loss`` does on its sequence-parallel branch
  (``model.model(...)`` for the hidden states, pre-shifted labels, shards of about 1 GiB of fp32 logits,
  ``fused_logits_loss_fn`` with ``output_reduction="sum"`` divided by the count of labelled tokens;
  with one rank its ``all_gather`` over ranks is the identity). Here that loss is installed as
  ``Qwen3ForCausalLM.forward`` so that every implementation runs the same call. Two consequences of
  following it: its loss shards hold about 1 GiB of fp32 logits each (one shard up to 1766 tokens), so
  its peak is a step function of the tokens rather than a line; and the head weight's gradient is that
  of the *summed* loss (the weight gradients are computed inside ``TiledFusedLogitsLoss``'s forward for
  an upstream gradient of 1, and the division by the labelled tokens comes after), which the table's
  gradient norm shows; memory and time are what they would be with the right scale;
* ``fxtile-mlp``: ``fxtile.transform(model)`` (the MLPs only);
* ``fxtile-loss``: ``fxtile.transform(model, loss=True)`` (the MLPs and the loss head).

What is reported, and why it is measured this way:

* **peak above the weights**: the highest resident set (CPU; ``max_memory_allocated`` on CUDA) during
  the step above the baseline taken once the model and its weights exist, after one warm-up step whose
  gradients are dropped (``measure.py``'s rule), so it includes the weight gradients the step creates.
  The step is split at the moment the gradient reaches the embedding's output (a tensor hook; the peak
  is read and reset there): **layers+loss** is everything before (forward, loss, every layer's backward),
  **embedding** everything after (the embedding's weight gradient and, the embedding being tied to the
  head, the sum of the two gradients of the shared weight: weight-sized, not token-sized). The split is
  needed because with a 151936-word tied vocabulary the embedding part is 1.4 to 2 GiB in fp32 and is the
  whole step's peak of the tiled-loss runs at these lengths, which would hide the activations' growth.
* **time**: one timed step after the warm-up, in a process with the default allocator. Other work
  shares this machine's 2 cores, so times vary by tens of percent between runs; peaks do not.
* **bytes per token**: the least-squares slope of the layers+loss peak against the tokens, over the
  lengths that fit. It is what each extra token costs.
* **longest sequence in ``--budget-gib``**: the weights plus the larger of the two phases' linear fits,
  extrapolated (stated as such) beyond the measured lengths: the weights, their gradients and the step's
  activations, not the optimizer's states, the runtime, or a CUDA context.
* **what fxtile-loss's bytes per token are made of**: every tensor that grows with the tokens and is
  alive at that peak, from the config (see :func:`breakdown`), against the measured slope.

An implementation that runs out of memory (each worker's address space is capped at ``--mem-gb``, so
that one cannot take the machine down) is reported as "out of memory" and left out of the fits.

The warm-up step runs ``--warmup-seq`` tokens (256 by default) instead of the measured length: it exists
to pay imports, lazy initialisation and fxtile's per-call trace (keyed by the call's signature, not its
length) outside the measurement, and at the full length it would double the run time. In the memory
process every block above 128 KiB is mapped and unmapped per allocation, so a shorter warm-up does not
change the measured peak (checked at 4 layers and 2048 tokens against a full-length warm-up: fxtile-loss
within 0.5 MiB; untiled within 0.4 MiB before the embedding's gradient, 6.6 MiB after); in the timing
process the first full-length step pays some page faults of heap growth, small against a step of tens of
seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import _peak, _reset_peak, run_fresh  # noqa: E402  (benchmarks/measure.py)

IMPLS = ("untiled", "deepspeed", "fxtile-mlp", "fxtile-loss")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BYTES = {"fp32": 4, "bf16": 2}
# Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B), minus the layer count.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0)
MIB, GIB = 2**20, 2**30


# --------------------------------------------------------------------------------------------- worker


def _config(layers: int, seq: int):
    import transformers

    return transformers.Qwen3Config(**QWEN3_06B, num_hidden_layers=layers, use_cache=False,
                                    max_position_embeddings=max(40960, seq))


def _patch_deepspeed() -> None:
    """Install DeepSpeed's tiled MLP and tiled logits+loss the way Arctic Training does (module docstring).

    Class-level monkeypatches, before the model is built, as ``enable_tiled_mlp_compute`` requires; this
    runs in a fresh worker process, so nothing else sees them."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss, TiledMLP
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.qwen3 import modeling_qwen3

    def tiled_mlp_forward_common(self, x):  # arctic_training/model/tiled_compute.py
        bs, seqlen, hidden = x.shape
        num_shards = math.ceil(seqlen / hidden)
        if dist.is_available() and dist.is_initialized():  # every rank runs the same number of shards
            tensor = torch.tensor(num_shards, device=x.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            num_shards = tensor.item()
        compute_params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]

        def mlp_forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

        return TiledMLP.apply(mlp_forward, self, x, num_shards, compute_params)

    def causal_lm_forward(self, input_ids=None, labels=None, **kwargs):  # SFTTrainer.loss, SP branch
        # UlyssesSPDataLoaderAdapter's pre-shifted labels (the same shift as transformers' ForCausalLMLoss)
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        bs, seqlen = shift_labels.shape
        num_shards = math.ceil(bs * seqlen * self.config.vocab_size * 4 / 2**30)  # ~1 GiB of fp32 logits each
        hidden_states = self.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state

        def fused_logits_loss_fn(model_with_head=None, hidden_states=None, shift_labels=None):
            vocab_size = model_with_head.config.vocab_size
            logits = model_with_head.lm_head(hidden_states)
            if all((shift_labels == -100).squeeze()):
                loss_sum = (logits.sum() * 0.0).float()
            else:
                good_items = ((shift_labels != -100).squeeze()).sum()
                loss = model_with_head.loss_function(logits=logits, labels=None, vocab_size=vocab_size,
                                                     shift_labels=shift_labels)
                loss_sum = loss * good_items
            return loss_sum

        total_loss_sum = TiledFusedLogitsLoss.apply(fused_logits_loss_fn, self, hidden_states, shift_labels, None,
                                                    num_shards, [self.lm_head.weight], "sum")
        total_good_items = (shift_labels != -100).squeeze().sum()
        return CausalLMOutputWithPast(loss=total_loss_sum / max(total_good_items, 1), logits=None)

    modeling_qwen3.Qwen3MLP.forward = tiled_mlp_forward_common
    modeling_qwen3.Qwen3ForCausalLM.forward = causal_lm_forward


def _shards(impl: str, model, seq: int, before: dict) -> dict:
    """Shards per call of the MLPs and the loss in the measured step: fxtile's own counters (what its op
    ran), DeepSpeed's rules (what the patched code passes to its ops)."""
    cfg = model.config
    if impl == "deepspeed":
        return {"mlp": math.ceil(seq / cfg.hidden_size), "loss": math.ceil(seq * cfg.vocab_size * 4 / GIB)}
    if not impl.startswith("fxtile"):
        return {}
    from fxtile.testing import shard_counts, untiled_calls

    out = {"untiled_calls": sum(untiled_calls(model).values())}
    for path, c in shard_counts(model).items():
        b = before.get(path, (0, 0))
        calls, shards = c.forward_calls - b[0], c.forward_shards - b[1]
        if calls:
            out["mlp" if path.endswith("mlp") else "loss"] = shards // calls
    return out


def worker(args: argparse.Namespace) -> dict:
    """One implementation at one length in this (fresh) process. ``--what memory``: the peak of one step,
    split at the embedding output's gradient; ``--what time``: the time of one step."""
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.mem_gb:
        cap = int(args.mem_gb * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    import transformers

    device, dtype = args.device, getattr(torch, DTYPES[args.dtype])
    if args.impl == "deepspeed":
        _patch_deepspeed()
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_config(args.layers, args.seq)).to(device=device, dtype=dtype).train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if args.impl.startswith("fxtile"):
        import fxtile

        fxtile.transform(model, loss=args.impl == "fxtile-loss")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=gen).to(device)
    warm_ids = ids[:, : args.warmup_seq] if args.warmup_seq else ids
    memory = args.what == "memory"
    marks: dict = {}

    def at_embedding_grad(grad):  # every layer's backward is done; the embedding's weight gradient is next
        if memory and "base" in marks:
            marks["layers"] = _peak(device) - marks["base"]
            _reset_peak(device)

    model.get_input_embeddings().register_forward_hook(lambda m, a, out: (out.register_hook(at_embedding_grad), None)[1])

    def step(x) -> float:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        # only the loss is kept: an untiled model's output also holds the logits, which would otherwise stay
        # alive through the backward (a fourth vocabulary-wide vector per token that training code drops)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        marks["loss"] = loss.item()
        return elapsed

    try:
        step(warm_ids)  # measure.py's warm-up, at a short length (module docstring)
        model.zero_grad(set_to_none=True)
        marks["base"] = _reset_peak(device)
        before = {}
        if args.impl.startswith("fxtile"):
            from fxtile.testing import shard_counts

            before = {p: (c.forward_calls, c.forward_shards) for p, c in shard_counts(model).items()}
        elapsed = step(ids)
        total = _peak(device) - marks["base"]
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, MemoryError) and "memory" not in text.lower():
            raise
        tried = re.search(r"tried to allocate \d+ bytes", text)
        return {"oom": f"{type(exc).__name__}: " + (tried.group(0) if tried else text.splitlines()[0][:100] if text else "")}
    result = {"time": elapsed, "loss": marks["loss"]}
    if memory:
        # after the reset at the hook, the step's final high-water mark is the embedding part's peak
        result.update(layers=marks["layers"], embedding=total, peak=max(marks["layers"], total))
        params = {id(p): p for p in model.parameters()}.values()
        result["weights"] = sum(p.numel() * p.element_size() for p in params)
        result["grad_norm"] = math.sqrt(sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float32)) ** 2
                                            for p in params if p.grad is not None))
        result["shards"] = _shards(args.impl, model, args.seq, before)
    return result


# ----------------------------------------------------------------------------------------- analysis


def breakdown(layers: int, dtype: str) -> list[tuple[str, str, float, bool]]:
    """The tensors that grow with the tokens and are alive at fxtile-loss's layers+loss peak, per token.

    Where the peak is: in the backward of the recomputed layer, while the tiled MLP recomputes its
    shards (its input gradient being filled) and the whole attention block's saved tensors are still
    alive. Which layer: gradients are set to ``None`` before the step, so each layer's weight gradients
    (``P`` bytes) appear during its backward while the checkpointed inputs of the layers already done are
    freed; the peak is therefore in the last layer backwarded (layer 0, one checkpointed input alive)
    until ``(L-1) x T x H x bytes`` exceeds ``(L-1) x P``, i.e. up to ``T* = P / (H x bytes)`` tokens
    (about 15,400 for these shapes, whatever the dtype), and in the first one backwarded (all ``L``
    inputs alive) beyond. The MLP's shards (512 tokens) and the loss's shards (128 rows) do not grow
    with the tokens at these lengths: they are in the intercept, not here.

    Checked in fp32 against a count of live tensors (a ``TorchDispatchMode`` that follows every storage
    from creation to free, labelled by module) at 1024 and 2048 tokens: the same tensors are alive at
    the peak, 83,117 bytes per token against the 83,112 listed here.

    Returns (component, elements per token, bytes per token, alive below ``T*``). With bf16 weights the
    RMSNorms compute in fp32 and keep an fp32 copy of their input; the MLP's and the loss's shards
    would be constant either way.
    """
    c = _config(layers, 0)
    h, q, k, d = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.head_dim
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    b = BYTES[dtype]
    norm_in = 4  # RMSNorm's saved input: fp32 (the tensor itself in fp32, an fp32 copy in bf16)
    extra_norm_copy = dtype != "fp32"  # in bf16 input_layernorm keeps an fp32 copy besides the checkpoint
    rows = [
        ("checkpointed layer input (1 alive below T*, all L beyond)", f"{h} x (1 | {layers})", h * b, True),
        ("checkpointed inputs of the other layers (beyond T* only)", f"{h} x {layers - 1}", (layers - 1) * h * b, False),
        ("gradient of the layer's output (incoming)", f"{h}", h * b, True),
        ("tiled MLP's input-gradient buffer (filled shard by shard)", f"{h}", h * b, True),
        ("input_layernorm: normalized x and output (q/k/v's input)", f"2 x {h}"
         + (f" + fp32 copy of input {h}" if extra_norm_copy else ""), 2 * h * b + (h * 4 if extra_norm_copy else 0), True),
        ("q_proj output (saved by q_norm)", f"{q}", q * norm_in, True),
        ("q_norm normalized q", f"{q}", q * b, True),
        ("rotary q (saved by attention)", f"{q}", q * b, True),
        ("k_proj output (saved by k_norm)", f"{k}", k * norm_in, True),
        ("k_norm normalized k", f"{k}", k * b, True),
        ("rotary k (saved by attention)", f"{k}", k * b, True),
        ("v_proj output (saved by attention)", f"{k}", k * b, True),
        ("attention output (saved by o_proj and attention)", f"{q}", q * b, True),
        ("attention row statistics and RMSNorm rsqrt (fp32)", f"{nq} + {nq} + {nkv} + 2", (2 * nq + nkv + 2) * 4, True),
        ("residual after attention (post_attention_layernorm's input)", f"{h}", h * norm_in, True),
        ("post_attention_layernorm: normalized x and output (MLP input)", f"2 x {h}", 2 * h * b, True),
        ("rotary cos and sin (shared by every layer)", f"2 x {d}", 2 * d * b, True),
    ]
    return rows


def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of bytes against tokens; None with fewer than two lengths."""
    if len({t for t, _ in points}) < 2:
        return None
    n = len(points)
    mt, mb = sum(t for t, _ in points) / n, sum(b for _, b in points) / n
    slope = sum((t - mt) * (b - mb) for t, b in points) / sum((t - mt) ** 2 for t, _ in points)
    return mb - slope * mt, slope


def _longest(fits: list[tuple[float, float]], weights: float, budget: float) -> float | None:
    """Largest T with weights + max_i(a_i + b_i T) <= budget (None if even 0 tokens do not fit)."""
    limit = math.inf
    for a, b in fits:
        room = budget - weights - a
        if room < 0:
            return None
        if b > 0:
            limit = min(limit, room / b)
    return limit


def _run(impl: str, seq: int, what: str, args: argparse.Namespace) -> dict:
    cmd = [__file__, "--worker", impl, "--what", what, "--seq", str(seq), "--layers", str(args.layers),
           "--dtype", args.dtype, "--device", args.device, "--mem-gb", str(args.mem_gb),
           "--warmup-seq", str(args.warmup_seq)]
    try:
        return run_fresh(cmd, what == "memory", args.device)
    except subprocess.CalledProcessError as exc:  # killed (the kernel's OOM killer) or a crash: never the table
        lines = (exc.stderr or "").strip().splitlines()
        if exc.returncode < 0 or any("MemoryError" in line or "can't allocate" in line for line in lines[-5:]):
            return {"oom": f"worker exited with {exc.returncode}: {lines[-1][:100] if lines else ''}"}
        return {"error": f"worker exited with {exc.returncode}: {lines[-1][:160] if lines else ''}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 1536, 2048], help="sequence lengths (batch 1)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-0.6B has 28)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per implementation and length")
    parser.add_argument("--budget-gib", type=float, default=16.0, help="memory budget for the longest-sequence column")
    parser.add_argument("--mem-gb", type=float, default=18.0, help="address-space cap per CPU worker (0: none)")
    parser.add_argument("--warmup-seq", type=int, default=256, help="tokens of the warm-up step (0: the measured length)")
    parser.add_argument("--no-time", action="store_true", help="measure memory only")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=("memory", "time"), default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda":
        args.mem_gb = 0.0  # the address-space cap is for host memory; CUDA reports its own out-of-memory
    if args.worker:
        args.impl, args.seq = args.worker, args.seq[0]
        print(json.dumps(worker(args)))
        return

    impls = tuple(args.impls.split(","))
    seqs = sorted(set(args.seq))
    runs: dict[tuple[str, int], list[dict]] = {(i, s): [] for i in impls for s in seqs}
    started = time.perf_counter()
    for r in range(args.rounds):
        for s in seqs:
            for impl in impls if r % 2 == 0 else impls[::-1]:  # alternate so drift hits every impl alike
                mem = _run(impl, s, "memory", args)
                mem.pop("time", None)  # a step under the memory process's allocator setting: not the time
                if "oom" not in mem and "error" not in mem and not args.no_time:
                    mem["time"] = _run(impl, s, "time", args).get("time", math.nan)
                runs[impl, s].append(mem)
                print(f"[{time.perf_counter() - started:6.0f} s] {impl} S={s}: "
                      + (mem.get("oom") or mem.get("error")
                         or f"peak {mem['peak'] / MIB:.0f} MiB, {mem.get('time', math.nan):.1f} s"),
                      file=sys.stderr, flush=True)
    _report(args, impls, seqs, runs, time.perf_counter() - started)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _report(args, impls, seqs, runs, elapsed) -> None:
    ok = {k: [r for r in v if "peak" in r] for k, v in runs.items()}
    weights = next((rows[0]["weights"] for rows in ok.values() if rows), 0)
    b = BYTES[args.dtype]
    print(f"Qwen3-0.6B-shaped model, {args.layers} layers (hidden 1024, intermediate 3072, 16/8 heads of 128, vocabulary "
          f"151936, tied), activation checkpointing, batch 1, {args.dtype} on {args.device}; "
          f"weights {weights / MIB:.0f} MiB; median of {args.rounds} fresh process(es) per cell; {elapsed / 60:.1f} min\n")

    print("| impl | tokens | peak above weights (MiB) | layers+loss (MiB) | embedding (MiB) | time (s) | tokens/s "
          "| shards MLP / loss | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for impl in impls:
        for s in seqs:
            rows = ok[impl, s]
            if not rows:
                failed = runs[impl, s][0] if runs[impl, s] else {}
                cap = f" under the {args.mem_gb:g} GiB cap" if args.mem_gb else ""
                what = (f"out of memory{cap} ({failed['oom']})" if "oom" in failed
                        else f"failed ({failed.get('error', 'no result')})")
                print(f"| {impl} | {s} | {what} | | | | | | | |")
                continue
            t = statistics.median(r.get("time", math.nan) for r in rows)
            sh = rows[0].get("shards", {})
            shards = f"{sh.get('mlp', 1)} / {sh.get('loss', 1)}"
            if sh.get("untiled_calls"):
                shards += f" ({sh['untiled_calls']} untiled calls)"
            print(f"| {impl} | {s} | {_median(rows, 'peak') / MIB:.0f} | {_median(rows, 'layers') / MIB:.0f} | "
                  f"{_median(rows, 'embedding') / MIB:.0f} | "
                  + ("- | - |" if math.isnan(t) else f"{t:.1f} | {s / t:.0f} |") + f" {shards} | {rows[0]['loss']:.6f} | "
                  f"{rows[0]['grad_norm']:.6g} |")

    for impl in impls:  # the same step must give the same gradients: say so where it does not
        both = [s for s in seqs if ok[impl, s] and ok.get(("untiled", s))]
        if impl == "untiled" or not both:
            continue
        got, ref = ok[impl, both[0]][0]["grad_norm"], ok["untiled", both[0]][0]["grad_norm"]
        if abs(got / ref - 1) > 1e-3:
            why = (" Arctic Training's loss divides the summed loss by the labelled tokens after TiledFusedLogitsLoss, "
                   "whose weight gradients were computed in its forward for an upstream gradient of 1, so the head "
                   "weight's gradient is that of the sum (tokens times too large); memory and time are not affected."
                   if impl == "deepspeed" else "")
            print(f"\nNote: {impl}'s gradient norm differs from untiled's ({got:.6g} against {ref:.6g} at {both[0]} "
                  f"tokens).{why}")
    print(f"\nPer token: slope of the layers+loss peak over the lengths that fit; longest sequence whose weights + "
          f"step peak fit in {args.budget_gib:g} GiB, from the linear fits of both parts, extrapolated:\n")
    print("| impl | bytes per token (KiB, = MiB per 1K tokens) | x untiled | intercept (MiB) "
          "| embedding part (MiB, at the longest) | "
          f"longest sequence in {args.budget_gib:g} GiB (extrapolated) |")
    print("|---|---|---|---|---|---|")
    slopes, fits = {}, {}
    for impl in impls:
        layer_pts = [(s, r["layers"]) for s in seqs for r in ok[impl, s]]
        emb_pts = [(s, r["embedding"]) for s in seqs for r in ok[impl, s]]
        fit, efit = _fit(layer_pts), _fit(emb_pts)
        if fit is None or efit is None:
            print(f"| {impl} | needs two lengths that fit | | | | |")
            continue
        slopes[impl], fits[impl] = fit[1], (fit, efit)
        longest = _longest([fit, efit], weights, args.budget_gib * GIB)
        ratio = f"{fit[1] / slopes['untiled']:.3f}" if "untiled" in slopes else "-"
        last = max(s for s, _ in emb_pts)
        print(f"| {impl} | {fit[1] / 1024:.1f} | {ratio} | {round(fit[0] / MIB)} | "
              f"{statistics.median(v for s, v in emb_pts if s == last) / MIB:.0f} | "
              + ("does not fit" if longest is None else f"{longest / 1024:.0f}K tokens") + " |")

    if "deepspeed" in slopes:
        print("\ndeepspeed: its loss shards hold up to 1 GiB of fp32 logits each (Arctic Training's rule), so its peak "
              "does not grow linearly with the tokens: its slope and extrapolation are indicative only.")

    if "fxtile-loss" in slopes:
        rows = breakdown(args.layers, args.dtype)
        below = sum(r[2] for r in rows if r[3])
        cfg = _config(args.layers, 0)
        per_layer = sum(p for p in (cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
                                    cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size,
                                    3 * cfg.hidden_size * cfg.intermediate_size, 2 * cfg.hidden_size, 2 * cfg.head_dim))
        t_star = per_layer * b / (cfg.hidden_size * b)
        measured = slopes["fxtile-loss"]
        print(f"\nWhat fxtile-loss's {measured:.0f} bytes per token are made of (expected from the config; the peak is in the "
              f"backward of layer 0 below T* = {t_star / 1024:.1f}K tokens, see `breakdown`):\n")
        print("| component | elements per token | expected bytes per token | share |")
        print("|---|---|---|---|")
        for name, elems, nbytes, alive in rows:
            if alive:
                print(f"| {name} | {elems} | {nbytes:.0f} | {nbytes / below:.1%} |")
        groups = {"checkpointed input and gradient stream": (0, 2, 3), "attention working set": range(5, 14),
                  "the two RMSNorms and the residual": (4, 14, 15), "rotary tables": (16,)}
        shares = ", ".join(f"{g} {sum(rows[i][2] for i in idx) / below:.0%}" for g, idx in groups.items())
        print(f"| **expected floor below T\\*** | | **{below:.0f}** | {shares} |")
        print(f"| **measured slope** | | **{measured:.0f}** | residual {measured - below:+.0f} B/token "
              f"({(measured - below) / below:+.1%}) |")
        beyond = below + rows[1][2]
        print(f"| beyond T\\*: + the other {args.layers - 1} layers' checkpointed inputs | {rows[1][1]} | {beyond:.0f} | |")
        (a, slope), efit = fits["fxtile-loss"]
        straight = _longest([(a, slope), efit], weights, args.budget_gib * GIB)
        if straight is not None and straight > t_star:  # the fit's line bends at T*: say what the budget holds
            bent = (a - rows[1][2] * t_star, slope + rows[1][2])
            corrected = _longest([bent, efit], weights, args.budget_gib * GIB)
            print(f"\nThe straight fit's {straight / 1024:.0f}K tokens in {args.budget_gib:g} GiB lie beyond T*: there the "
                  f"layers+loss peak grows by {slope + rows[1][2]:.0f} B/token (the measured slope plus the other layers' "
                  f"inputs), so the budget holds about {corrected / 1024:.0f}K tokens.")


if __name__ == "__main__":
    main()

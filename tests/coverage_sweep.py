"""Coverage sweep: tile every causal LM that the installed transformers registers, with no registry.

Run ``python tests/coverage_sweep.py`` to print the table (``--help`` for options). For each entry of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` it builds the model from its own config class with tiny sizes
(composite configs: every sub-config is shrunk; MoE and MLA fields too), tiles a deep copy with
``fxtile.transform(copy, shards=4)``, and on a batch of 2 x 7 tokens compares the logits (plus the MoE
aux loss where the model has one) and every parameter's gradient with the untouched model.

The coverage oracle does not come from fxtile's matcher. A decoder layer counts as tiled when the
tiled regions read every parameter of that layer that belongs to its feed-forward compute, which the
sweep recognizes by *shape*: a dimension equal to one of the config's feed-forward widths (the tiny
sizes make those widths unique: no attention projection has them) or a stacked 3-D expert tensor.

Each architecture runs in its own process, forked from a parent that imported torch and transformers
once, with an address-space cap and a timeout, at most ``--workers`` at a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from a checkout; an installed fxtile works as well
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import fxtile  # noqa: E402

__all__ = ["Result", "architectures", "check", "format_table", "sweep", "tiny_config"]

SHARDS = 4
BATCH, SEQ = 2, 7  # odd length: 14 rows in shards of 3, 3, 4, 4
VOCAB = 100
HIDDEN = 32
# Feed-forward widths, all distinct from every attention width (32 = 4 heads x 8, 16 = 2 kv heads x 8).
FFN_WIDTHS = {"intermediate_size": 72, "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56}
EXPERTS = 4
RTOL, ATOL = 1e-4, 1e-5  # fp32; ATOL is scaled by each tensor's magnitude (see _compare)

# Tiny values by config field name (set only where the config class has the field).
_TINY = {
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "model_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "hidden_dim": HIDDEN,
    "intermediate_size": FFN_WIDTHS["intermediate_size"], "n_inner": FFN_WIDTHS["intermediate_size"],
    "ffn_dim": FFN_WIDTHS["intermediate_size"], "d_ff": FFN_WIDTHS["intermediate_size"],
    "ffn_hidden_size": FFN_WIDTHS["intermediate_size"], "inner_hidden_size": FFN_WIDTHS["intermediate_size"],
    "moe_intermediate_size": FFN_WIDTHS["moe_intermediate_size"], "expert_intermediate_size": FFN_WIDTHS["moe_intermediate_size"],
    "shared_expert_intermediate_size": FFN_WIDTHS["shared_expert_intermediate_size"],
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_dim": 8,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "seq_length": 64,
    # MoE: 4 experts, top-2, one shared expert, a dense first layer then MoE
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k": 2, "moe_k": 2, "num_experts_per_token": 2, "moe_num_shared_experts": 1,
    "zero_expert_num": 2, "expert_ffn_hidden_size": FFN_WIDTHS["moe_intermediate_size"],
    "n_shared_experts": 1, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "decoder_sparse_step": 1,
    # MLA
    # state-space mixers: widths consistent with 4 heads x 8
    "expand": 1, "mamba_expand": 1, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_ssm": 32,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "num_nextn_predict_layers": 0, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4, "rotary_dim": 8, "vocab_size_per_layer_input": VOCAB,
}


def architectures() -> dict[str, str]:
    """model_type -> causal-LM class name, exactly as the installed transformers registers them."""
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(values: dict, default_layers: Optional[int]) -> dict:
    out = {}
    for key, value in values.items():
        if key in _TINY and isinstance(value, int) and not isinstance(value, bool):
            out[key] = _TINY[key]
        elif key in ("head_dim", "num_key_value_heads", "num_experts_per_tok") and value is None:
            out[key] = _TINY[key]  # derived from other fields when unset; set it to keep the sizes consistent
        elif "dropout" in key or "pdrop" in key:
            out[key] = 0.0 if isinstance(value, float) else value
        elif isinstance(value, list) and default_layers and len(value) == default_layers and default_layers > 2:
            other = next((v for v in value if v != value[0]), value[-1])
            out[key] = [value[0], other]  # per-layer lists (layer_types, ...): the first kind and another one
        elif key == "hybrid_layer_ids" and isinstance(value, list):
            out[key] = [1]  # Zamba2: the shared transformer block (with the MLP) on the second layer
        elif isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value, _layers(value))
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1
    if "kv_lora_rank" in values and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)  # MLA: one latent KV per head
    if "output_router_logits" in values:
        out["output_router_logits"] = True  # the aux loss joins the checked output: router grads must survive
    return out


def _layers(values: dict) -> Optional[int]:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        if isinstance(values.get(key), int):
            return values[key]
    return None


def tiny_config(model_type: str):
    """The config class's defaults with every size field shrunk (sub-configs too).

    The class is the causal-LM class's own ``config_class`` where it differs from the registered one
    (``Llama4ForCausalLM`` takes ``Llama4TextConfig``, not ``Llama4Config``). A config whose validation
    refuses top-2 routing is built with top-1.
    """
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[model_type]
    default = cls().to_dict()
    kwargs = _shrink(default, _layers(default))
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001
        if "num_experts_per_tok" not in str(exc) or "num_experts_per_tok" not in kwargs:
            raise
        return cls(**{**kwargs, "num_experts_per_tok": 1})


def ffn_widths(config) -> set[int]:
    """The feed-forward widths of the built config (what the sweep calls feed-forward parameters)."""
    text = config.get_text_config()
    widths = set()
    for key in _TINY:
        if key in FFN_WIDTHS.keys() | {"n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "inner_hidden_size", "expert_ffn_hidden_size",
                                        "expert_intermediate_size"}:
            value = getattr(text, key, None)
            if isinstance(value, int) and value not in (HIDDEN, 0):
                widths.add(value)
    return widths or {4 * HIDDEN}  # no width field: the conventional 4 x hidden (BLOOM, MPT, ...)


@dataclass
class Result:
    arch: str
    cls: str
    status: str  # tiled | partial | untiled | no-ffn | mismatch | build-failed | run-failed | transform-failed | crashed | timeout
    layers: int = 0
    tiled_layers: int = 0
    patterns: list = field(default_factory=list)  # per decoder layer: sorted patterns found in it
    max_error: Optional[float] = None
    detail: str = ""
    seconds: float = 0.0


def _decoder_layers(model) -> list:
    """The ModuleList holding the most parameters (the decoder stack, whatever it is called)."""
    best, best_size = None, -1
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return list(best) if best is not None else []


def _tiled_tensors(model) -> tuple[set[int], dict[int, list[str]]]:
    """ids of every tensor read by a tiled region, and the patterns tiled inside each module (by id)."""
    read, patterns = set(), {}
    for module in model.modules():
        state = module.__dict__.get("_fxtile")
        if state is None:
            continue
        spec = state.specialized
        graphs = [g for g in spec.cache.values() if g is not None] if spec is not None else [state.graph_module]
        for gm in graphs:  # a block traced per call: the graphs of the calls made so far
            root = gm if spec is not None else module
            for node in gm.graph.nodes:
                if isinstance(node.target, fxtile.op.TiledRegion):
                    read.update(id(root.get_parameter(p)) for p in node.target.tensor_paths if _is_param(root, p))
        patterns[id(module)] = [m.pattern for m in state.matches]
    return read, patterns


def _is_param(module, path: str) -> bool:
    try:
        module.get_parameter(path)
        return True
    except AttributeError:
        return False


def _ffn_parameters(layer, widths: set[int]) -> list:
    """The layer's feed-forward parameters, by shape: stacked expert tensors ([E, ., .], E = the
    configured expert count) and matrices with a feed-forward width (1-D norm scales and biases are
    left out: attention norms can share a width with the feed-forward), except inside a sequence mixer
    (a module holding a convolution over the sequence: Mamba/SSM/short-conv blocks, whose widths may
    coincide with ``intermediate_size`` but which are not feed-forward and mix tokens)."""
    mixers = [m for m in layer.modules() if any(isinstance(c, torch.nn.Conv1d) for c in m.children())]
    mixer_params = {id(p) for m in mixers for p in m.parameters()}
    return [(n, p) for n, p in layer.named_parameters() if id(p) not in mixer_params and (
        (p.dim() == 3 and p.shape[0] == EXPERTS) or (p.dim() == 2 and any(s in widths for s in p.shape)))]


def _layer_coverage(model, layers: list, widths: set[int]) -> tuple[int, int, list, str]:
    """(layers tiled, layers without feed-forward parameters, patterns per layer, what is missing)."""
    read, patterns = _tiled_tensors(model)
    tiled, no_ffn, per_layer, missing_all = 0, 0, [], []
    for index, layer in enumerate(layers):
        found = sorted(p for m in layer.modules() for p in patterns.get(id(m), []))
        per_layer.append(found)
        ffn = _ffn_parameters(layer, widths)
        missing = [n for n, p in ffn if id(p) not in read]
        if not ffn and not found:
            no_ffn += 1
        elif found and not missing:
            tiled += 1
        elif missing:
            missing_all.append(f"layer {index}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} not tiled")
        else:
            missing_all.append(f"layer {index}: nothing tiled")
    return tiled, no_ffn, per_layer, "; ".join(missing_all)


def _inputs(model):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)


def _loss_terms(out) -> list:
    terms = [out.logits]
    aux = getattr(out, "aux_loss", None)
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        terms.append(aux.reshape(1))
    return terms


def _forward_backward(model, ids):
    out = model(input_ids=ids, use_cache=False)
    terms = _loss_terms(out)
    gen = torch.Generator().manual_seed(2)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in terms)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [t.detach() for t in terms], grads


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[bool, float]:
    """allclose with ATOL scaled by the tensor's magnitude; returns (ok, max abs error / magnitude)."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    ok = torch.allclose(got, ref, rtol=RTOL, atol=ATOL * scale)
    return ok, err / scale


def check(model_type: str) -> Result:
    """Build, tile and compare one architecture (meant to run in its own process)."""
    start = time.time()
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    result = Result(model_type, cls_name, "build-failed")
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(config).float().eval()
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        result.detail = _reason(exc)
        return _done(result, start)
    layers = _decoder_layers(model)
    result.layers = len(layers)
    ids = _inputs(model)
    try:
        ref_terms, ref_grads = _forward_backward(model, ids)
    except Exception as exc:  # noqa: BLE001
        result.status, result.detail = "run-failed", _reason(exc)
        return _done(result, start)
    model.zero_grad(set_to_none=True)
    try:
        try:
            tiled = copy.deepcopy(model)
        except RuntimeError:  # a model holding non-leaf tensors cannot be deep-copied: build it again
            torch.manual_seed(0)
            tiled = getattr(transformers, cls_name)(config).float().eval()
            tiled.load_state_dict(model.state_dict())
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fxtile.transform(tiled, shards=SHARDS)
        got_terms, got_grads = _forward_backward(tiled, ids)
    except Exception as exc:  # noqa: BLE001
        result.status, result.detail = "transform-failed", _reason(exc, tb=True)
        return _done(result, start)
    result.tiled_layers, no_ffn, result.patterns, missing = _layer_coverage(tiled, _decoder_layers(tiled), ffn_widths(config))
    worst, bad = 0.0, []
    for i, (a, b) in enumerate(zip(ref_terms, got_terms)):
        ok, err = _compare(a, b)
        worst = max(worst, err)
        if not ok:
            bad.append("logits" if i == 0 else "aux_loss")
    for name, g in ref_grads.items():
        h = got_grads[name]
        if (g is None) != (h is None):
            bad.append(f"grad of {name} {'lost' if h is None else 'appeared'}")
            continue
        if g is not None:
            ok, err = _compare(g, h)
            worst = max(worst, err)
            if not ok:
                bad.append(f"grad of {name}")
    result.max_error = worst
    skipped = fxtile.find(tiled).skipped
    if bad:
        result.status, result.detail = "mismatch", ", ".join(bad[:5])
    elif result.layers and no_ffn == result.layers:
        result.status, result.detail = "no-ffn", "no decoder layer has feed-forward parameters (sequence mixers only)"
    elif result.layers and result.tiled_layers + no_ffn == result.layers:
        result.status = "tiled"
        if no_ffn:
            result.detail = f"{no_ffn} layer(s) without feed-forward parameters"
    else:
        result.status = "partial" if result.tiled_layers else "untiled"
        why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:2])
        result.detail = missing + (f" | skipped {why}" if why else "")
    return _done(result, start)


def _done(result: Result, start: float) -> Result:
    result.seconds = round(time.time() - start, 2)
    return result


def _reason(exc: BaseException, tb: bool = False) -> str:
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    if tb:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            text += f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})"
    return text


# ---------------------------------------------------------------------------------------------
# Process pool: fork per architecture (imports are inherited), cap memory, time out.


def _child(model_type: str, write_fd: int, mem_bytes: int) -> None:
    try:
        soft = _vm_size() + mem_bytes
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
        torch.set_num_threads(1)
        result = check(model_type)
    except BaseException as exc:  # noqa: BLE001 - MemoryError and friends become a row
        result = Result(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "crashed", detail=_reason(exc))
    with os.fdopen(write_fd, "w") as pipe:
        pipe.write(json.dumps(asdict(result)))


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def sweep(archs: list[str], workers: int = 2, timeout: float = 120.0, mem_gb: float = 3.0,
          progress: bool = False) -> list[Result]:
    """Run :func:`check` for each architecture in a forked child, ``workers`` at a time."""
    pending = list(archs)
    running: dict[int, tuple[str, int, float]] = {}  # pid -> (arch, read fd, start)
    results: dict[str, Result] = {}
    while pending or running:
        while pending and len(running) < workers:
            arch = pending.pop(0)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(read_fd)
                code = 0
                try:
                    _child(arch, write_fd, int(mem_gb * 2**30))
                except BaseException:  # noqa: BLE001
                    code = 1
                os._exit(code)
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            running[pid] = (arch, read_fd, time.time(), [])
        time.sleep(0.05)
        for pid, (arch, read_fd, start, chunks) in list(running.items()):
            try:
                while chunk := os.read(read_fd, 1 << 16):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.time() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[arch] = Result(arch, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch], "timeout",
                                       detail=f"no result within {timeout:.0f} s", seconds=round(timeout, 1))
            elif done == 0:
                continue
            else:
                try:
                    while chunk := os.read(read_fd, 1 << 16):
                        chunks.append(chunk)
                except BlockingIOError:
                    pass
                raw = b"".join(chunks)
                if raw:
                    results[arch] = Result(**json.loads(raw))
                else:
                    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
                    results[arch] = Result(arch, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch], "crashed",
                                           detail=f"worker died ({how}; memory cap or native crash)")
            os.close(read_fd)
            del running[pid]
            if progress:
                r = results[arch]
                print(f"[{len(results)}/{len(archs)}] {arch}: {r.status} {r.detail[:120]}", file=sys.stderr, flush=True)
    return [results[a] for a in archs]


def summary(results: list[Result]) -> dict:
    built = [r for r in results if r.status not in ("build-failed", "run-failed", "no-ffn")]
    tiled = [r for r in built if r.status == "tiled"]
    return {"registered": len(results), "built": len(built), "tiled_every_layer_exact": len(tiled),
            "percent": round(100.0 * len(tiled) / max(1, len(built)), 1)}


def format_table(results: list[Result]) -> str:
    rows = ["| architecture | class | patterns per layer | status | max error | note |", "|---|---|---|---|---|---|"]
    for r in results:
        pats = "; ".join("+".join(p) or "-" for p in r.patterns) if r.patterns else ""
        err = f"{r.max_error:.1e}" if r.max_error is not None else ""
        status = r.status if r.status != "tiled" else f"tiled {r.tiled_layers}/{r.layers}"
        if r.status == "partial":
            status = f"partial {r.tiled_layers}/{r.layers}"
        rows.append(f"| {r.arch} | {r.cls} | {pats} | {status} | {err} | {r.detail.replace('|', '/')[:150]} |")
    s = summary(results)
    rows.append("")
    rows.append(f"{s['registered']} registered, {s['built']} build and run from a tiny config and have feed-forward layers, "
                f"{s['tiled_every_layer_exact']} tiled in every layer with exact logits and gradients "
                f"({s['percent']}% of those that build).")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="model types (default: every registered causal LM)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--mem-gb", type=float, default=3.0, help="address-space cap per worker, on top of the imports")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    archs = args.archs or list(architectures())
    start = time.time()
    results = sweep(archs, args.workers, args.timeout, args.mem_gb, progress=True)
    print(format_table(results))
    print(f"\nsweep time: {time.time() - start:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

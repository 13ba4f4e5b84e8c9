"""``fxtile convert MODEL``: what fxtile would tile in a model, whether it stays exact, and what it saves.

Why a command: before a long-context run a user wants three answers without writing code or loading
70B of weights. So the model is built on the **meta device** from its config (no weights allocated),
``fxtile.transform`` plans it, :mod:`fxtile.estimate` replays each MLP on meta at the requested
tokens, and exactness is checked on a tiny random model of the same architecture (the config,
shrunk), in float64 so any difference is a real error and not rounding.

Exit codes: 0 when at least one MLP is tiled and the check passes; 1 when nothing was tiled or the
check failed (the message says why); 2 for bad arguments or a model that cannot be read (one line,
no traceback).

Stable: :func:`main` (the ``fxtile`` console script and ``python -m fxtile``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__
from .api import Matches, find, transform
from .estimate import MlpMemory, mlp_memory, total_peak
from .policy import as_policy

__all__ = ["main"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

DEFINITION = (
    "MLP activation memory = bytes an MLP layer adds in training at batch x seq tokens and --dtype: what "
    "autograd keeps from its forward until its backward, plus the peak working memory of its forward and "
    "backward (for the tiled op: the recomputed shards, the input gradient, fp32 weight-gradient sums for "
    "bf16/fp16). Not counted (the same with or without tiling): weights, their .grad, the MLP's input, output "
    "and output gradient. Computed by replaying each MLP on the meta device; the total is the highest point "
    "over the backward pass (every earlier layer still keeps its share)."
)


class UsageError(Exception):
    """A bad argument or an unreadable model: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _shards(text: str) -> object:
    if text == "auto":
        return "auto"
    try:
        return as_policy(int(text)).shards
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxtile", description="Tile transformer MLPs over tokens, found by graph shape.")
    parser.add_argument("--version", action="version", version=f"fxtile {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    convert = commands.add_parser(
        "convert", help="plan tiling for a model, check it is exact, estimate the memory saved",
        description="Plan fxtile for MODEL on the meta device (no weights loaded), check outputs and gradients "
        "on a tiny random model of the same architecture, and estimate the MLP activation memory at SEQ_LEN. "
        + DEFINITION,
    )
    convert.add_argument("model", metavar="MODEL",
                         help="a local Hugging Face model directory (with config.json) or a transformers model type "
                              "(llama, qwen2, gpt2, ...: that architecture's default config)")
    convert.add_argument("--seq-len", type=_positive_int("--seq-len"), default=32768, help="tokens per sequence (default 32768)")
    convert.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1, help="sequences per step (default 1)")
    convert.add_argument("--shards", type=_shards, default="auto", help="'auto' (fxtile.ShardPolicy()) or a fixed count (default auto)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="training dtype for the estimate (default bf16)")
    convert.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH ('-': JSON on stdout, the report on stderr)")
    convert.add_argument("--no-verify", action="store_true", help="skip the exactness check on a tiny random model")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow a model directory's own modeling code (transformers' trust_remote_code)")
    return parser


# ---------------------------------------------------------------------------------------------
# Loading


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("fxtile convert needs transformers: pip install 'fxtile[hf]'") from None
    transformers.logging.set_verbosity_error()  # config warnings are not the user's problem here
    return transformers


def load_config(model: str, trust_remote_code: bool = False):
    """The config for ``model``: a directory with ``config.json``, or a transformers model type."""
    T = _transformers()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(f"{model!r} is a directory without a config.json; pass a Hugging Face model directory")
        try:
            return T.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported in one line
            raise UsageError(f"cannot read {os.path.join(model, 'config.json')}: {_first_line(exc)}") from None
    if os.sep in model or model.startswith(".") or os.path.exists(model):
        raise UsageError(f"no such model directory: {model!r}")
    try:
        return T.AutoConfig.for_model(model)
    except ValueError:
        raise UsageError(
            f"{model!r} is neither a model directory nor a transformers model type (e.g. llama, qwen2, gpt2, mistral)"
        ) from None


def build_model(config, device: str | torch.device, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM for ``config`` (or the base model where there is no causal-LM head) on ``device``."""
    T = _transformers()
    with torch.device(device):
        for auto in (T.AutoModelForCausalLM, T.AutoModel):
            try:
                return auto.from_config(config, trust_remote_code=trust_remote_code)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
    raise UsageError(f"transformers has no model class for {type(config).__name__}")


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# Verification on a tiny random model of the same architecture

_SMALL = {  # field -> value in the tiny config (only fields the config has are touched)
    "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 88, "n_inner": 88, "ffn_dim": 88,
    "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56,
    "num_attention_heads": 4, "n_head": 4, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "vocab_size": 128,
}


def shrink_config(config):
    """A copy of ``config`` small enough to run in float64 in a second, with the same architecture.

    Every (sub-)config keeps its model type and code path; only sizes change: 2 layers, hidden 64,
    4 heads of 16, kv heads 4, 2 or 1 (keeping MHA, GQA or MQA), intermediate 88, a 128-token
    vocabulary, at most 4 experts, and per-layer lists cut to 2 layers.
    """
    small = copy.deepcopy(config)
    for cfg in _configs(small):
        layers = getattr(cfg, "num_hidden_layers", None)
        heads = getattr(cfg, "num_attention_heads", None)
        kv = getattr(cfg, "num_key_value_heads", None)
        head_dim, rope_dim = getattr(cfg, "head_dim", None), getattr(cfg, "qk_rope_head_dim", None)
        for name, value in _SMALL.items():
            if isinstance(getattr(cfg, name, None), int) and not isinstance(getattr(cfg, name), bool):
                setattr(cfg, name, value)
        if isinstance(getattr(cfg, "qk_rope_head_dim", None), int):  # MLA: derived head sizes follow
            if head_dim == rope_dim:
                cfg.head_dim = cfg.qk_rope_head_dim
            if hasattr(cfg, "qk_head_dim"):
                cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if isinstance(kv, int) and isinstance(heads, int):
            cfg.num_key_value_heads = 4 if kv >= heads else (1 if kv == 1 else 2)
        if isinstance(layers, int):
            dense = getattr(cfg, "first_k_dense_replace", None)  # keep one dense and one MoE layer
            if isinstance(dense, int) and dense > 0:
                cfg.first_k_dense_replace = 1
            cfg.num_hidden_layers = 2
            for name, value in list(vars(cfg).items()):
                if isinstance(value, list) and len(value) == layers:
                    setattr(cfg, name, value[:2])
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value >= _SMALL["vocab_size"]:
                setattr(cfg, name, 0 if name == "pad_token_id" else None)
    return small


def _configs(config) -> list:
    """``config`` and its sub-configs (text, vision, ...), which composite models keep as attributes."""
    found, stack = [], [config]
    while stack:
        cfg = stack.pop()
        if any(cfg is c for c in found):
            continue
        found.append(cfg)
        stack += [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return found


@dataclass(frozen=True)
class Verification:
    passed: bool
    reason: str  # why it failed, or what was checked
    max_abs_diff: Optional[float] = None
    tiled: int = 0
    seconds: float = 0.0


def _logits(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


def verify(config, trust_remote_code: bool = False, shards: int = 3, batch: int = 2, seq: int = 13) -> Verification:
    """Compare a tiny random model with its tiled copy: outputs and every parameter gradient.

    ``batch x seq`` rows (an odd count) in ``shards`` shards, so the tiled op really runs in uneven
    shards. Eval mode (no dropout: the shards draw different masks than one full call, by design).
    float64 with ``rtol=1e-9, atol=1e-12`` (room for the shard sums' reordering only); float32 with
    ``rtol=1e-4, atol=1e-6`` where the architecture has no float64 kernels on CPU (grouped MoE matmuls).
    """
    start = time.perf_counter()
    result = None
    for dtype, rtol, atol in ((torch.float64, 1e-9, 1e-12), (torch.float32, 1e-4, 1e-6)):
        result = _compare(config, trust_remote_code, shards, batch, seq, dtype, rtol, atol)
        if result.passed or not result.reason.startswith("the tiny model did not run"):
            break
    return Verification(result.passed, result.reason, result.max_abs_diff, result.tiled, time.perf_counter() - start)


def _compare(config, trust_remote_code: bool, shards: int, batch: int, seq: int, dtype: torch.dtype,
             rtol: float, atol: float) -> Verification:
    try:
        torch.manual_seed(0)
        reference = build_model(shrink_config(config), "cpu", trust_remote_code).to(dtype).eval()
    except Exception as exc:  # noqa: BLE001
        return Verification(False, f"could not build a tiny model of this architecture: {_first_line(exc)}")
    tiled = copy.deepcopy(reference)
    transform(tiled, shards=shards)
    count = sum(m.tiled for m in find(tiled))
    if count == 0:
        return Verification(False, "the tiny model of this architecture has no MLP fxtile can tile")
    vocab = getattr(reference.config.get_text_config(), "vocab_size", None) or 128
    ids = torch.randint(0, vocab, (batch, seq))
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    try:
        outs = []
        for model in (reference, tiled):
            out = _logits(model(**inputs))
            torch.manual_seed(1)
            (out * torch.randn_like(out)).sum().backward()
            outs.append(out.detach())
    except Exception as exc:  # noqa: BLE001
        return Verification(False, f"the tiny model did not run forward and backward: {_first_line(exc)}", tiled=count)
    name = str(dtype).removeprefix("torch.")
    worst = (outs[0] - outs[1]).abs().max().item()
    if not torch.allclose(outs[1], outs[0], rtol=rtol, atol=atol):
        return Verification(False, f"outputs differ by up to {worst:.3g} ({name})", worst, count)
    checked = 0
    for (pname, p), q in zip(reference.named_parameters(), tiled.parameters()):
        if (p.grad is None) != (q.grad is None):
            return Verification(False, f"{pname}: only one of the two models has a gradient", worst, count)
        if p.grad is None:
            continue
        worst = max(worst, (p.grad - q.grad).abs().max().item())
        checked += 1
        if not torch.allclose(q.grad, p.grad, rtol=rtol, atol=atol):
            return Verification(False, f"gradient of {pname} differs by up to {worst:.3g} ({name})", worst, count)
    reason = f"{count} MLPs tiled in {shards} shards, outputs and {checked} parameter gradients equal ({name})"
    return Verification(True, reason, worst, count)


# ---------------------------------------------------------------------------------------------
# Report


def human(nbytes: float) -> str:
    """Bytes in binary units: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _roles(roles: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in roles.items())


def _table(matches: Matches, memory: dict[tuple[str, tuple[str, ...]], MlpMemory]) -> list[str]:
    rows = [("module", "pattern", "roles", "shards", "MLP activation memory")]
    for m in matches:
        mem = memory.get((m.path, m.nodes))
        shards = str(mem.shards) if mem else "-"
        cell = f"{human(mem.peak_before)} -> {human(mem.peak_after)}" if mem else ("not estimated" if m.tiled else "not tiled")
        rows.append((m.path or "(root)", m.pattern, _roles(m.roles), shards, cell))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]


def _plan_json(args, config, model: nn.Module, matches: Matches, memory, entries, verification) -> dict:
    before, after = total_peak(entries, tiled=False), total_peak(entries, tiled=True)
    modules = []
    for m in matches:
        mem = memory.get((m.path, m.nodes))
        modules.append({
            "path": m.path, "pattern": m.pattern, "roles": m.roles, "activation": m.activation,
            "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "tiled": m.tiled,
            "shards": mem.shards if mem else None,
            "activation_bytes_before": mem.peak_before if mem else None,
            "activation_bytes_after": mem.peak_after if mem else None,
            "kept_bytes_before": mem.kept_before if mem else None,
            "kept_bytes_after": mem.kept_after if mem else None,
            "weight_grad_workspace_bytes": mem.weight_grad_workspace if mem else None,
        })
    return {
        "model": args.model, "model_type": getattr(config, "model_type", None), "class": type(model).__name__,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": args.seq_len * args.batch_size,
        "dtype": args.dtype, "shards": args.shards, "definition": DEFINITION,
        "modules": modules,
        "skipped": [{"path": s.path, "reason": s.reason} for s in matches.skipped],
        "totals": {
            "mlps": len(matches), "tiled": sum(m.tiled for m in matches),
            "activation_bytes_before": before, "activation_bytes_after": after, "saved_bytes": before - after,
        },
        "verification": None if verification is None else {
            "passed": verification.passed, "detail": verification.reason,
            "max_abs_diff": verification.max_abs_diff, "seconds": round(verification.seconds, 2),
        },
    }


def convert(args: argparse.Namespace, out=None, err=None) -> int:
    """Run ``fxtile convert`` with parsed ``args``; prints the report and returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    json_out = out
    if args.json == "-":  # stdout is the JSON alone: the report goes to stderr
        out = err
    start = time.perf_counter()
    config = load_config(args.model, args.trust_remote_code)
    try:
        model = build_model(config, "meta", args.trust_remote_code)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot build {type(config).__name__} on the meta device: {_first_line(exc)}") from None
    tokens = args.seq_len * args.batch_size
    dtype = DTYPES[args.dtype]
    with warnings.catch_warnings():  # "found no MLP" is reported below, with the reasons
        warnings.simplefilter("ignore")
        transform(model, shards=args.shards)
    matches = find(model)
    entries = mlp_memory(model, tokens, dtype) if any(m.tiled for m in matches) else []
    memory = {(e.path, e.nodes): e for e in entries}
    planned = time.perf_counter() - start

    name = type(model).__name__
    print(f"fxtile convert {args.model}: {name}, planned on the meta device in {planned:.1f} s (no weights loaded)",
          file=out)
    print(f"batch {args.batch_size} x seq {args.seq_len} = {tokens} tokens, {args.dtype}, shards={args.shards}\n",
          file=out)
    if matches:
        print("\n".join(_table(matches, memory)), file=out)
    for skip in matches.skipped:
        print(f"not tiled: {skip.path or '(root)'}: {skip.reason}", file=out)

    verification = None
    code = 0
    if not entries:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in matches.skipped[:3])
        print(f"\nfxtile: nothing to tile in {name}" + (f" ({reasons})" if reasons else
              " (no block matched a gated or plain MLP pattern; MoE experts stored as fused 3-D weights are not matched)"), file=err)
        code = 1
    else:
        before, after = total_peak(entries, tiled=False), total_peak(entries, tiled=True)
        workspace = max(e.weight_grad_workspace for e in entries)
        print(f"\ntotal: {len(entries)} of {len(matches)} MLPs tiled; MLP activation memory at the backward peak "
              f"{human(before)} -> {human(after)} (saves {human(before - after)}, {100 * (before - after) / before:.0f}%)",
              file=out)
        if workspace:
            print(f"  after includes the tiled op's weight-gradient workspace, up to {human(workspace)} per layer", file=out)
        print(textwrap.fill(DEFINITION, 100, initial_indent="  ", subsequent_indent="  "), file=out)
        if args.no_verify:
            print("\nexactness: not checked (--no-verify)", file=out)
        else:
            print("\nchecking exactness on a tiny random model of the same architecture...", end="", file=err, flush=True)
            verification = verify(config, args.trust_remote_code)
            print(f" {'ok' if verification.passed else 'FAILED'} ({verification.seconds:.1f} s)", file=err, flush=True)
            if verification.passed:
                print(f"\nexactness: passed: {verification.reason}, max |diff| {verification.max_abs_diff:.1e}", file=out)
            else:
                print(f"\nfxtile: exactness check failed: {verification.reason}", file=err)
                code = 1
    if args.json:
        plan = _plan_json(args, config, model, matches, memory, entries, verification)
        plan["exit_code"] = code
        text = json.dumps(plan, indent=2)
        if args.json == "-":
            print(text, file=json_out)
        else:
            try:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
            except OSError as exc:
                raise UsageError(f"cannot write --json {args.json!r}: {exc.strerror}") from None
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxtile`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return convert(args)
    except UsageError as exc:
        print(f"fxtile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

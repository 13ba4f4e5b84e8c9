"""``fxtile convert MODEL``: what fxtile would tile in a model, whether it stays exact, and what it saves.

Why a command: before a long-context run a user wants three answers without writing code or loading
70B of weights. So the model is built on the **meta device** from its config (no weights allocated),
``fxtile.transform(model, loss=True)`` plans it (``--no-loss``: the MLPs only), :mod:`fxtile.estimate`
replays each region (every MLP, the output projection and its loss) on meta at the requested
tokens, and exactness is checked by :func:`fxtile.tiny.exactness` on a tiny random model of the same
architecture (the config, shrunk as the coverage sweep shrinks it): one training call as users make
it, in float64 so any difference is a real error and not rounding, and every tiled block must really
run tiled in it.

Exit codes: 0 when at least one region is tiled and the check passes; 1 when nothing was tiled or the
check failed (the message says why); 2 for bad arguments or a model that cannot be read (one line,
no traceback).

Stable: :func:`main` (the ``fxtile`` console script and ``python -m fxtile``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__, tiny
from .api import Matches, find, transform
from .estimate import MlpMemory, mlp_memory, total_peak
from .passes.experts import TOP_K_NAMES
from .policy import as_policy
from .tiny import exactness

__all__ = ["main"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

DEFINITION = (
    "activation memory = bytes a region (an MLP layer, or the output projection and its loss) adds in training "
    "at batch x seq tokens and --dtype: what autograd keeps from its forward until its backward, plus the peak "
    "working memory of its forward and backward (for the tiled ops: the recomputed shards, the input gradient, "
    "fp32 weight-gradient sums for bf16/fp16; for the loss, the logits of one shard and the gradients its "
    "forward computes). Not counted (the same with or without tiling): weights, their .grad, the region's "
    "input, output and output gradient. Computed by replaying each region on the meta device; the total is "
    "the highest point over the backward pass (every earlier layer still keeps its share)."
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
        "on a tiny random model of the same architecture, and estimate the activation memory of the MLPs and "
        "the loss head at SEQ_LEN. "
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
    convert.add_argument("--no-loss", action="store_true",
                         help="plan the MLPs only, not the output projection and its loss (fxtile.transform(loss=False))")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow a model directory's own modeling code (transformers' trust_remote_code)")
    step = convert.add_argument_group(
        "whole training step (fxtile.planner)",
        "with --device-memory: the peak of one training step per GPU (weights, gradients, optimizer states, "
        "activations measured on meta) untiled and with fxtile, and the longest sequence that fits")
    step.add_argument("--device-memory", metavar="SIZE", type=_memory_size,
                      help="one GPU's memory, e.g. 80GiB or 141GB: plan the whole step and the longest sequence")
    step.add_argument("--offload", action="store_true",
                      help="checkpointed layer inputs and optimizer states in host memory (as ALST does)")
    step.add_argument("--sp", type=_positive_int("--sp"), default=1,
                      help="Ulysses sequence-parallel degree: each rank holds seq/sp tokens (default 1)")
    step.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (default 0)")
    step.add_argument("--world", type=_positive_int("--world"), default=1, help="data-parallel ranks ZeRO shards over (default 1)")
    step.add_argument("--optimizer", choices=("adamw", "sgd", "none"), default="adamw", help="optimizer states (default adamw)")
    step.add_argument("--no-checkpointing", action="store_true", help="plan without activation checkpointing")
    return parser


def _memory_size(text: str) -> int:
    from .planner import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_memory_size.__name__ = "--device-memory"


def _step_report(args, model: nn.Module, base: nn.Module, out) -> dict:
    """The whole-step section of the report (``--device-memory``), and its JSON."""
    from .planner import plan_step

    plan = plan_step(base, args.seq_len, args.device_memory, batch=args.batch_size, sp=args.sp, offload=args.offload,
                     zero=args.zero, world=args.world, optimizer=args.optimizer,
                     checkpointing=not args.no_checkpointing, tiled=model)
    st = plan.states
    print(f"\nwhole training step per GPU at seq {args.seq_len} (--device-memory {human(args.device_memory)}):", file=out)
    print(f"  states: weights {human(st.weights)}, gradients {human(st.grads)}, optimizer {human(st.optimizer)}"
          + (f", gathered ZeRO-3 block {human(st.gathered)}" if st.gathered else "")
          + (f"; on the host: optimizer {human(st.host)}" if st.host else ""), file=out)
    for name, (act, total, fit) in plan.rows.items():
        verdict = "fits" if total <= args.device_memory else "does not fit"
        print(f"  {name:8s} activations {human(act):>10s}  step peak {human(total):>10s} ({verdict}); "
              f"longest sequence that fits: {fit if fit else 'none'}", file=out)
    for line in plan.assumptions:
        print(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    "), file=out)
    return {"device_memory": args.device_memory, "seq_len": args.seq_len, "sp": args.sp, "zero": args.zero,
            "world": args.world, "optimizer": args.optimizer, "offload": args.offload,
            "checkpointing": not args.no_checkpointing,
            "states": {"weights": st.weights, "grads": st.grads, "optimizer": st.optimizer, "gathered": st.gathered,
                       "host": st.host},
            "rows": {k: {"activation_bytes": a, "step_peak_bytes": t, "longest_seq": f} for k, (a, t, f) in plan.rows.items()},
            "assumptions": plan.assumptions}


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
    _transformers()
    try:
        return tiny.build_model(config, device, trust_remote_code)
    except ValueError as exc:
        if "no model class" not in str(exc):
            raise
        raise UsageError(str(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}"


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
    rows = [("module", "pattern", "roles", "shards", "activation memory")]
    for m in matches:
        mem = memory.get((m.path, m.nodes))
        shards = ("untiled" if mem.shards == 1 else str(mem.shards)) if mem else "-"
        cell = f"{human(mem.peak_before)} -> {human(mem.peak_after)}" if mem else ("not estimated" if m.tiled else "not tiled")
        if mem and mem.shards == 1 and m.tiled:
            since = f" from {m.tiled_from} tokens" if m.tiled_from else " at no length"
            cell += f" (tiled{since}: below, one untiled call holds less)"
        rows.append((m.path or "(root)", m.pattern, _roles(m.roles), shards, cell))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]


_SIZES = (  # what the report says it planned for: (label, config fields in order of preference)
    ("hidden", ("hidden_size", "n_embd", "d_model")), ("intermediate", ("intermediate_size", "n_inner", "ffn_dim")),
    ("expert intermediate", ("moe_intermediate_size", "expert_intermediate_size")),
    ("experts", ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")),
    ("top-k", TOP_K_NAMES),
    ("vocab", ("vocab_size",)), ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
)


def config_sizes(config) -> dict[str, int]:
    """The sizes of ``config`` (its text config for a composite one) that the plan was made for."""
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001
        text = config
    sizes = {}
    for label, names in _SIZES:
        value = next((getattr(text, n) for n in names if isinstance(getattr(text, n, None), int)
                      and not isinstance(getattr(text, n), bool)), None)
        if value is not None:
            sizes[label] = value
    return sizes


def assumptions(entries: list[MlpMemory], matches: Matches) -> list[str]:
    """What the estimate assumes beyond the config (expert banks: how their memory was measured)."""
    banks = [m for m in matches if m.pattern == "routed_experts" and (m.path, m.nodes) in {(e.path, e.nodes) for e in entries}]
    if not banks:
        return []
    return ["expert banks: routing assumed uniform over the experts (each gets tokens x top-k / experts rows; an "
            "unbalanced router holds more in its busiest expert), replayed on small real instances of the bank's "
            "class (every width divided by one factor, random weights, on CPU) and scaled to its widths"]


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
            "fp32_weight_grad_sums": mem.fp32_sums if mem else None,
            "tiled_from_tokens": m.tiled_from,
        })
    return {
        "model": args.model, "model_type": getattr(config, "model_type", None), "class": type(model).__name__,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": args.seq_len * args.batch_size,
        "dtype": args.dtype, "shards": args.shards, "definition": DEFINITION,
        "config_sizes": config_sizes(config), "assumptions": assumptions(entries, matches),
        "modules": modules,
        "skipped": [{"path": s.path, "reason": s.reason} for s in matches.skipped],
        "totals": {
            "regions": len(matches), "tiled": sum(m.tiled for m in matches),
            "activation_bytes_before": before, "activation_bytes_after": after, "saved_bytes": before - after,
        },
        "verification": None if verification is None else {
            "passed": verification.passed, "status": verification.status, "detail": verification.detail,
            "max_error": verification.max_error, "seconds": round(verification.seconds, 2),
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
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[args.dtype])  # planned in the training dtype: profiles and estimate alike
        try:
            model = build_model(config, "meta", args.trust_remote_code)
        finally:
            torch.set_default_dtype(default)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot build {type(config).__name__} on the meta device: {_first_line(exc)}") from None
    tokens = args.seq_len * args.batch_size
    dtype = DTYPES[args.dtype]
    base = None
    if args.device_memory:  # the whole-step plan needs the model untouched as well
        if args.sp > args.world:
            raise UsageError(f"--sp {args.sp} needs at least as many ranks: pass --world {args.sp} or more")
        import copy

        base = copy.deepcopy(model)
    loss = not args.no_loss
    with warnings.catch_warnings():  # "found no MLP" is reported below, with the reasons
        warnings.simplefilter("ignore")
        transform(model, shards=args.shards, loss=loss)
    matches = find(model, loss=loss)
    entries = mlp_memory(model, tokens, dtype) if any(m.tiled for m in matches) else []
    memory = {(e.path, e.nodes): e for e in entries}
    planned = time.perf_counter() - start

    name = type(model).__name__
    print(f"fxtile convert {args.model}: {name}, planned on the meta device in {planned:.1f} s (no weights loaded)",
          file=out)
    print(f"batch {args.batch_size} x seq {args.seq_len} = {tokens} tokens, {args.dtype}, shards={args.shards}", file=out)
    sizes = config_sizes(config)
    print("config: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "\n" if sizes else "", file=out)
    if matches:
        print("\n".join(_table(matches, memory)), file=out)
    for skip in matches.skipped:
        print(f"not tiled: {skip.path or '(root)'}: {skip.reason}", file=out)

    verification = None
    code = 0
    if not entries:  # every tiled region has an entry (expert banks too: fxtile.estimate)
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in matches.skipped[:3])
        print(f"\nfxtile: nothing to tile in {name}" + (f" ({reasons})" if reasons else
              " (no block matched an MLP, expert-bank or loss-head pattern)"), file=err)
        code = 1
    else:
        before, after = total_peak(entries, tiled=False), total_peak(entries, tiled=True)
        workspace = max(e.weight_grad_workspace for e in entries)
        print(f"\ntotal: {sum(m.tiled for m in matches)} of {len(matches)} regions tiled; activation memory at the "
              f"backward peak {human(before)} -> {human(after)} (saves {human(before - after)}, "
              f"{100 * (before - after) / before:.0f}%)", file=out)
        if workspace:
            print(f"  after includes the tiled op's weight-gradient workspace, up to {human(workspace)} per layer", file=out)
        for line in assumptions(entries, matches):
            print(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    "), file=out)
        print(textwrap.fill(DEFINITION, 100, initial_indent="  ", subsequent_indent="  "), file=out)
        if args.no_verify:
            print("\nexactness: not checked (--no-verify)", file=out)
        else:
            print("\nchecking exactness on a tiny random model of the same architecture...", end="", file=err, flush=True)
            verification = exactness(config, loss=loss, trust_remote_code=args.trust_remote_code)
            print(f" {'ok' if verification.passed else 'FAILED'} ({verification.seconds:.1f} s)", file=err, flush=True)
            if verification.passed:
                print(f"\nexactness: passed: {verification.detail}, max relative error {verification.max_error:.1e}",
                      file=out)
            else:
                print(f"\nfxtile: exactness check failed: {verification.detail}", file=err)
                code = 1
    step = None
    if args.device_memory:
        step = _step_report(args, model, base, out)
    if args.json:
        plan = _plan_json(args, config, model, matches, memory, entries, verification)
        plan["exit_code"] = code
        if step is not None:
            plan["step"] = step
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

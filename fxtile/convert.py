"""What ``fxtile convert MODEL`` does once its arguments are parsed (:mod:`fxtile.cli`): plan, report, check.

Why a command: before a long-context run a user wants three answers without writing code or loading
70B of weights. So the model is built on the **meta device** from its config (no weights allocated),
``fxtile.transform(model, loss=True)`` plans it (``--no-loss``: the MLPs only), :mod:`fxtile.estimate`
replays each region (every MLP, the output projection and its loss) on meta at the requested
tokens (per rank under ``--sp``), and exactness is checked by :func:`fxtile.tiny.exactness` on a tiny
random model of the same architecture (the config, shrunk as the coverage sweep shrinks it): one
training call as users make it, in float64 so any difference is a real error and not rounding, and
every tiled block must really run tiled in it. With ``--device-memory``, :mod:`fxtile.planner` plans
the whole training step and the longest sequence that fits.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import textwrap
import time
import warnings
from typing import Callable

import torch
from torch import nn

from . import tiny
from .api import Matches, find, transform
from .estimate import MlpMemory, mlp_memory, total_peak
from .noise import quiet_library_noise
from .passes.experts import TOP_K_NAMES
from .planner import plan_step
from .policy import as_policy
from .tiny import exactness

__all__ = ["ConvertError", "convert"]


class ConvertError(Exception):
    """A model that cannot be read or built, or a plan that cannot be written: the CLI exits 2 with this
    one-line message."""


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


def _step_report(args, model: nn.Module, base: nn.Module, out, progress: Callable[[str], None]) -> dict:
    """The whole-step section of the report (``--device-memory``), and its JSON."""
    plan = plan_step(base, args.seq_len, args.device_memory, batch=args.batch_size, sp=args.sp, offload=args.offload,
                     zero=args.zero, world=args.world, optimizer=args.optimizer,
                     checkpointing=not args.no_checkpointing, tiled=model, progress=progress)
    st = plan.states
    per_rank = f", {args.seq_len // args.sp} tokens per rank" if args.sp > 1 else ""
    print(f"\nwhole training step per GPU at seq {args.seq_len}{per_rank} (--device-memory {human(args.device_memory)}):",
          file=out)
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
        raise ConvertError("fxtile convert needs transformers: pip install 'fxtile[hf]'") from None
    transformers.logging.set_verbosity_error()  # config warnings are not the user's problem here
    return transformers


def load_config(model: str, trust_remote_code: bool = False):
    """The config for ``model``: a directory with ``config.json``, or a transformers model type."""
    T = _transformers()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConvertError(f"{model!r} is a directory without a config.json; pass a Hugging Face model directory")
        try:
            return T.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported in one line
            raise ConvertError(f"cannot read {os.path.join(model, 'config.json')}: {_first_line(exc)}") from None
    if os.sep in model or model.startswith(".") or os.path.exists(model):
        raise ConvertError(f"no such model directory: {model!r}")
    try:
        return T.AutoConfig.for_model(model)
    except ValueError:
        raise ConvertError(
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
        raise ConvertError(str(exc)) from None


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
    rows = _collapsed(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]


_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def _collapsed(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Runs of rows that differ only in one layer index of the path, with consecutive indices, as one row:
    32 identical MLP rows read ``model.layers.{0..31}.mlp``."""
    out: list[tuple[str, ...]] = []
    run: list[tuple[int, tuple[str, ...]]] = []  # (index, row) of the current run

    def flush() -> None:
        if len(run) > 1:
            first, row = run[0]
            found = _INDEX.search(row[0])
            path = f"{row[0][:found.start()]}.{{{first}..{run[-1][0]}}}{row[0][found.end():]}"
            out.append((path, *row[1:]))
        else:
            out.extend(row for _, row in run)
        run.clear()

    for row in rows:
        found = _INDEX.search(row[0])
        if found is None:
            flush()
            out.append(row)
            continue
        index = int(found.group(1))
        if run:
            last_index, last = run[-1]
            last_found = _INDEX.search(last[0])
            alike = (last[1:] == row[1:] and index == last_index + 1
                     and _INDEX.sub(".#", last[0], 1) == _INDEX.sub(".#", row[0], 1) and last_found.start() == found.start())
            if not alike:
                flush()
        run.append((index, row))
    flush()
    return out


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
        "sp": args.sp, "tokens_per_rank": args.seq_len * args.batch_size // args.sp,  # what the regions are planned at
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


def _progress(err) -> Callable[[str], None]:
    """Progress lines on stderr, each with the seconds since the command started: the steps that take
    seconds (building, planning, the exactness check, each measured training step) say what they do."""
    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"fxtile: [{time.perf_counter() - start:5.1f} s] {line}", file=err, flush=True)

    return say


def convert(args, out=None, err=None) -> int:
    """Run ``fxtile convert`` with parsed ``args`` (:func:`fxtile.cli.build_parser`); prints the report
    and returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    json_out = out
    if args.json == "-":  # stdout is the JSON alone: the report goes to stderr
        out = err
    quiet_library_noise()  # torchao's import noise on a CPU-only torch is not the user's
    start = time.perf_counter()
    progress = _progress(err)
    try:
        as_policy(args.shards)  # ShardPolicy's validation and message, before anything is built
    except ValueError as exc:
        raise ConvertError(f"argument --shards: {exc}") from None
    config = load_config(args.model, args.trust_remote_code)
    progress(f"building {type(config).__name__.removesuffix('Config')} on the meta device")
    try:
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[args.dtype])  # planned in the training dtype: profiles and estimate alike
        try:
            model = build_model(config, "meta", args.trust_remote_code)
        finally:
            torch.set_default_dtype(default)
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"cannot build {type(config).__name__} on the meta device: {_first_line(exc)}") from None
    tokens = args.seq_len * args.batch_size // args.sp  # per rank: Ulysses gives each seq/sp tokens
    dtype = DTYPES[args.dtype]
    base = copy.deepcopy(model) if args.device_memory else None  # the whole-step plan needs it untouched too
    loss = not args.no_loss
    progress(f"planning fxtile.transform(model, loss={loss}) on meta")
    with warnings.catch_warnings():  # "found no MLP" is reported below, with the reasons
        warnings.simplefilter("ignore")
        transform(model, shards=args.shards, loss=loss)
    matches = find(model, loss=loss)
    if any(m.tiled for m in matches):
        progress(f"replaying {sum(m.tiled for m in matches)} tiled regions on meta at {tokens} tokens")
    entries = mlp_memory(model, tokens, dtype) if any(m.tiled for m in matches) else []
    memory = {(e.path, e.nodes): e for e in entries}
    planned = time.perf_counter() - start

    name = type(model).__name__
    print(f"fxtile convert {args.model}: {name}, planned on the meta device in {planned:.1f} s (no weights loaded)",
          file=out)
    per_rank = f" / sp {args.sp} = {tokens} tokens per rank (each rank's regions see seq/sp tokens)" if args.sp > 1 else ""
    print(f"batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len} tokens{per_rank}, "
          f"{args.dtype}, shards={args.shards}", file=out)
    sizes = config_sizes(config)
    print("config: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "\n" if sizes else "", file=out)
    if matches:
        print("\n".join(_table(matches, memory)), file=out)
    for skip in matches.skipped:
        print(f"not tiled: {skip.path or '(root)'}: {skip.reason}", file=out)

    verification = None
    code = 0
    if not entries:  # every tiled region has an entry (expert banks too: fxtile.estimate)
        reasons = "; ".join(f"{s.path or '(root)'}: {s.reason}" for s in matches.skipped[:3])
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
            progress("checking exactness on a tiny random model of the same architecture")
            verification = exactness(config, loss=loss, trust_remote_code=args.trust_remote_code)
            progress(f"exactness {'ok' if verification.passed else 'FAILED'} ({verification.seconds:.1f} s)")
            if verification.passed:
                print(f"\nexactness: passed: {verification.detail}, max relative error {verification.max_error:.1e}",
                      file=out)
            else:
                print(f"\nfxtile: exactness check failed: {verification.detail}", file=err)
                code = 1
    step = None
    if args.device_memory:
        progress("planning the whole training step (fxtile.planner): untiled, then with fxtile")
        step = _step_report(args, model, base, out, progress)
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
                raise ConvertError(f"cannot write --json {args.json!r}: {exc.strerror}") from None
    return code

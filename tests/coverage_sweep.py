"""Coverage sweep: tile every causal LM that the installed transformers registers, with no registry.

Run ``python tests/coverage_sweep.py`` to print the table (``--help`` for options). For each entry of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` it runs :func:`fxtile.tiny.exactness` (what ``fxtile convert`` runs
too): the model built from its own config class with tiny sizes (composite configs: every sub-config is
shrunk; MoE and MLA fields too), a deep copy tiled with ``fxtile.transform(copy, shards=4)``, and one
training call as users make it (``model.train()``, the config's defaults, ``model(input_ids=ids,
labels=ids)`` on 2 x 7 tokens), comparing the loss, the logits, the MoE aux loss and every parameter's
gradient with the untouched model, and requiring that every tiled block really ran tiled in that call.

The coverage oracle does not come from fxtile's matcher. A decoder layer counts as tiled when the
tiled regions read every parameter of that layer that belongs to its feed-forward compute, which the
sweep recognizes by *shape*: a dimension equal to one of the config's feed-forward widths (the tiny
sizes make those widths unique: no attention projection has them) or a stacked 3-D expert tensor.

Each architecture runs in its own process, forked from a parent that imported torch and transformers
once, with an address-space cap and a timeout, at most ``--workers`` at a time.
"""

from __future__ import annotations

import argparse
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
from fxtile import testing, tiny  # noqa: E402
from fxtile.tiny import EXPERTS, FFN_WIDTHS, HIDDEN  # noqa: E402

__all__ = ["Result", "architectures", "check", "default_config", "expectation", "expected", "format_table", "kinds", "sweep"]

SHARDS = tiny.SHARDS


def architectures() -> dict[str, str]:
    """model_type -> causal-LM class name, exactly as the installed transformers registers them."""
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def default_config(model_type: str):
    """The causal-LM class's own config class (``Llama4ForCausalLM`` takes ``Llama4TextConfig``, not the
    registered ``Llama4Config``) at its defaults (``fxtile.tiny.exactness`` shrinks it)."""
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[model_type]
    return cls()


def ffn_widths(config) -> set[int]:
    """The feed-forward widths of the built config (what the sweep calls feed-forward parameters)."""
    text = config.get_text_config()
    widths = set()
    for key in tiny.TINY:
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
    status: str  # tiled | partial | untiled | no-ffn | mismatch | untiled-call | build-failed | run-failed | transform-failed | crashed | timeout
    layers: int = 0
    tiled_layers: int = 0
    patterns: list = field(default_factory=list)  # per decoder layer: sorted patterns found in it
    max_error: Optional[float] = None
    detail: str = ""
    seconds: float = 0.0
    loss: str = ""  # with --loss: "tiled", or why the head and loss were not (a second call, loss=True)


def _decoder_layers(model, ran: set[str] | None = None) -> list:
    """The ModuleList holding the most parameters (the decoder stack, whatever it is called); with
    ``ran`` (paths of tiled blocks that ran in the call), the largest one holding such a block, so a
    vision or audio tower that a text call never runs is not taken for the decoder."""
    names = {id(m): p for p, m in model.named_modules()}
    lists = sorted((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 1),
                   key=lambda m: -sum(p.numel() for p in m.parameters()))
    if ran is not None:
        used = [m for m in lists if any(r.startswith(names[id(m)] + ".") for r in ran)]
        lists = used or lists
    return list(lists[0]) if lists else []


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
    read = {id(t) for t in testing.tiled_tensors(model)}
    tiled_paths: dict[str, list[str]] = {}
    for m in fxtile.find(model):
        if m.tiled:
            tiled_paths.setdefault(m.path, []).append(m.pattern)
    names = {id(mod): path for path, mod in model.named_modules()}
    tiled, no_ffn, per_layer, missing_all = 0, 0, [], []
    for index, layer in enumerate(layers):
        found = sorted(p for mod in layer.modules() for p in tiled_paths.get(names[id(mod)], []))
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


def check_loss(config, cls) -> str:
    """``"tiled"`` when ``transform(model, loss=True)`` tiles the model's own head and loss, that call runs
    them tiled, and the loss and every parameter gradient equal the untouched model's; else why not."""
    found = tiny.exactness(config, shards=SHARDS, cls=cls, loss=True, keep_model=True)
    if found.status != "passed":
        return f"{found.status}: {found.detail}"
    heads = [m.path for m in fxtile.find(found.model, loss=True) if m.tiled and m.pattern == "linear_cross_entropy"]
    if not heads:
        why = [s.reason for s in fxtile.find(found.model, loss=True).skipped if "cross" in s.reason or "loss" in s.reason]
        return "not found" + (f": {why[0]}" if why else ": no projection reaches a cross-entropy through row-wise steps")
    if any(h in found.idle for h in heads):
        return f"untiled-call: {heads[0] or 'the root'} did not run tiled in the training call"
    return "tiled"


def check(model_type: str, loss: bool = False) -> Result:
    """Verify one architecture with :func:`fxtile.tiny.exactness` (a default training call, meant to run in
    its own process), then check with the shape oracle that every decoder layer's feed-forward was tiled.
    ``loss``: also verify the head and loss tiled (:func:`check_loss`)."""
    start = time.time()
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    result = Result(model_type, cls_name, "build-failed")
    try:
        config = default_config(model_type)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        result.detail = _reason(exc)
        return _done(result, start)
    if loss:
        try:
            result.loss = check_loss(config, getattr(transformers, cls_name))
        except Exception as exc:  # noqa: BLE001
            result.loss = f"crashed: {_reason(exc)}"
    found = tiny.exactness(config, shards=SHARDS, cls=getattr(transformers, cls_name), keep_model=True)
    result.max_error, result.detail = found.max_error, found.detail
    if found.status in ("build-failed", "run-failed", "transform-failed", "mismatch", "untiled-call"):
        result.status = found.status
        return _done(result, start)
    model = found.model
    small = model.config
    ran = {p for p, _ in model.named_modules() if p not in found.idle} & {m.path for m in fxtile.find(model) if m.tiled}
    layers = _decoder_layers(model, ran)
    result.layers = len(layers)
    names = {id(m): p for p, m in model.named_modules()}
    idle_layers = [p for p in found.idle if any(p == names[id(layer)] or p.startswith(names[id(layer)] + ".")
                                                 for layer in layers)]
    if idle_layers:
        result.status = "untiled-call"
        result.detail = f"{idle_layers[0]} did not run tiled in the training call"
        return _done(result, start)
    result.tiled_layers, no_ffn, result.patterns, missing = _layer_coverage(model, layers, ffn_widths(small))
    skipped = fxtile.find(model).skipped
    result.detail = ""
    if result.layers and no_ffn == result.layers:
        result.status, result.detail = "no-ffn", "no decoder layer has feed-forward parameters (sequence mixers only)"
    elif found.status == "no-mlp":
        result.status = "untiled"
        why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:2])
        result.detail = missing + (f" | skipped {why}" if why else "")
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


def _child(model_type: str, write_fd: int, mem_bytes: int, loss: bool) -> None:
    try:
        soft = _vm_size() + mem_bytes
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
        torch.set_num_threads(1)
        result = check(model_type, loss)
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
          progress: bool = False, loss: bool = False) -> list[Result]:
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
                    _child(arch, write_fd, int(mem_gb * 2**30), loss)
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
            "percent": round(100.0 * len(tiled) / max(1, len(built)), 1),
            "loss_tiled_exact": sum(r.loss == "tiled" for r in built)}


def format_table(results: list[Result]) -> str:
    with_loss = any(r.loss for r in results)
    rows = ["| architecture | class | patterns per layer | status | max error | note |" + (" loss head |" if with_loss else ""),
            "|---|---|---|---|---|---|" + ("---|" if with_loss else "")]
    for r in results:
        pats = "; ".join("+".join(p) or "-" for p in r.patterns) if r.patterns else ""
        err = f"{r.max_error:.1e}" if r.max_error is not None else ""
        status = r.status if r.status != "tiled" else f"tiled {r.tiled_layers}/{r.layers}"
        if r.status == "partial":
            status = f"partial {r.tiled_layers}/{r.layers}"
        loss = f" {r.loss.replace('|', '/')[:150]} |" if with_loss else ""
        rows.append(f"| {r.arch} | {r.cls} | {pats} | {status} | {err} | {r.detail.replace('|', '/')[:150]} |{loss}")
    s = summary(results)
    rows.append("")
    rows.append(f"{s['registered']} registered, {s['built']} build and run from a tiny config and have feed-forward layers, "
                f"{s['tiled_every_layer_exact']} tiled in every layer with exact logits and gradients "
                f"({s['percent']}% of those that build)."
                + (f" With loss=True, the head and loss are tiled with exact loss and gradients in {s['loss_tiled_exact']} "
                   f"of those {s['built']}." if with_loss else ""))
    return "\n".join(rows)


EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coverage_expected.json")


def kinds(result: Result) -> list[str]:
    """The kinds of region tiled anywhere in the architecture (``gated``, ``routed_experts``, ...)."""
    return sorted({p for layer in (result.patterns or []) for p in layer})


HOST_STATUSES = ("timeout", "crashed")  # what the host did, not the code: never written as expected


def expectation(results: list[Result], held: Optional[dict[str, dict]] = None) -> str:
    """The checked-in expectation (``coverage_expected.json``): per architecture, its status and the kinds of
    region it tiles, one line each, so that a diff shows which architecture changed. Architectures not swept
    now (or that timed out or crashed) keep what ``held`` says."""
    entries = dict(held or {})
    entries.update({r.arch: {"status": r.status, "kinds": kinds(r)} for r in results if r.status not in HOST_STATUSES})
    lines = [f'  "{arch}": {json.dumps(entry)}' for arch, entry in sorted(entries.items())]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def expected() -> dict[str, dict]:
    with open(EXPECTED) as f:
        return json.load(f)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="model types (default: every registered causal LM)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--mem-gb", type=float, default=3.0, help="address-space cap per worker, on top of the imports")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--loss", action="store_true", help="also tile and verify each head and loss (loss=True)")
    parser.add_argument("--write-expected", action="store_true",
                        help=f"update {os.path.basename(EXPECTED)}, the per-architecture expectation the tests hold the sweep to, "
                             "for the architectures swept (not for those that timed out or crashed)")
    args = parser.parse_args(argv)
    archs = args.archs or list(architectures())
    start = time.time()
    results = sweep(archs, args.workers, args.timeout, args.mem_gb, progress=True, loss=args.loss)
    print(format_table(results))
    print(f"\nsweep time: {time.time() - start:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if args.write_expected:
        text = expectation(results, expected() if os.path.exists(EXPECTED) else None)
        with open(EXPECTED, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``fxtile`` command: its arguments, checked before anything heavy is imported.

``fxtile convert MODEL`` plans tiling for a model on the meta device, checks that it stays exact on a
tiny random model of the same architecture, estimates the activation memory it saves at ``--seq-len``
and, with ``--device-memory``, plans the whole training step and the longest sequence that fits
(:mod:`fxtile.convert` does the work).

Why this module imports only the standard library: a mistyped flag should be answered at once, and
importing torch and transformers takes seconds. So the arguments are parsed and checked here, and
:mod:`fxtile.convert` (torch, transformers) is imported only once they are good.

Exit codes: 0 when at least one region is tiled and the check passes; 1 when nothing was tiled or the
check failed (the message says why); 2 for bad arguments or a model that cannot be read (one line,
no traceback).

Stable: :func:`main` (the ``fxtile`` console script and ``python -m fxtile``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main", "parse_bytes"]

DTYPES = ("bf16", "fp16", "fp32")
MIN_UNITLESS = 2**20  # a size without a unit below this is a forgotten unit, not a GPU's memory

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class UsageError(Exception):
    """A bad argument: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def parse_bytes(text: str) -> int:
    """``'80GiB'``, ``'80GB'``, ``'1.5 TiB'``, ``'4194304'`` -> bytes; ValueError otherwise, also for a
    number without a unit below 1 MiB (``80`` meant 80 GiB, not 80 bytes)."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    if not found or found.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 141GB)")
    value = float(found.group(1)) * _UNITS[found.group(2).lower()]
    if value < 1:
        raise ValueError(f"not a positive memory size: {text!r}")
    if not found.group(2) and value < MIN_UNITLESS:
        raise ValueError(f"{text!r} without a unit is {int(value)} bytes; give the unit, e.g. {found.group(1)}GiB or "
                         f"{found.group(1)}GB")
    return int(value)


def _memory_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_memory_size.__name__ = "--device-memory"


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
    """'auto' or an integer; what the integer may be is :class:`fxtile.ShardPolicy`'s to say."""
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text!r}") from None


_shards.__name__ = "--shards"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxtile", description="Tile the MLPs, expert banks and loss head of a model over tokens, "
                                                "found by graph shape: plan, check and estimate with 'fxtile convert'.")
    parser.add_argument("--version", action="version", version=f"fxtile {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    convert = commands.add_parser(
        "convert", help="plan tiling for a model, check it is exact, estimate the memory saved",
        description="Plan fxtile for MODEL on the meta device (no weights loaded), check outputs and gradients "
        "on a tiny random model of the same architecture, and estimate the activation memory of the MLPs, "
        "expert banks and the loss head at SEQ_LEN; with --device-memory, the whole training step and the longest "
        "sequence that fits. Activation memory is what autograd keeps from a region's forward until its backward, "
        "plus the peak working memory of its forward and backward; the report says in full what is counted and "
        "what is not (weights, their .grad, the region's input and output are the same tiled or not).",
    )
    convert.add_argument("model", metavar="MODEL",
                         help="a local Hugging Face model directory (with config.json) or a transformers model type "
                              "(llama, qwen2, gpt2, ...: that architecture's default config)")
    convert.add_argument("--seq-len", type=_positive_int("--seq-len"), default=32768, help="tokens per sequence (default 32768)")
    convert.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1, help="sequences per step (default 1)")
    convert.add_argument("--shards", type=_shards, default="auto", help="'auto' (fxtile.ShardPolicy()) or a fixed count (default auto)")
    convert.add_argument("--dtype", choices=DTYPES, default="bf16", help="training dtype for the estimate (default bf16)")
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
                      help="Ulysses sequence-parallel degree: each rank holds seq/sp tokens, and the regions are "
                           "planned per rank (default 1)")
    step.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (default 0)")
    step.add_argument("--world", type=_positive_int("--world"), default=1, help="data-parallel ranks ZeRO shards over (default 1)")
    step.add_argument("--optimizer", choices=("adamw", "sgd", "none"), default="adamw", help="optimizer states (default adamw)")
    step.add_argument("--no-checkpointing", action="store_true", help="plan without activation checkpointing")
    return parser


def _version() -> str:
    from . import __version__  # the package's __init__ imports nothing heavy

    return __version__


_STEP_FLAGS = {"offload": False, "zero": 0, "world": 1, "optimizer": "adamw", "no_checkpointing": False}


def check(args: argparse.Namespace) -> None:
    """What no single argument's parser can see: combinations, and a --json file that could not be written
    (found now, not after the work)."""
    if args.device_memory is None:
        given = [f"--{k.replace('_', '-')}" for k, default in _STEP_FLAGS.items() if getattr(args, k) != default]
        if given:
            raise UsageError(f"{', '.join(given)} plan the whole training step: pass --device-memory SIZE as well")
    if args.json not in (None, "-"):
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write --json {args.json!r}: not a file in a writable folder")
    if args.device_memory is not None and args.sp > args.world:  # the step's ranks: SP groups within them
        raise UsageError(f"--sp {args.sp} needs at least as many ranks: pass --world {args.sp} or more")
    if args.sp > 1 and args.seq_len % args.sp:
        raise UsageError(f"--seq-len {args.seq_len} does not split over --sp {args.sp} ranks: pass a multiple of {args.sp}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxtile`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        check(args)
    except UsageError as exc:
        print(f"fxtile: error: {exc}", file=sys.stderr)
        return 2
    from .convert import ConvertError, convert  # torch and transformers: only once the arguments are good

    try:
        return convert(args)
    except ConvertError as exc:
        print(f"fxtile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

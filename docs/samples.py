"""Rerun the commands whose output README.md and docs/ show, and write their output into the docs.

A sample is a fenced block right after a marker line naming the command that prints it::

    <!-- sample: fxtile convert mixtral --seq-len 32768 -->

``fxtile ...`` runs as ``python -m fxtile ...``, ``python ...`` and ``torchrun ...`` with this interpreter, from the
repository's root, after any leading ``NAME=value`` words are set in its environment; the block gets
the command's stdout (progress lines and launcher banners go to stderr and are left out).

    python docs/samples.py                 # rerun every sample and rewrite its block
    python docs/samples.py --check         # rerun, rewrite nothing, exit 1 naming each sample that differs
    python docs/samples.py --only convert  # only the samples whose command contains "convert"

Why a script: sample outputs go stale silently (a changed shard count, a new line in the report), and a
sample is only worth showing if it is what the code prints. ``--check`` masks what differs between runs
of the same code (seconds, log timestamps, measured errors such as 1.0e-07); every other character must
match. ``tests/test_docs.py`` runs
``--check`` on the ``fxtile convert`` samples, which take seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))]
MARKER = re.compile(r"^<!-- sample: (?P<command>.+?) -->\n```[a-z]*\n(?P<output>.*?)^```$", re.M | re.S)
# what differs between runs of the same code: seconds, log timestamps, and measured errors (1.0e-07: the last
# bits of float arithmetic differ between CPUs' kernels); every size, count and word must match
VARIES = re.compile(r"\d+(?:\.\d+)? s\b|^\[\d{4}-\d\d-\d\d [\d:,]+\]|\d\.\d+e[-+]\d+", re.M)


def samples(only: str = "") -> list[tuple[str, str, str]]:
    """``(file, command, output shown)`` for every sample in the docs."""
    found = []
    for name in FILES:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        found += [(name, m["command"], m["output"]) for m in MARKER.finditer(text) if only in m["command"]]
    return found


def run(command: str) -> str:
    argv = shlex.split(command)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    if argv[0] == "fxtile":
        argv = [sys.executable, "-m", "fxtile", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{command!r} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def masked(text: str) -> str:
    return VARIES.sub("#", text).rstrip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a sample differs")
    parser.add_argument("--only", default="", help="only the samples whose command contains this text")
    args = parser.parse_args(argv)
    stale = []
    outputs = {}
    for name, command, shown in samples(args.only):
        if command not in outputs:
            print(f"running {command}", file=sys.stderr, flush=True)
            outputs[command] = run(command)
        same = masked(outputs[command]) == masked(shown) if args.check else outputs[command].rstrip() == shown.rstrip()
        if not same:  # --check: what the code prints differs; else: anything differs, timings too (rewritten)
            stale.append((name, command))
    if args.check:
        for name, command in stale:
            print(f"{name}: the sample of {command!r} is not what it prints now (python docs/samples.py rewrites it)")
        return 1 if stale else 0
    for name in {name for name, _ in stale}:
        path = os.path.join(ROOT, name)
        with open(path) as f:
            text = f.read()
        text = MARKER.sub(lambda m: m.group(0) if m["command"] not in outputs else
                          m.group(0)[: m.start("output") - m.start()] + outputs[m["command"]].rstrip() + "\n```", text)
        with open(path, "w") as f:
            f.write(text)
        print(f"rewrote {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

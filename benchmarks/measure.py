"""How the benchmarks measure: peak memory above a baseline and step time, each in a fresh process.

Memory is the peak above the process's baseline, taken after a full warm-up step: on CPU the resident
set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), on CUDA
``max_memory_allocated``. On CPU the memory process runs with a fixed glibc mmap threshold, so every
large block goes back to the system when freed and the resident set follows live tensors; that slows
every implementation alike, so time is measured in a separate process with the default allocator.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

__all__ = ["measure", "run_fresh"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _reset_peak(device: str) -> int:
    """Forget the process's peak so far; returns the current (baseline) bytes."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak resident set (VmHWM)
        f.write("5")
    return _rss_kib("VmRSS") * 1024


def _peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024


def measure(step, device: str, repeats: int) -> dict:
    """Warm up with one full step (imports, compilation, allocator growth belong to the process, not to
    the step), reset the peak, then measure one step's peak and the median time of ``repeats`` more.
    ``step()`` returns its time; ``step.clear()`` drops what the warm-up left (gradients)."""
    step()
    step.clear()
    base = _reset_peak(device)
    first = step()
    peak = _peak(device) - base
    times = [step() for _ in range(repeats)]
    return {"peak": peak, "time": statistics.median(times) if times else first}


def run_fresh(cmd: list[str], memory: bool, device: str) -> dict:
    """Run a worker command in a fresh process; its last stdout line is its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if memory and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])

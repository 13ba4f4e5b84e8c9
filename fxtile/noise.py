"""What fxtile's own programs (the ``fxtile`` command, the examples) keep off the terminal: messages that
libraries print about their own internals, none of them the user's doing. Never called by the library:
``import fxtile`` and ``fxtile.transform`` change no warning filter and no logger.

* transformers imports torchao wherever it is installed (``quantizers/quantizer_torchao.py``, when the first
  model class loads), and torchao 0.15-0.18 (the newest on PyPI; no release is quiet with torch 2.13) logs
  that its CUDA kernels ("Failed to load .../torchao/_C_mxfp8...so", "..._C_cutlass_90a...so") do not load
  into a CPU-only torch, and torch 2.13 warns twice that torchao registers Enum subclasses as pytree
  constants. Exactly those records are dropped (the load failures only on a CPU-only torch); any other
  torchao message still shows.
* DeepSpeed 0.19.8 (ZeRO's gathers and reductions) calls ``torch.distributed.all_gather_into_tensor`` and
  ``reduce_scatter_tensor``, which torch 2.13 deprecates: a FutureWarning per call (20 in a 4-step run of
  ``examples/alst.py``). Only those two messages from torch's wrapper are ignored.

Not stable API.
"""

from __future__ import annotations

import logging
import re
import warnings

import torch

__all__ = ["quiet_library_noise"]

_LOAD_FAILURE = re.compile(r"Failed to load .*[/\\]torchao[/\\]_C\w*\.[\w.-]*\.so: ")


def _not_torchao_kernels(record: logging.LogRecord) -> bool:
    cpu_only = torch.version.cuda is None and torch.version.hip is None
    return not (cpu_only and _LOAD_FAILURE.match(record.getMessage()))


def _not_torchao_enums(record: logging.LogRecord) -> bool:
    registered = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return not ("is an Enum subclass" in str(record.msg) and getattr(registered, "__module__", "").startswith("torchao."))


def quiet_library_noise() -> None:
    """Install the filters above (idempotent). Call it before the first transformers model class loads."""
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning, module=r"torch\.distributed\.c10d_logger",
    )
    for name, keep in (("torchao", _not_torchao_kernels), ("torch.utils._pytree", _not_torchao_enums)):
        logger = logging.getLogger(name)
        if keep not in logger.filters:
            logger.addFilter(keep)

"""Train/eval modes, saved and restored in one place.

Why one context manager: tracers and probes must run a module in a given state and then leave every
module's mode exactly as the user set it. ``module.train(flag)`` sets the whole subtree to one flag, so
restoring with it would overwrite mixed modes (a dropout the user put in eval inside a training model).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["modes_of", "preserved_modes"]


@contextlib.contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of ``module`` and every descendant on exit, one by one."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def modes_of(module: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in ``module.modules()`` order (what a per-call key records)."""
    return tuple(m.training for m in module.modules())

"""fxtile: tile the MLPs and the loss head of any ``nn.Module`` over tokens, found by graph shape, with no registry.

Stable API: :func:`transform`, :func:`find`, :func:`restore`, :class:`Match`, :class:`Skipped`, :class:`Why`,
:class:`ShardPolicy`. Underneath, dependencies point one way: the runtime (``fxtile.api`` -> the block
kinds -> ``fxtile.region`` -> ``fxtile.op`` -> ``fxtile.kernels``) uses the graph package ``fxtile.passes``
(trace, match, cut, rewrite: plain descriptions of regions and their plans), which imports nothing of it.

Why the names are loaded on first use (PEP 562) rather than imported here: the ``fxtile`` command
(:mod:`fxtile.cli`) answers a bad argument before torch is imported, which takes seconds; any use of
``fxtile.transform`` (or ``from fxtile import transform``) imports :mod:`fxtile.api` as before. The
custom ops (``torch.ops.fxtile.*``) are registered by :mod:`fxtile.op`, which any of those imports: to
load a saved program that calls them without using the API first, ``import fxtile.op``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Match", "Matches", "ShardPolicy", "Skipped", "Why", "find", "restore", "transform"]
__version__ = "0.2.0"

_HOMES = {"ShardPolicy": ".policy", **{name: ".api" for name in __all__ if name != "ShardPolicy"}}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import Match, Matches, Skipped, Why, find, restore, transform
    from .policy import ShardPolicy


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None and not name.isidentifier():  # getattr(fxtile, "a.b"): no such attribute (hasattr says False)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if home is None:
        try:  # a submodule (fxtile.testing, fxtile.op, ...), as an imported package would have it
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})

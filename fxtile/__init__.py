"""fxtile: tile the MLPs and the loss head of any ``nn.Module`` over tokens, found by graph shape, with no registry.

Stable API: :func:`transform`, :func:`find`, :func:`restore`, :class:`Match`, :class:`Skipped`,
:class:`ShardPolicy`. The layers underneath, each depending only on the ones after it:
``fxtile.api`` (the walk) -> ``fxtile.kinds`` (block kinds) and ``fxtile.verify`` (the self-check) ->
``passes`` (trace, match, cut, rewrite: graph work) -> ``fxtile.region`` -> ``fxtile.op`` (custom ops,
autograd) -> ``fxtile.kernels`` (tensor code); ``fxtile.modes``, ``fxtile.compare`` and
``fxtile.policy`` are leaf utilities any layer may use.
"""

from .policy import ShardPolicy

__all__ = ["Match", "Matches", "ShardPolicy", "Skipped", "find", "restore", "transform"]
__version__ = "0.2.0"

_API = {"Match", "Matches", "Skipped", "find", "restore", "transform"}


def __getattr__(name: str):
    # The API is imported on first use, not here: ``passes`` (imported by the API) builds the regions
    # defined in this package, so importing a ``passes`` module first must not re-enter the API.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fxtile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)

"""fxtile: tile the MLPs and the loss head of any ``nn.Module`` over tokens, found by graph shape, with no registry.

Stable API: :func:`transform`, :func:`find`, :func:`restore`, :class:`Match`, :class:`Skipped`, :class:`Why`,
:class:`ShardPolicy`. Underneath, dependencies point one way: the runtime (``fxtile.api`` -> the block
kinds -> ``fxtile.region`` -> ``fxtile.op`` -> ``fxtile.kernels``) uses the graph package ``fxtile.passes``
(trace, match, cut, rewrite: plain descriptions of regions and their plans), which imports nothing of it.
"""

from .api import Match, Matches, Skipped, Why, find, restore, transform
from .policy import ShardPolicy

__all__ = ["Match", "Matches", "ShardPolicy", "Skipped", "Why", "find", "restore", "transform"]
__version__ = "0.2.0"

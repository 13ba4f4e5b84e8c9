"""fxtile: tile the MLPs of any ``nn.Module`` over tokens, found by graph shape, with no registry.

Stable API: :func:`transform`, :func:`find`, :func:`restore`, :class:`Match`, :class:`Skipped`,
:class:`ShardPolicy`.
"""

from .api import Match, Matches, Skipped, find, restore, transform
from .policy import ShardPolicy

__all__ = ["Match", "Matches", "ShardPolicy", "Skipped", "find", "restore", "transform"]
__version__ = "0.1.0"

"""fxtile's graph package (installed as ``fxtile.passes``): from a module to plain descriptions of its regions.

Trace a block (:mod:`.trace`, per call signature :mod:`.specialize`), label its nodes (:mod:`.labels`,
:mod:`.pointwise`), match the patterns (:mod:`.patterns` for MLPs, :mod:`.loss_head` for the output
projection and its cross-entropy; :mod:`.match` runs them and the filters), cut each region out
(:mod:`.cut`: a :class:`~.cut.RegionSpec` with the plan its kernel follows, :mod:`.plans`), and
rewrite the graph with one call per region (:mod:`.rewrite`). Expert banks are matched on the module
itself (:mod:`.experts`). It imports only torch, networkx and (optionally) transformers: the runtime
(``fxtile``) builds callables from what this package describes, never the other way round.

Not a stable API: fxtile's stable names are ``fxtile.transform``, ``find``, ``restore``, ``Match``,
``Skipped``, ``Why`` and ``ShardPolicy``.
"""

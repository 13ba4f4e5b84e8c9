"""Kernels: the pure tensor code the tiled ops run, shard by shard (no fx, no graphs, no modules' state).

Each computes from a plan the graph package derived (``fxtile.passes.kernel_plans``), never from a graph:

* :mod:`.shards` - row ranges, and the loops over a region's shards: the explicit plans, or the generic
  recompute of a region's ``run`` function (``torch.func.vjp`` where autograd is off, the autograd engine
  in eager backward);
* :mod:`.linear` - projection math every kernel shares (outputs, input gradients, weight-gradient sums);
* :mod:`.mlp` - the explicit-matmul fast path for MLPs of plain linear layers;
* :mod:`.experts` - the explicit-matmul kernel for routed expert banks;
* :mod:`.loss` - the projection + cross-entropy kernel (gradients computed shard by shard in forward).
"""

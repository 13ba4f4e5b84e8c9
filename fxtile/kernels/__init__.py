"""Kernels: the pure tensor code the tiled ops run, shard by shard (no fx, no graphs, no modules' state).

* :mod:`.shards` - row ranges, and the generic forward/backward loops over a region's ``run`` function
  (``torch.func.vjp`` where autograd is off, the autograd engine in eager backward);
* :mod:`.mlp` - the explicit-matmul fast path for regions of plain linear layers;
* :mod:`.loss` - the projection + cross-entropy kernel (gradients computed shard by shard in forward).
"""

"""Which fx nodes are token-wise element-wise ops (the only glue fxtile lets inside a tiled region).

Why a whitelist: tiling splits the rows (tokens) of the MLP input and runs each shard alone, which
is exact only if nothing inside the region reads another row. Linear layers and element-wise ops
never do; softmax over tokens, norms over the sequence, cumsum or positional tables do. Anything not
listed here ends a region, so an unknown op can make fxtile tile less, never tile wrongly.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["CAST_TARGETS", "RANDOM_TARGETS", "is_metadata", "is_pointwise", "is_random", "is_row_norm", "static_operand_ok"]

_FUNCTION_NAMES = {
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish",
    "hardsigmoid", "sigmoid", "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid", "hardtanh",
    "threshold", "dropout", "exp", "expm1", "log", "log1p", "erf", "erfc", "square", "sqrt", "rsqrt",
    "abs", "neg", "clamp", "clip", "clamp_min", "clamp_max", "where", "minimum", "maximum", "sin",
    "cos", "mul", "add", "sub", "div", "true_divide", "pow", "expit", "reciprocal", "sign", "gelu_",
    "gt", "lt", "ge", "le", "eq", "ne", "logical_not", "logical_and", "logical_or", "isfinite", "nan_to_num",
    "erfinv", "floor", "ceil", "round",
}
_FUNCTION_MODULES = (torch, F, torch._C._nn, torch.special)
POINTWISE_FUNCTIONS = frozenset(
    getattr(mod, name) for mod in _FUNCTION_MODULES for name in _FUNCTION_NAMES if hasattr(mod, name)
) | {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
     operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, operator.invert}

# Reductions that stay inside a row when taken over the last (feature) dim with keepdim=True, as in
# an RMSNorm inside the MLP (BitNet's ``ffn_sub_norm``): still token-wise.
_ROW_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp"}
_ROW_FUNCTIONS = frozenset(getattr(torch, n) for n in _ROW_REDUCTIONS if hasattr(torch, n))
_NORM_FUNCTIONS = frozenset(f for f in (F.layer_norm, getattr(F, "rms_norm", None)) if f is not None)
_BINARY_MINMAX = {torch.min, torch.max, "min", "max"}  # element-wise only with a tensor second operand
_METADATA_ATTRS = {"dtype", "device"}

POINTWISE_METHODS = frozenset(_FUNCTION_NAMES | {
    "float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "__mul__", "__rmul__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__pow__", "__gt__", "__lt__", "__ge__",
    "__le__", "__eq__", "__ne__",
})

# torch.nn modules that act element by element (leaves under the default tracer rule).
POINTWISE_MODULES = (
    nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Hardtanh, nn.Threshold, nn.Dropout, nn.Identity,
)
_NORM_MODULES = tuple(m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if m is not None)

# casts and layout copies: row-wise steps that change no value's meaning
CAST_TARGETS = {"float", "to", "type_as", "contiguous", "half", "bfloat16", "double"}

RANDOM_TARGETS = frozenset({F.dropout, torch.dropout, torch.nn.functional.alpha_dropout})


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(str(node.target))


def is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if ``node`` applies an element-wise op (broadcasting only constants and per-feature params)."""
    if node.op in ("call_function", "call_method") and node.target in _BINARY_MINMAX:
        return len(node.args) == 2 and isinstance(node.args[1], fx.Node) and not node.kwargs
    if _is_row_reduction(node):
        return True
    if node.op == "call_function":
        return node.target in POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in POINTWISE_METHODS
    if node.op == "call_module":
        module = _module(gm, node)
        if isinstance(module, _NORM_MODULES):  # normalizes each row over its features only
            shape = getattr(module, "normalized_shape", None)
            return shape is not None and len(shape) == 1
        return isinstance(module, POINTWISE_MODULES)
    return False


def _is_row_reduction(node: fx.Node) -> bool:
    """``x.mean(-1, keepdim=True)`` and friends, ``F.layer_norm(x, (d,), ...)``: within one row."""
    if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 1
    is_reduction = (node.op == "call_method" and node.target in _ROW_REDUCTIONS) or (
        node.op == "call_function" and node.target in _ROW_FUNCTIONS)
    if not is_reduction:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim in (-1, (-1,), [-1]) and node.kwargs.get("keepdim", False) is True


def is_row_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A norm module or function, or a reduction over the features: token-wise, but no activation."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _NORM_MODULES)
    return _is_row_reduction(node) or node.target in ("rsqrt", torch.rsqrt)


def is_metadata(node: fx.Node) -> bool:
    """``x.dtype`` / ``x.device`` / ``x.size(-1)`` / ``x.shape[-1]``: a value about a tensor, not computed from
    its rows (the last dim is the features; a row count would change from shard to shard, so it is not one).
    ``x.shape`` counts as metadata where it is only ever indexed by ``-1``."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        if node.args[1] == "shape":
            return bool(node.users) and all(is_metadata(u) for u in node.users)
        return node.args[1] in _METADATA_ATTRS
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        return source.target is getattr and source.args[1:] == ("shape",) and node.args[1] == -1
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == -1
    return False


def is_random(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if the op draws random numbers (so a recompute must replay the forward's RNG)."""
    if node.op == "call_function":
        return node.target in RANDOM_TARGETS
    if node.op == "call_method":
        return node.target in ("dropout", "bernoulli", "bernoulli_")
    if node.op == "call_module":
        return isinstance(_module(gm, node), nn.Dropout)
    return False


def static_operand_ok(value: object) -> bool:
    """A parameter operand of an element-wise op may broadcast over features, never over tokens.

    ``x * self.scale`` with ``scale`` of shape ``[I]`` is token-wise; ``x + self.pos_bias`` with a
    ``[seq, I]`` table is not (a shard of rows would meet the wrong table rows).
    """
    if not isinstance(value, torch.Tensor):
        return True
    return value.dim() <= 1 or all(s == 1 for s in value.shape[:-1])

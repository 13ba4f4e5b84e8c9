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

__all__ = ["RANDOM_TARGETS", "is_pointwise", "is_random", "static_operand_ok"]

_FUNCTION_NAMES = {
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish",
    "hardsigmoid", "sigmoid", "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid", "hardtanh",
    "threshold", "dropout", "exp", "expm1", "log", "log1p", "erf", "erfc", "square", "sqrt", "rsqrt",
    "abs", "neg", "clamp", "clip", "clamp_min", "clamp_max", "where", "minimum", "maximum", "sin",
    "cos", "mul", "add", "sub", "div", "true_divide", "pow", "expit", "reciprocal", "sign", "gelu_",
}
_FUNCTION_MODULES = (torch, F, torch._C._nn, torch.special)
POINTWISE_FUNCTIONS = frozenset(
    getattr(mod, name) for mod in _FUNCTION_MODULES for name in _FUNCTION_NAMES if hasattr(mod, name)
) | {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow}

POINTWISE_METHODS = frozenset(_FUNCTION_NAMES | {
    "float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "__mul__", "__rmul__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__pow__",
})

# torch.nn modules that act element by element (leaves under the default tracer rule).
POINTWISE_MODULES = (
    nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Hardtanh, nn.Threshold, nn.Dropout, nn.Identity,
)

RANDOM_TARGETS = frozenset({F.dropout, torch.dropout, torch.nn.functional.alpha_dropout})


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(str(node.target))


def is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if ``node`` applies an element-wise op (broadcasting only constants and per-feature params)."""
    if node.op == "call_function":
        return node.target in POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in POINTWISE_METHODS
    if node.op == "call_module":
        return isinstance(_module(gm, node), POINTWISE_MODULES)
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

"""The explicit-matmul fast path: used exactly where the region is plain linears + a parameter-free
activation, and equal to the untouched module and to the generic (torch.func.vjp) kernel."""

from __future__ import annotations

import copy

import pytest
import torch

import fxtile
import fxtile.testing
import modules as M
from helpers import assert_same_outputs_and_grads, ran_tiled, tiny_causal_lm


def _mlp(name):
    return {
        "llama": lambda: tiny_causal_lm("llama").model.layers[0].mlp,
        "phi3_fused": lambda: tiny_causal_lm("phi3").model.layers[0].mlp,
        "gpt2_conv1d": lambda: tiny_causal_lm("gpt2").transformer.h[0].mlp,
        "fused_up_first": M.FusedUpFirst,
        "fused_split_bias": M.FusedSplit,
        "functional": M.Functional,
    }[name]()


@pytest.mark.parametrize("name", ["llama", "phi3_fused", "gpt2_conv1d", "fused_up_first", "fused_split_bias", "functional"])
def test_fast_path_is_used_and_matches_the_untouched_module_and_the_generic_kernel(name):
    torch.manual_seed(0)
    model = _mlp(name).float()
    hidden = next(m.hidden_size for m in fxtile.find(model))
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    assert fxtile.testing.fast_paths(tiled) == [True]
    x = torch.randn(2, 11, hidden, requires_grad=True)
    assert_same_outputs_and_grads(model, tiled, x)
    fast, generic = (fxtile.transform(copy.deepcopy(model), shards=3) for _ in range(2))
    with fxtile.testing.generic_kernel(generic):  # the generic copy's regions recompute through autograd
        assert_same_outputs_and_grads(fast, generic, x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [M.Odd, M.ParamAct])
def test_generic_kernel_is_used_for_other_shapes(cls):
    tiled = fxtile.transform(cls(), shards=2)
    assert fxtile.testing.fast_paths(tiled) == [False]


def test_fast_path_with_frozen_weights_and_no_input_grad():
    model = _mlp("llama")
    model.gate_proj.weight.requires_grad_(False)
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    assert fxtile.testing.fast_paths(tiled) == [True]
    assert ran_tiled(tiled, lambda: assert_same_outputs_and_grads(model, tiled, torch.randn(2, 5, 32))) == (3, 3)
    assert tiled.gate_proj.weight.grad is None and tiled.up_proj.weight.grad is not None


def test_fast_path_bf16_grads_are_as_close_to_fp64_as_the_untiled_module():
    torch.manual_seed(0)
    ref64 = M.Functional(h=64, i=256).double()
    x64 = torch.randn(4, 256, 64, dtype=torch.float64, requires_grad=True)
    ref64(x64).square().mean().backward()
    low = copy.deepcopy(ref64).to(torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(low), shards=16)
    assert fxtile.testing.fast_paths(tiled) == [True]
    errors = {}
    for name, model in (("untiled", low), ("tiled", tiled)):
        x = x64.detach().to(torch.bfloat16).requires_grad_()
        model(x).float().square().mean().backward()
        errors[name] = max(
            ((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()).item()
            for p, q in zip(model.parameters(), ref64.parameters())
        )
    assert errors["tiled"] <= errors["untiled"] * 1.05 + 1e-6, errors


@pytest.mark.parametrize(
    "make, pattern, fast", [(M.PlainSwish, "plain", True), (lambda: M.PlainSwish(inplace_relu=True), "plain", False),
                            (M.FusedPartial, "gated_fused", False)],
    ids=["plain_t_times_sigmoid_t", "inplace_relu", "fused_partial_slices"],
)
def test_shapes_the_fast_path_must_not_misread_stay_exact(make, pattern, fast):
    """``t * sigmoid(t)`` is a plain MLP's activation, not a fused gate (fast path); an in-place activation
    (its vjp would need the overwritten input) and slices that do not split the whole projection in two take
    the generic kernel; either way the gradients are exact."""
    torch.manual_seed(0)
    model = make()
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    assert [(m.pattern, m.tiled) for m in fxtile.find(tiled)] == [(pattern, True)]
    assert fxtile.testing.fast_paths(tiled) == [fast]
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 7, 12, requires_grad=True))

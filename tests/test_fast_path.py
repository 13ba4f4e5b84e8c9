"""The explicit-matmul fast path: used exactly where the region is plain linears + a parameter-free
activation, and equal to the untouched module and to the generic (torch.func.vjp) kernel."""

from __future__ import annotations

import copy

import pytest
import torch

import fxtile
import fxtile.op as op
import modules as M
from helpers import assert_same_outputs_and_grads, tiny_causal_lm


def _mlp(name):
    return {
        "llama": lambda: tiny_causal_lm("llama").model.layers[0].mlp,
        "phi3_fused": lambda: tiny_causal_lm("phi3").model.layers[0].mlp,
        "gpt2_conv1d": lambda: tiny_causal_lm("gpt2").transformer.h[0].mlp,
        "fused_up_first": M.FusedUpFirst,
        "fused_split_bias": M.FusedSplit,
        "functional": M.Functional,
    }[name]()


def _plans(model):
    return [op._TEMPLATES[node.target.template_id].fast
            for m in model.modules() if "_fxtile" in m.__dict__
            for node in m._fxtile.graph_module.graph.nodes if isinstance(node.target, op.TiledRegion)]


@pytest.mark.parametrize("name", ["llama", "phi3_fused", "gpt2_conv1d", "fused_up_first", "fused_split_bias", "functional"])
def test_fast_path_is_used_and_matches_the_untouched_module_and_the_generic_kernel(name, monkeypatch):
    torch.manual_seed(0)
    model = _mlp(name).float()
    hidden = next(m.hidden_size for m in fxtile.find(model))
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    assert all(p is not None for p in _plans(tiled)) and _plans(tiled)
    x = torch.randn(2, 11, hidden, requires_grad=True)
    assert_same_outputs_and_grads(model, tiled, x)
    fast, generic = (fxtile.transform(copy.deepcopy(model), shards=3) for _ in range(2))
    fast_ids = {n.target.template_id for m in fast.modules() if "_fxtile" in m.__dict__
                for n in m._fxtile.graph_module.graph.nodes if isinstance(n.target, op.TiledRegion)}
    real_plan = op.fast_plan  # the generic copy's regions take the torch.func.vjp kernel
    monkeypatch.setattr(op, "fast_plan", lambda region, *a: real_plan(region, *a) if region in fast_ids else None)
    assert_same_outputs_and_grads(fast, generic, x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [M.Odd, M.ParamAct])
def test_generic_kernel_is_used_for_other_shapes(cls):
    tiled = fxtile.transform(cls(), shards=2)
    assert _plans(tiled) == [None]


def test_fast_path_with_frozen_weights_and_no_input_grad():
    model = _mlp("llama")
    model.gate_proj.weight.requires_grad_(False)
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 5, 32))
    assert tiled.gate_proj.weight.grad is None and tiled.up_proj.weight.grad is not None


def test_fast_path_bf16_grads_are_as_close_to_fp64_as_the_untiled_module():
    torch.manual_seed(0)
    ref64 = M.Functional(h=64, i=256).double()
    x64 = torch.randn(4, 256, 64, dtype=torch.float64, requires_grad=True)
    ref64(x64).square().mean().backward()
    low = copy.deepcopy(ref64).to(torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(low), shards=16)
    assert _plans(tiled) != [None]
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
    "make", [M.PlainSwish, lambda: M.PlainSwish(inplace_relu=True), M.FusedPartial],
    ids=["plain_t_times_sigmoid_t", "inplace_relu", "fused_partial_slices"],
)
def test_shapes_the_fast_path_must_not_misread_stay_exact(make):
    """``t * sigmoid(t)`` is no fused gate; an in-place activation and slices that do not split the whole
    projection in two take a path that handles them; either way the gradients are exact."""
    torch.manual_seed(0)
    model = make()
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    plans = _plans(tiled)
    assert plans and all(p is None or p.kind != "gated_fused" for p in plans)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 7, 12, requires_grad=True))

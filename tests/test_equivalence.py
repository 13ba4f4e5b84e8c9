"""Invariant 1: a tiled model computes the same outputs and the same gradients (input and every
parameter) as the untouched one, for real architectures and for hand-written MLPs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtile
import modules as M
from fxtile.kernels.shards import shard_bounds
from helpers import assert_same_outputs_and_grads, profiled_matmuls, ran_tiled, tiled_copy, tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]
EXPECTED_PATTERN = {"phi3": "gated_fused", "gpt2": "plain"}


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_causal_lm_logits_and_every_grad_match(arch):
    model = tiny_causal_lm(arch)
    tiled = tiled_copy(model, shards=3)
    matches = fxtile.find(tiled)
    assert len(matches) == 2 and all(m.tiled for m in matches), "both decoder layers must be tiled"
    assert {m.pattern for m in matches} == {EXPECTED_PATTERN.get(arch, "gated")}
    ids = torch.randint(0, 97, (2, 13))  # batch 2, odd length: shards of 9, 9 and 8 rows
    assert_same_outputs_and_grads(model, tiled, ids, out_fn=lambda o: o.logits, atol=2e-5, rtol=1e-4)


HAND_WRITTEN = {
    "gated_swapped_biased": (M.Odd, "gated"),
    "fused_slices_up_first": (M.FusedUpFirst, "gated_fused"),
    "fused_split_relu2": (M.FusedSplit, "gated_fused"),
    "plain_param_act_dropout": (M.ParamAct, "plain"),
    "functional_linear": (M.Functional, "gated"),
    "residual_block_with_norm": (M.Residual, "gated"),
    "flat_residual_block": (M.FlatResidual, "gated"),
    "nested_stack": (M.Stack, None),
}


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_hand_written_mlps_match_by_shape_and_stay_exact(name):
    cls, pattern = HAND_WRITTEN[name]
    torch.manual_seed(0)
    model = cls()
    tiled = tiled_copy(model, shards=4)
    if pattern is not None:
        assert [m.pattern for m in fxtile.find(tiled)] == [pattern]
    x = torch.randn(3, 7, 12, requires_grad=True)
    assert_same_outputs_and_grads(model, tiled, x)


def test_roles_are_found_by_shape_not_by_name():
    (match,) = fxtile.find(M.Odd())
    assert dict(match.roles) == {"gate": "wa", "up": "wb", "down": "wo", "act": "nonlin"}
    assert (match.hidden_size, match.intermediate_size) == (12, 28)
    (fused,) = fxtile.find(M.FusedUpFirst())
    assert dict(fused.roles) == {"gate_up": "both", "down": "back"} and fused.activation == "gelu_tanh"
    (plain,) = fxtile.find(M.ParamAct())
    assert dict(plain.roles) == {"fc1": "expand", "fc2": "squeeze", "act": "act"}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), seq=st.integers(1, 17), shards=st.integers(1, 40),
    transpose=st.booleans(), x_grad=st.booleans(),
)
def test_any_shape_any_shard_count(batch, seq, shards, transpose, x_grad):
    """More shards than tokens, one token, uneven shards, non-contiguous input, input without grad."""
    torch.manual_seed(1)
    model = M.Odd()
    tiled = fxtile.transform(copy.deepcopy(model), shards=shards)
    x = torch.randn(seq, batch, 12).transpose(0, 1) if transpose else torch.randn(batch, seq, 12)
    assert x.is_contiguous() != transpose or batch == 1 or seq == 1
    x.requires_grad_(x_grad)
    ran = ran_tiled(tiled, lambda: assert_same_outputs_and_grads(model, tiled, x))
    expected = min(shards, batch * seq)  # the op clamps the shards to the rows
    assert ran == ((expected, expected) if shards > 1 else (0, 0)), (ran, expected)  # shards=1: the region itself


def test_weights_get_grads_when_the_input_needs_none():
    model = M.Odd()
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 5, 12)  # requires_grad=False: only the weights are leaves
    tiled(x).sum().backward()
    assert all(p.grad is not None for p in tiled.parameters())


def test_frozen_weights_get_no_grad_and_the_input_still_does():
    model = M.Odd()
    for p in model.wa.parameters():
        p.requires_grad_(False)
    tiled = tiled_copy(model, shards=3)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 5, 12, requires_grad=True))
    assert tiled.wa.weight.grad is None


def test_no_grad_inference_runs_forward_shards_only():
    model = M.Odd()
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        forward, recomputed = ran_tiled(tiled, lambda: torch.testing.assert_close(tiled(x), model(x), rtol=0, atol=1e-6))
    assert (forward, recomputed) == (3, 0), "three forward shards and no recompute"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_are_as_close_to_fp64_as_the_untiled_module(dtype):
    """Tolerance, justified: bf16/fp16 cannot match bit for bit (shard sums reorder), so the bar is
    the untiled module's own error against an fp64 reference; weight grads accumulate in fp32."""
    torch.manual_seed(0)
    ref64 = M.Odd(h=64, i=256).double()
    x64 = torch.randn(4, 256, 64, dtype=torch.float64, requires_grad=True)
    ref64(x64).square().mean().backward()
    low = copy.deepcopy(ref64).to(dtype)
    tiled = fxtile.transform(copy.deepcopy(low), shards=16)
    errors = {}
    for name, model in (("untiled", low), ("tiled", tiled)):
        x = x64.detach().to(dtype).requires_grad_()
        model(x).float().square().mean().backward()
        errors[name] = max(
            ((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()).item()
            for p, q in zip(model.parameters(), ref64.parameters())
        )
    assert errors["tiled"] <= errors["untiled"] * 1.05 + 1e-6, errors


@pytest.mark.parametrize("cls", [M.Odd, M.Functional], ids=["generic_kernel", "fast_path_region"])
def test_autocast_recompute_runs_under_the_forwards_autocast_state(cls):
    """Reference: the same shards through the untouched module under autocast with autograd kept. A
    recompute outside autocast (fp32 matmuls) would give gradients of a different function."""
    torch.manual_seed(0)
    model = cls(h=32, i=64)
    tiled = tiled_copy(model, shards=4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiled(x)
    assert out.dtype == torch.bfloat16
    matmuls = profiled_matmuls(lambda: out.float().sum().backward())  # outside autocast, as in training
    dtypes = {str(d) for _, _, types in matmuls for d in types if d in ("float", "c10::BFloat16")}
    assert matmuls and dtypes == {"c10::BFloat16"}, f"the recompute's matmuls ran in {dtypes}, not bf16"
    rows = x.detach().reshape(-1, 32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.cat([model(rows[lo:hi]) for lo, hi in shard_bounds(18, 4)])
    ref.float().sum().backward()
    assert torch.equal(out.reshape(-1, 32), ref)
    # Gradients: the same bf16 products per shard, summed in another order: up to two bf16 roundings
    # (2 x 2^-8 relative) apart at grad magnitudes of a few units
    torch.testing.assert_close(x.grad.reshape(-1, 32), rows.grad, rtol=2**-7, atol=2e-2)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2**-7, atol=2e-2, msg=lambda m: f"{name}: {m}")


def test_dropout_recompute_replays_the_forwards_masks():
    """With dropout inside the region, the backward must differentiate the forward that ran."""
    torch.manual_seed(0)
    model = M.ParamAct(p=0.5).train()
    tiled = tiled_copy(model, shards=3)
    assert fxtile.find(tiled)[0].nodes[-2:] == ("drop", "squeeze")
    x = torch.randn(2, 6, 12, requires_grad=True)
    torch.manual_seed(123)
    out = tiled(x)
    out.sum().backward()
    # Reference: the same shards with autograd kept, from the same RNG state.
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    rows = x.detach().reshape(-1, 12).requires_grad_()
    ref_out = torch.cat([reference(rows[lo:hi]) for lo, hi in shard_bounds(12, 3)])
    ref_out.sum().backward()
    torch.testing.assert_close(out.reshape(-1, 12), ref_out)
    torch.testing.assert_close(x.grad.reshape(-1, 12), rows.grad)
    for p, q in zip(reference.parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad)

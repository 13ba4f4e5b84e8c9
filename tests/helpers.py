"""Shared test helpers: tiny real architectures and the forward+every-gradient comparison."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxtile

TINY = dict(
    hidden_size=32, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=97, max_position_embeddings=128, head_dim=8,
)


def tiny_causal_lm(arch: str) -> nn.Module:
    """A tiny random transformers causal LM of ``arch``, built from its config class (no download)."""
    import transformers as T

    torch.manual_seed(0)
    if arch == "gpt2":
        config = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=128,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return T.GPT2LMHeadModel(config).eval()
    cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
    }[arch]
    extra = {"hidden_activation": "gelu_pytorch_tanh"} if arch == "gemma" else {}
    if arch == "phi3":
        extra = {"pad_token_id": 0}
    return cls[1](cls[0](**TINY, **extra)).eval()


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Parameter grads by name (a ``torch.compile`` wrapper's ``_orig_mod.`` prefix removed)."""
    return {
        n.removeprefix("_orig_mod."): (p.grad.clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
    }


def assert_same_outputs_and_grads(
    reference: nn.Module, tiled: nn.Module, *inputs: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
    out_fn=lambda out: out,
) -> float:
    """Run both models forward and backward on the same inputs; compare outputs, input grads and
    every parameter grad. Returns the largest absolute difference seen."""
    ref_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    til_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    ref_out, til_out = out_fn(reference(*ref_in)), out_fn(tiled(*til_in))
    torch.testing.assert_close(til_out, ref_out, atol=atol, rtol=rtol, msg=lambda m: f"outputs differ: {m}")
    cotangent = torch.randn_like(ref_out)
    (ref_out * cotangent).sum().backward()
    (til_out * cotangent).sum().backward()
    worst = (til_out - ref_out).abs().max().item()
    for a, b in zip(ref_in, til_in):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=rtol, msg=lambda m: f"input grad differs: {m}")
            worst = max(worst, (b.grad - a.grad).abs().max().item())
    ref_grads, til_grads = grads_of(reference), grads_of(tiled)
    assert ref_grads.keys() == til_grads.keys()
    checked = 0
    for name, g in ref_grads.items():
        if g is None:
            assert til_grads[name] is None, f"{name}: tiled model has a gradient the reference does not"
            continue
        assert til_grads[name] is not None, f"{name}: tiled model lost the gradient"
        torch.testing.assert_close(til_grads[name], g, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")
        worst = max(worst, (til_grads[name] - g).abs().max().item())
        checked += 1
    assert checked > 0, "no parameter received a gradient: the comparison would be vacuous"
    return worst


def tiled_copy(model: nn.Module, shards: object = 3, **kwargs) -> nn.Module:
    tiled = fxtile.transform(copy.deepcopy(model), shards=shards, **kwargs)
    tiled_matches = [m for m in fxtile.find(tiled) if m.tiled]
    assert tiled_matches, "at least one MLP must be tiled to actually perform the test"
    return tiled


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def profiled_matmuls(fn) -> list[tuple[str, list, list]]:
    """(name, input shapes, input dtypes) of every matmul kernel ``fn()`` runs, in order, seen by the
    profiler (it sees inside the tiled custom op, where a TorchDispatchMode does not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::bmm")
    # the kernel that ran, not a dispatcher layer above it (autocast re-dispatches aten::mm in bf16)
    events = sorted((e for e in prof.events() if e.name in names and not any(c.name == e.name for c in e.cpu_children)),
                    key=lambda e: e.time_range.start)
    # torch < 2.13's FunctionEvent has no input_dtypes: the kineto event with the same id has them
    by_id = {k.correlation_id(): k.dtypes() for k in prof.profiler.kineto_results.events()}
    return [(e.name, e.input_shapes, getattr(e, "input_dtypes", None) or by_id.get(e.id, [])) for e in events]


def ran_tiled(model, step) -> tuple[int, int]:
    """(forward shards, recomputed shards) the op ran for ``model``'s tiled blocks during ``step()``."""
    from fxtile import testing

    before = testing.shard_counts(model)
    step()
    after = testing.shard_counts(model)
    zero = testing.ShardCount(0, 0, 0, 0)
    fwd = sum(c.forward_shards - before.get(p, zero).forward_shards for p, c in after.items())
    bwd = sum(c.backward_shards - before.get(p, zero).backward_shards for p, c in after.items())
    return fwd, bwd

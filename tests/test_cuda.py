"""On a CUDA device: the claims whose truth depends on the device, mirrored from the CPU tests.

What differs on CUDA and is checked here: cuBLAS matmuls and the fp32 accumulation of bf16/fp16
weight gradients (``addmm(out_dtype=float32)``, a path CPU never takes), the CUDA generator that
dropout draws from (its state is saved and replayed by the recompute), ``torch.autocast("cuda")``,
the loss head's kernels and their peak memory (``torch.cuda.max_memory_allocated``), and inductor's
Triton code generation under ``torch.compile``. Every test goes through the public API, compares with
the untouched module, and observes that the op really ran in shards (``fxtile.testing.shard_counts``).
CPU counterparts: tests/test_equivalence.py, test_fast_path.py, test_loss.py, test_compile.py and
test_stacks.py. Skipped, with the reason, where ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import fxtile
import fxtile.testing
import modules as M
from fxtile.kernels.shards import shard_bounds
from helpers import TINY, assert_same_outputs_and_grads, grads_of, profiled_matmuls, ran_tiled, tiled_copy, tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")

DEVICE = "cuda"
V = TINY["vocab_size"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _transformers():
    return pytest.importorskip("transformers")


def _lm(arch: str) -> nn.Module:
    """A tiny causal LM on the device, in training mode (what a training call runs)."""
    T = _transformers()
    torch.manual_seed(0)
    if arch == "gemma2_softcap":
        config = T.Gemma2Config(**TINY, final_logit_softcapping=3.0, attn_logit_softcapping=None, query_pre_attn_scalar=8)
        model = T.Gemma2ForCausalLM(config)
    elif arch == "qwen2_tied":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**TINY, tie_word_embeddings=True))
    else:
        model = tiny_causal_lm(arch)
    return model.to(DEVICE).train()


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), out, grads_of(model)


def _relative_grad_error(model: nn.Module, reference: nn.Module) -> float:
    """max over parameters of max|grad - reference grad| / max|reference grad| (reference in fp64)."""
    return max(((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()).item()
               for p, q in zip(model.parameters(), reference.parameters()))


def _peak_bytes(step) -> int:
    """Peak bytes the caching allocator handed out above what was allocated before ``step()``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# --- 1. exact in fp32 on cuBLAS; the self-check runs on the device --------------------------------


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_causal_lm_logits_and_every_grad_match_on_cuda(arch):
    model = _lm(arch).eval()
    tiled = tiled_copy(model, shards=3)
    matches = fxtile.find(tiled)
    assert len(matches) == 2 and all(m.tiled and m.verified for m in matches), [m.check for m in matches]
    ids = torch.randint(0, V, (2, 13), device=DEVICE)  # 26 rows: shards of 9, 9 and 8
    ran = ran_tiled(tiled, lambda: assert_same_outputs_and_grads(model, tiled, ids, out_fn=lambda o: o.logits,
                                                                 atol=2e-5, rtol=1e-4))
    assert ran == (6, 6), f"both layers in 3 shards forward and 3 recomputed, ran {ran}"


@pytest.mark.parametrize("cls, fast", [(M.Functional, True), (M.Odd, False)], ids=["fast_path", "generic_kernel"])
def test_mlp_kernels_are_exact_on_cuda(cls, fast):
    torch.manual_seed(0)
    model = cls(h=64, i=256).to(DEVICE)
    tiled = tiled_copy(model, shards=5)
    assert fxtile.testing.fast_paths(tiled) == [fast]
    x = torch.randn(3, 77, 64, device=DEVICE, requires_grad=True)
    assert ran_tiled(tiled, lambda: assert_same_outputs_and_grads(model, tiled, x)) == (5, 5)


# --- 2. bf16 / fp16 against an fp64 reference ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls, fast", [(M.Functional, True), (M.Odd, False)], ids=["fast_path", "generic_kernel"])
def test_low_precision_grads_are_as_close_to_fp64_as_the_untiled_module_on_cuda(cls, fast, dtype):
    """Tolerance, justified as on CPU: the bar is the untiled module's own error against fp64. On CUDA the
    weight-gradient sums over shards run as ``addmm(out_dtype=float32)`` (fp32 sums of low-precision
    products), a path the CPU tests never reach."""
    torch.manual_seed(0)
    ref64 = cls(h=256, i=1024).to(DEVICE, torch.float64)
    x64 = torch.randn(4, 1024, 256, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ref64(x64).square().mean().backward()
    low = copy.deepcopy(ref64).to(dtype)
    tiled = fxtile.transform(copy.deepcopy(low), shards=16)
    assert fxtile.testing.fast_paths(tiled) == [fast]
    errors = {}
    for name, model in (("untiled", low), ("tiled", tiled)):
        x = x64.detach().to(dtype).requires_grad_()
        ran = ran_tiled(model, lambda: model(x).float().square().mean().backward())
        assert ran == ((16, 16) if name == "tiled" else (0, 0)), ran
        errors[name] = _relative_grad_error(model, ref64)
    assert all(p.grad.dtype == dtype for p in tiled.parameters())
    assert errors["tiled"] <= errors["untiled"] * 1.05 + 1e-6, errors


def test_bf16_loss_head_is_as_close_to_fp64_as_the_untiled_model_on_cuda():
    model = _lm("llama")
    ids = torch.randint(0, V, (2, 64), device=DEVICE)
    _, _, exact = _step(copy.deepcopy(model).double(), input_ids=ids, labels=ids)
    low = copy.deepcopy(model).to(torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(low), shards=4, loss=True)
    errors = {}
    for name, m in (("untiled", low), ("tiled", tiled)):
        loss, out, grads = _step(m, input_ids=ids, labels=ids)
        assert loss.dtype == torch.float32, "transformers' loss upcasts the logits to fp32"
        errors[name] = max((grads[n].double() - g).abs().max().item() / g.abs().max().item()
                           for n, g in exact.items() if g is not None)
    assert out.logits is None and fxtile.testing.shard_counts(tiled)[""].forward_shards == 4
    assert errors["tiled"] <= errors["untiled"] * 1.1 + 1e-6, errors


# --- 3. dropout: the recompute replays the CUDA generator's draws -------------------------------------


def _shard_wise_reference(block, x, shards, seed):
    """The untouched block on the same row shards from the same generator state, with autograd."""
    rows = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    torch.manual_seed(seed)
    out = torch.cat([block(rows[lo:hi]) for lo, hi in shard_bounds(rows.shape[0], shards)])
    return rows, out


def _assert_replays_its_own_draws(block, x, shards=3, seed=5, compile_backend=None):
    """The tiled block's output and gradients are those of the forward it ran (same shards, same seed),
    and its backward leaves the caller's CUDA generator where the forward left it."""
    tiled = tiled_copy(block, shards=shards)
    run = torch.compile(tiled, fullgraph=True, backend=compile_backend) if compile_backend else tiled
    xt = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = run(xt)
    after_forward = torch.cuda.get_rng_state()
    cot = torch.randn_like(out)
    before_backward = torch.cuda.get_rng_state()
    ran = ran_tiled(tiled, lambda: (out * cot).sum().backward())
    assert ran == (0, shards), f"the backward recomputed {ran[1]} shards, not {shards}"
    assert torch.equal(torch.cuda.get_rng_state(), before_backward), "the recompute moved the caller's generator"
    reference = copy.deepcopy(block)
    rows, ref = _shard_wise_reference(reference, x, shards, seed)
    assert torch.equal(torch.cuda.get_rng_state(), after_forward), "the tiled forward drew other numbers"
    (ref * cot.reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xt.grad.reshape(rows.shape), rows.grad, rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, p), q in zip(reference.named_parameters(), tiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked, "no parameter got a gradient"
    return tiled


def test_dropout_recompute_replays_the_cuda_generators_masks():
    torch.manual_seed(0)
    block = M.ParamAct(h=32, i=96, p=0.5).to(DEVICE).train()
    tiled = _assert_replays_its_own_draws(block, torch.randn(2, 45, 32, device=DEVICE))
    assert fxtile.find(tiled)[0].nodes[-2:] == ("drop", "squeeze")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dropout_in_a_compiled_tiled_region_replays_on_cuda(backend):
    torch.manual_seed(0)
    block = M.ParamAct(h=32, i=96, p=0.5).to(DEVICE).train()
    _assert_replays_its_own_draws(block, torch.randn(2, 45, 32, device=DEVICE), compile_backend=backend)


def test_peft_lora_dropout_is_replayed_on_cuda():
    T, peft = _transformers(), pytest.importorskip("peft")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**TINY))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                       lora_dropout=0.5))
    for n, p in lora.named_parameters():  # non-zero B so every LoRA weight gets a gradient
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    block = lora.base_model.model.model.layers[0].mlp.to(DEVICE).train()
    _assert_replays_its_own_draws(block, torch.randn(2, 7, TINY["hidden_size"], device=DEVICE))


# --- 4. torch.autocast("cuda") ---------------------------------------------------------------------------


def _matmul_dtypes(fn) -> set[str]:
    return {str(d) for _, _, types in profiled_matmuls(fn) for d in types if d in ("float", "c10::BFloat16")}


@pytest.mark.parametrize("cls", [M.Odd, M.Functional], ids=["generic_kernel", "fast_path_region"])
def test_autocast_recompute_runs_under_the_forwards_autocast_state_on_cuda(cls):
    torch.manual_seed(0)
    model = cls(h=32, i=64).to(DEVICE)
    tiled = tiled_copy(model, shards=4)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tiled(x)
    assert out.dtype == torch.bfloat16
    dtypes = _matmul_dtypes(lambda: out.float().sum().backward())  # outside autocast, as in training
    assert dtypes == {"c10::BFloat16"}, f"the recompute's matmuls ran in {dtypes}, not bf16"
    assert fxtile.testing.shard_counts(tiled)[""].backward_shards == 4
    rows = x.detach().reshape(-1, 32).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = torch.cat([model(rows[lo:hi]) for lo, hi in shard_bounds(18, 4)])
    ref.float().sum().backward()
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad.reshape(-1, 32), rows.grad, rtol=2**-7, atol=2e-2)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2**-7, atol=2e-2, msg=lambda m: f"{name}: {m}")


def test_tiled_loss_under_autocast_runs_its_shards_in_bf16_on_cuda():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    losses = []
    for m in (model, tiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2**-7, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2**-6, atol=2e-3, msg=lambda m: f"{name}: {m}")
    head = tiled.lm_head.weight.shape
    with torch.autocast("cuda", dtype=torch.bfloat16):
        matmuls = profiled_matmuls(lambda: tiled(input_ids=ids, labels=ids))
    logits = [types for name, shapes, types in matmuls if any(list(s) == [head[1], head[0]] for s in shapes[1:2])]
    assert logits and all("c10::BFloat16" in types for types in logits), matmuls
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards == 6


def test_compiled_tiled_mlp_keeps_the_callers_autocast_on_cuda():
    torch.manual_seed(0)
    model = tiny_causal_lm("llama").model.layers[0].mlp.to(DEVICE)
    untiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    tiled_eager = fxtile.transform(copy.deepcopy(model), shards=3)
    tiled = torch.compile(tiled_eager, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 32, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = untiled(x), tiled(x)
        dtypes = _matmul_dtypes(lambda: tiled(x))  # compiled already: the profiler sees the op's kernel run
    assert got.dtype == expected.dtype == torch.bfloat16
    assert dtypes == {"c10::BFloat16"}, f"the compiled tiled MLP ran its matmuls in {dtypes}"
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-3)
    assert fxtile.testing.shard_counts(tiled_eager)[""].forward_shards == 6


# --- 5. the loss head ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2_tied", "gemma2_softcap", "gpt2"])
def test_causal_lm_loss_and_every_gradient_match_and_no_logits_are_kept_on_cuda(arch):
    model = _lm(arch)
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    (head,) = [m for m in fxtile.find(tiled, loss=True) if m.pattern == "linear_cross_entropy"]
    assert head.tiled and head.verified, head.check
    ids = torch.randint(0, V, (2, 13), device=DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100
    ref_loss, _, ref_grads = _step(model, input_ids=ids, labels=labels)
    before = fxtile.testing.shard_counts(tiled)[""]
    loss, out, grads = _step(tiled, input_ids=ids, labels=labels)
    after = fxtile.testing.shard_counts(tiled)[""]
    assert out.logits is None, "with the loss tiled the logits are never materialized"
    assert (after.forward_shards - before.forward_shards, after.backward_calls - before.backward_calls) == (3, 1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=2e-6)
    checked = 0
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), name
        if g is not None:
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked


def test_sum_reduction_with_num_items_in_batch_on_cuda():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=4, loss=True)
    ids = torch.randint(0, V, (3, 11), device=DEVICE)
    labels = ids.clone()
    labels[1] = -100
    count = torch.tensor(int((labels[:, 1:] != -100).sum()), device=DEVICE)
    ref_loss, _, ref_grads = _step(model, input_ids=ids, labels=labels, num_items_in_batch=count)
    loss, _, grads = _step(tiled, input_ids=ids, labels=labels, num_items_in_batch=count)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=2e-6)
    for name, g in ref_grads.items():
        if g is not None:
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards == 4


class _Head(nn.Module):
    """transformers' causal-LM head and loss on hidden states (labels already shifted)."""

    def __init__(self, hidden, vocab):
        super().__init__()
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, h, y):
        return F.cross_entropy(self.head(h).float().view(-1, self.head.out_features), y.view(-1))


def test_tiled_loss_peak_memory_on_cuda_holds_no_full_logits():
    """8192 tokens, V=32000, bf16 weights: untiled, the logits (bf16), their fp32 copy, the softmax and
    the gradients are each tokens x vocab (0.5-1 GiB); tiled, one shard of them at a time."""
    torch.manual_seed(0)
    tokens, hidden, vocab = 8192, 1024, 32000
    model = _Head(hidden, vocab).to(DEVICE, torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(model), loss=True)  # shards="auto"
    h0 = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), device=DEVICE)
    peaks, results = {}, {}
    for name, m in (("untiled", model), ("tiled", tiled)):
        def step(m=m, name=name):
            m.zero_grad(set_to_none=True)
            h = h0.clone().requires_grad_()
            loss = m(h, y)
            loss.backward()
            results[name] = (loss.detach(), h.grad, m.head.weight.grad)
        step()  # warm-up: cuBLAS workspaces and the allocator's pools belong to the process
        peaks[name] = _peak_bytes(step)
    logits_fp32 = tokens * vocab * 4
    assert peaks["untiled"] >= logits_fp32, peaks
    assert peaks["tiled"] <= 0.25 * peaks["untiled"], {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards > 1
    (ref_loss, ref_h, ref_w), (loss, gh, gw) = results["untiled"], results["tiled"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    # bf16 gradients: the two differ by bf16 roundings (2^-8 relative), judged against each gradient's scale
    for name, got, ref in (("hidden", gh, ref_h), ("weight", gw, ref_w)):
        error = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert error <= 2**-6, f"{name} gradient: relative error {error:.2e}"


def test_tiled_mlp_peak_memory_on_cuda_holds_no_full_intermediate():
    torch.manual_seed(0)
    tokens, hidden, inter = 16384, 1024, 4096
    model = M.Functional(h=hidden, i=inter).to(DEVICE, torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(model), shards="auto")
    x0 = torch.randn(1, tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn_like(x0)
    peaks = {}
    for name, m in (("untiled", model), ("tiled", tiled)):
        def step(m=m):
            m.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_()
            m(x).backward(dy)
        step()
        peaks[name] = _peak_bytes(step)
    intermediate = tokens * inter * 2  # one [tokens, intermediate] bf16 tensor
    assert peaks["untiled"] >= 2 * intermediate, peaks
    assert peaks["tiled"] <= 0.5 * peaks["untiled"], {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}
    assert fxtile.testing.shard_counts(tiled)[""].backward_shards > 1


# --- 6. torch.compile: inductor generates Triton code around the opaque tiled op ------------------------


@pytest.mark.parametrize("name", ["llama_mlp_fast_path", "odd_generic_kernel"])
def test_tiled_mlp_compiles_fullgraph_with_inductor_on_cuda_and_is_exact(name):
    torch.manual_seed(0)
    model = (tiny_causal_lm("llama").model.layers[0].mlp if name.startswith("llama") else M.Odd()).to(DEVICE)
    hidden = fxtile.find(model)[0].hidden_size
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    compiled = torch.compile(tiled, fullgraph=True)
    x = torch.randn(2, 9, hidden, device=DEVICE, requires_grad=True)
    assert ran_tiled(tiled, lambda: assert_same_outputs_and_grads(model, compiled, x)) == (3, 3)


def test_tiny_llama_with_its_loss_tiled_compiles_fullgraph_on_cuda_and_matches_eager():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(tiled, fullgraph=True, backend=counter)
    ids = torch.randint(0, V, (2, 13), device=DEVICE)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    assert out.logits is None and counter.frame_count == 1, "one graph: the tiled MLPs and loss add no break"
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards == 3


def test_compiled_tiled_loss_keeps_no_logits_for_backward_on_cuda():
    torch.manual_seed(0)
    tokens, hidden, vocab = 2048, 64, 4000
    model = _Head(hidden, vocab).to(DEVICE)
    h = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,), device=DEVICE)

    def saved(fn):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(h, y)
        loss.backward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(v for k, v in seen.items() if k not in params)

    untiled = saved(torch.compile(copy.deepcopy(model), fullgraph=True))
    tiled_model = fxtile.transform(copy.deepcopy(model), shards=8, loss=True)
    tiled = saved(torch.compile(tiled_model, fullgraph=True))
    assert untiled >= tokens * vocab * 4, "the untiled compiled graph keeps the logits"
    assert tiled <= (tokens * hidden + vocab * hidden) * 4 + 4096, f"tiled compiled graph kept {tiled} bytes"
    assert fxtile.testing.shard_counts(tiled_model)[""].forward_shards == 8


def test_dynamic_sequence_lengths_compile_once_on_cuda():
    torch.manual_seed(0)
    reference = M.Odd().to(DEVICE)
    model = fxtile.transform(copy.deepcopy(reference), shards=4)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for seq in (9, 17, 33):
        x = torch.randn(2, seq, 12, device=DEVICE)
        torch.testing.assert_close(compiled(x), reference(x))
    assert counter.frame_count == 1
    assert fxtile.testing.shard_counts(model)[""].forward_shards == 12

"""The output projection and its loss, tiled with ``loss=True``, found by graph shape.

Specification: a call that computes the loss with grad enabled returns the same loss and the same
gradient for every parameter and input (hidden states, the head's weight and bias, everything upstream)
as the untouched model, never holds more than one shard of logits, and returns ``logits=None``. Calls
without labels, without grad, in ``generate()`` and in evaluation return full logits as before. What
cannot be tiled is reported with its reason.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fxtile
import fxtile.testing
import modules as M
from helpers import TINY, grads_of, profiled_matmuls, ran_tiled

T = pytest.importorskip("transformers")

V = 97


def _lm(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0)
        return T.GPT2LMHeadModel(config).train()
    if arch == "qwen2_tied":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**TINY, tie_word_embeddings=True)).train()
    if arch == "gemma2_softcap":
        config = T.Gemma2Config(**TINY, final_logit_softcapping=3.0, attn_logit_softcapping=None, query_pre_attn_scalar=8)
        return T.Gemma2ForCausalLM(config).train()
    return T.LlamaForCausalLM(T.LlamaConfig(**TINY)).train()


def _labels(ids: torch.Tensor, ignored=()) -> torch.Tensor:
    labels = ids.clone()
    for index in ignored:
        labels[index] = -100
    return labels


def _step(model, **inputs):
    """One training call and its backward: (loss, output, grads by name)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), out, grads_of(model)


def _assert_same_loss_and_grads(reference, tiled, rtol=1e-5, atol=1e-6, **inputs):
    ref_loss, _, ref_grads = _step(reference, **inputs)
    loss, out, grads = _step(tiled, **inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert ref_grads.keys() == grads.keys()
    checked = 0
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), name
        if g is not None:
            torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 0
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2_tied", "gemma2_softcap", "gpt2"])
def test_causal_lm_loss_and_every_gradient_match_and_no_logits_are_kept(arch):
    model = _lm(arch)
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    head = [m for m in fxtile.find(tiled, loss=True) if m.pattern == "linear_cross_entropy"]
    assert len(head) == 1 and head[0].tiled and head[0].path == "" and head[0].vocab_size == V and head[0].intermediate_size is None
    assert head[0].activation == ("tanh" if arch == "gemma2_softcap" else "none")
    if arch == "qwen2_tied":
        assert tiled.lm_head.weight is tiled.model.embed_tokens.weight  # one parameter, one gradient
    ids = torch.randint(0, V, (2, 13))  # 26 rows in shards of 8, 9, 9
    labels = _labels(ids, [(0, slice(0, 4))])
    before = fxtile.testing.shard_counts(tiled)[""]
    out = _assert_same_loss_and_grads(model, tiled, rtol=1e-5, atol=2e-6, input_ids=ids, labels=labels)
    assert out.logits is None, "with the loss tiled the logits are never materialized"
    after = fxtile.testing.shard_counts(tiled)[""]
    assert after.forward_shards - before.forward_shards == 3 and after.backward_calls - before.backward_calls == 1


def test_sum_reduction_with_num_items_in_batch_as_the_trainer_passes_it():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=4, loss=True)
    ids = torch.randint(0, V, (3, 11))
    labels = _labels(ids, [(1, slice(None))])
    count = torch.tensor(int((labels[:, 1:] != -100).sum()))
    _assert_same_loss_and_grads(model, tiled, input_ids=ids, labels=labels, num_items_in_batch=count)


def test_rows_all_ignored_in_a_shard_and_in_the_whole_batch():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    ids = torch.randint(0, V, (2, 9))
    before = fxtile.testing.shard_counts(tiled)[""].forward_shards
    _assert_same_loss_and_grads(model, tiled, input_ids=ids, labels=_labels(ids, [(0, slice(None))]))
    ref_loss, _, ref_grads = _step(model, input_ids=ids, labels=torch.full_like(ids, -100))
    loss, _, grads = _step(tiled, input_ids=ids, labels=torch.full_like(ids, -100))
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards - before == 6  # both calls ran the loss tiled
    assert math.isnan(ref_loss.item()) and math.isnan(loss.item()), "a mean over no rows is NaN, as in torch"
    for name, g in ref_grads.items():
        if g is not None:
            torch.testing.assert_close(grads[name], g, msg=lambda m: f"{name}: {m}")


def test_calls_without_labels_without_grad_in_eval_and_generate_keep_their_logits():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    ids = torch.randint(0, V, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these calls is a loss fxtile failed to tile
        mlps = ran_tiled(tiled, lambda: torch.testing.assert_close(tiled(input_ids=ids).logits, model(input_ids=ids).logits))
        assert mlps[0] == 2 * 3  # the layers' MLPs ran tiled; the logits were asked for
        with torch.no_grad():
            got, ref = tiled(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
        torch.testing.assert_close(got.logits, ref.logits)
        torch.testing.assert_close(got.loss, ref.loss)
        tiled.eval(), model.eval()
        with torch.no_grad():
            torch.testing.assert_close(tiled(input_ids=ids, labels=ids).logits, model(input_ids=ids, labels=ids).logits)
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(tiled.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_a_training_call_without_labels_that_returns_long_logits_says_to_pass_the_labels():
    """The flow of DeepSpeed's and Accelerate's sequence-parallel examples (logits out of the model, the
    loss computed outside it) cannot tile the loss head: fxtile says so once, and what to do."""
    tiled = fxtile.transform(_lm("llama"), shards=fxtile.ShardPolicy(min_tokens=16), loss=True)
    ids = torch.randint(0, V, (2, 16))
    with pytest.warns(UserWarning, match=rf"called in training without labels and returned 32 x {V} logits.*Pass the labels"):
        F.cross_entropy(tiled(input_ids=ids).logits.flatten(0, 1), ids.flatten()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiled(input_ids=ids)  # said once
        tiled(input_ids=ids, labels=ids).loss.backward()  # the loss head runs tiled
    other = fxtile.transform(_lm("llama"), shards=fxtile.ShardPolicy(min_tokens=16), loss=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(input_ids=ids[:, :7])  # 14 rows: below the policy's min_tokens, a short call is no concern
        with torch.no_grad():
            other(input_ids=ids)  # no backward: the logits are not kept
        other.eval()(input_ids=ids)  # evaluation


def test_a_users_hook_on_the_head_projection_is_reported():
    """The tiled loss reads ``lm_head.weight`` without calling ``lm_head``: a hook the user put there stops
    running, and fxtile says so when it builds the tiled loss (ZeRO-3's own gathering hooks are not
    reported: their work is done another way, see tests/test_alst.py)."""
    model = _lm("llama")
    model.lm_head.register_forward_hook(lambda *a: None)
    ids = torch.randint(0, V, (2, 16))
    with pytest.warns(UserWarning, match=r"lm_head inside a tiled region has module hooks"):
        fxtile.transform(model, shards=2, loss=True)(input_ids=ids, labels=ids)


def test_bf16_weights_keep_the_fp32_logits_math():
    """Tolerance, justified: bf16 logits and gradient matmuls round as in the untouched model, the weight
    gradient sums over shards in fp32 in another order: the bar is the untiled model's own error
    against an fp64 reference."""
    model = _lm("llama")
    ids = torch.randint(0, V, (2, 16))
    ref64 = copy.deepcopy(model).double()
    _, _, exact = _step(ref64, input_ids=ids, labels=ids)
    low = copy.deepcopy(model).to(torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(low), shards=4, loss=True)
    errors = {}
    for name, m in (("untiled", low), ("tiled", tiled)):
        loss, out, grads = _step(m, input_ids=ids, labels=ids)
        assert loss.dtype == torch.float32, "transformers' loss upcasts the logits to fp32"
        errors[name] = max((grads[n].double() - g).abs().max().item() / g.abs().max().item()
                           for n, g in exact.items() if g is not None)
    assert errors["tiled"] <= errors["untiled"] * 1.1 + 1e-6, errors


def test_autocast_runs_the_shards_in_bf16_like_the_untouched_model():
    model = _lm("llama")
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    ids = torch.randint(0, V, (2, 9))
    losses = []
    for m in (model, tiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2**-7, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2**-6, atol=2e-3, msg=lambda m: f"{name}: {m}")
    head = tiled.lm_head.weight.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matmuls = profiled_matmuls(lambda: tiled(input_ids=ids, labels=ids))
    logits = [types for name, shapes, types in matmuls if any(list(s) == [head[1], head[0]] for s in shapes[1:2])]
    assert logits and all("c10::BFloat16" in types for types in logits), matmuls


# --- hand-written models: F.cross_entropy, nn.CrossEntropyLoss, the loss's arguments ------------------


class HandLM(nn.Module):
    """Embedding, one tiled MLP block, a head, and the loss written by hand."""

    def __init__(self, loss_kwargs=None, module_loss=False, softcap=None, returns_logits=True, tied=False,
                 loss_built_in_forward=False, head_form="module"):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.block = M.Odd(16, 48)
        self.head = nn.Linear(16, V, bias=True)
        self.head_form = head_form
        if head_form == "matmul_in_out":  # a head stored [in, out]: logits = h @ W
            self.w_in_out = nn.Parameter(torch.randn(16, V) * 0.2)
        if tied:
            self.head = None
        self.loss_kwargs = dict(loss_kwargs or {})
        weight = self.loss_kwargs.pop("weight", None)
        if weight is not None:
            self.register_buffer("class_weight", weight)
        self.criterion = nn.CrossEntropyLoss(weight=weight, **self.loss_kwargs) if module_loss else None
        self.softcap, self.returns_logits = softcap, returns_logits
        self.loss_built_in_forward = loss_built_in_forward

    def forward(self, ids, y):
        h = self.block(self.embed(ids))
        if self.head_form == "f_linear_bias_none":
            logits = F.linear(h, self.head.weight, None)
        elif self.head_form == "matmul_T":  # Cut Cross-Entropy's reference head
            logits = h @ self.head.weight.T
        elif self.head_form == "torch_matmul_t":
            logits = torch.matmul(h, self.head.weight.t())
        elif self.head_form == "matmul_in_out":
            logits = h @ self.w_in_out
        else:
            logits = self.head(h) if self.head is not None else F.linear(h, self.embed.weight)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        flat = logits.float().view(-1, logits.size(-1))
        if self.loss_built_in_forward:  # BART's `loss_fct = CrossEntropyLoss()` inside forward: no submodule
            loss = nn.CrossEntropyLoss(**self.loss_kwargs)(flat, y.view(-1))
        elif self.criterion is not None:
            loss = self.criterion(flat, y.view(-1))
        else:
            weight = self.class_weight if hasattr(self, "class_weight") else None
            loss = F.cross_entropy(flat, y.view(-1), weight=weight, **self.loss_kwargs)
        return (loss, logits) if self.returns_logits else loss


LOSS_CASES = {
    "mean": dict(),
    "sum": dict(loss_kwargs={"reduction": "sum"}),
    "ignore_index": dict(loss_kwargs={"ignore_index": 5}),
    "label_smoothing": dict(loss_kwargs={"label_smoothing": 0.1}),
    "class_weights": dict(loss_kwargs={"weight": torch.rand(V) + 0.5}),
    "weights_and_smoothing": dict(loss_kwargs={"weight": torch.rand(V) + 0.5, "label_smoothing": 0.2, "ignore_index": 5}),
    "module_loss": dict(module_loss=True, loss_kwargs={"label_smoothing": 0.05}),
    "module_loss_weighted": dict(module_loss=True, loss_kwargs={"weight": torch.rand(V) + 0.5}),
    "loss_built_in_forward": dict(loss_built_in_forward=True, loss_kwargs={"ignore_index": 5}),
    "softcap": dict(softcap=2.0),
    "tied_f_linear": dict(tied=True),
    "loss_only": dict(returns_logits=False),
    "f_linear_bias_none": dict(head_form="f_linear_bias_none"),
    "matmul_T": dict(head_form="matmul_T"),
    "torch_matmul_t": dict(head_form="torch_matmul_t"),
    "matmul_in_out": dict(head_form="matmul_in_out"),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_hand_written_losses_are_tiled_exactly(case):
    torch.manual_seed(0)
    model = HandLM(**LOSS_CASES[case])
    tiled = fxtile.transform(copy.deepcopy(model), shards=4, loss=True)
    patterns = sorted(m.pattern for m in fxtile.find(tiled, loss=True) if m.tiled)
    assert patterns == ["gated", "linear_cross_entropy"], fxtile.find(tiled, loss=True).skipped
    ids = torch.randint(0, V, (3, 7))
    y = torch.randint(0, V, (3, 7))
    y[0, :5] = 5  # rows for ignore_index=5 (all of the first shard)
    for m in (model, tiled):
        m.zero_grad(set_to_none=True)
    ref, got = model(ids, y), tiled(ids, y)
    ref_loss, got_loss = (r[0] if isinstance(r, tuple) else r for r in (ref, got))
    if isinstance(got, tuple):
        assert got[1] is None
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    (ref_loss * 1.7).backward()  # any upstream gradient: the op's backward scales what it computed
    (got_loss * 1.7).backward()
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


class ChainLM(nn.Module):
    """``emb -> tanh(Linear(H, H)) -> Linear(H, V) -> .float() -> cross_entropy``: the plain-MLP pattern would take
    the first Linear, the tanh and the head as one "MLP"; the head is claimed by the pattern that saves more."""

    def __init__(self):
        super().__init__()
        self.embed, self.dense, self.head = nn.Embedding(V, 16), nn.Linear(16, 16), nn.Linear(16, V)

    def forward(self, ids, y):
        logits = self.head(torch.tanh(self.dense(self.embed(ids))))
        return F.cross_entropy(logits.float().view(-1, V), y.view(-1))


def test_a_chain_that_looks_like_an_mlp_ending_in_the_head_tiles_the_head():
    torch.manual_seed(0)
    model = ChainLM()
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    assert [m.pattern for m in fxtile.find(tiled, loss=True)] == ["linear_cross_entropy"]
    ids, y = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    ref, got = model(ids, y), tiled(ids, y)
    torch.testing.assert_close(got, ref)
    ref.backward()
    before = fxtile.testing.shard_counts(tiled)[""].forward_shards
    got.backward()
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards == before == 3
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


class Head(nn.Module):
    """A head and its loss on hidden states: ``F.cross_entropy(proj(h).float().view(-1, V), y.view(-1))``,
    or (``cast=False``, BART's way) ``nn.CrossEntropyLoss()`` built in forward on the uncast logits."""

    def __init__(self, cast=True):
        super().__init__()
        self.proj, self.cast = nn.Linear(16, V), cast

    def forward(self, h, y):
        if self.cast:
            return F.cross_entropy(self.proj(h).float().view(-1, V), y.view(-1))
        return nn.CrossEntropyLoss()(self.proj(h).view(-1, V), y.view(-1))


@pytest.mark.parametrize("cast", [False, True], ids=["bf16_loss", "fp32_loss"])
def test_a_bf16_head_returns_the_untouched_losss_dtype_and_is_at_least_as_close_to_fp64(cast):
    """DeepSpeed's tiled-loss test and a hand-written bf16 head compute the loss on bf16 logits: the tiled
    loss has the untouched loss's dtype (accumulated in fp32 inside, cast once at the end), and its value is
    at least as close to an fp64 reference as the untouched one's."""
    torch.manual_seed(0)
    model64 = Head(cast=cast).double()
    h = torch.randn(4, 96, 16, dtype=torch.float64)
    y = torch.randint(0, V, (4, 96))
    reference = model64(h, y).item()
    model = copy.deepcopy(model64).to(torch.bfloat16)
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    assert [m.pattern for m in fxtile.find(tiled, loss=True)] == ["linear_cross_entropy"]
    untouched = model(h.to(torch.bfloat16), y)
    got = tiled(h.to(torch.bfloat16), y)
    assert got.dtype == untouched.dtype == (torch.float32 if cast else torch.bfloat16)
    assert abs(got.item() - reference) <= abs(untouched.item() - reference) + 1e-9, (got.item(), untouched.item(), reference)


def test_float64_logits_without_a_cast_keep_float64_precision():
    """BART-style: no ``.float()`` between the head and the loss. In float64 the tiled loss rounds like
    float64 (the softmax buffer and the mean's denominator are not taken down to float32)."""
    torch.manual_seed(0)
    model = Head(cast=False).double()
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    (match,) = fxtile.find(tiled, loss=True)
    assert match.verified is True, match.check
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    y = torch.randint(0, V, (2, 7))
    hr, ht = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref, got = model(hr, y), tiled(ht, y)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ht.grad, hr.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tiled.proj.weight.grad, model.proj.weight.grad, rtol=1e-12, atol=1e-14)


class _NewTensors(TorchDispatchMode):
    """Records the size of every tensor an op creates in new storage (not an in-place result)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        self.sizes += [t.numel() for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_the_backward_of_a_tiled_loss_allocates_nothing_gradient_sized():
    """The forward computed every gradient; backward scales them in place and hands them over (no copy,
    and no zero "gradient" materialized for the op's gradient outputs)."""
    torch.manual_seed(0)
    model = fxtile.transform(Head(), shards=4, loss=True)
    h = torch.randn(2, 64, 16, requires_grad=True)
    loss = model(h, torch.randint(0, V, (2, 64)))
    with _NewTensors() as created:
        loss.backward()
    assert max(created.sizes, default=0) < min(h.numel(), model.proj.weight.numel()), created.sizes
    assert h.grad is not None and model.proj.weight.grad is not None


def test_the_input_gradient_reaches_a_leaf_input():
    torch.manual_seed(0)
    model = Head()
    tiled = fxtile.transform(copy.deepcopy(model), shards=3, loss=True)
    h = torch.randn(2, 7, 16, requires_grad=True)
    y = torch.randint(0, V, (2, 7))
    hr, ht = h.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    model(hr, y).backward()
    tiled(ht, y).backward()
    torch.testing.assert_close(ht.grad, hr.grad)
    assert fxtile.testing.shard_counts(tiled)[""].forward_shards == 3


def test_a_second_backward_through_a_tiled_loss_says_what_to_do():
    model = fxtile.transform(HandLM(returns_logits=False), shards=2, loss=True)
    loss = model(torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()


REFUSED = {
    "reduction_none": (lambda h, y, head: F.cross_entropy(head(h).view(-1, V), y.view(-1), reduction="none").mean(),
                       "reduction='none' returns per-token losses"),
    "logits_used_elsewhere": (lambda h, y, head: F.cross_entropy((z := head(h)).view(-1, V), y.view(-1)) + z.mean(),
                              "also used by"),
    "token_slice": (lambda h, y, head: F.cross_entropy(head(h)[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)),
                    "is not a row-wise step"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_losses_that_cannot_be_tiled_are_reported_with_the_reason(case):
    fn, reason = REFUSED[case]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, V)

        def forward(self, h, y):
            return fn(h, y, self.head)

    found = fxtile.find(Model(), loss=True)
    assert found == []
    assert any(s.why in (fxtile.Why.REFUSED, fxtile.Why.NOT_FOUND) and reason in s.reason for s in found.skipped), \
        found.skipped


def test_a_head_with_an_adapter_is_reported_not_tiled():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_lm("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    found = fxtile.find(model, loss=True)
    assert not any(m.pattern == "linear_cross_entropy" for m in found)
    assert any(s.why is fxtile.Why.REFUSED and "not a plain nn.Linear" in s.reason for s in found.skipped), found.skipped


def test_loss_false_keeps_todays_behaviour():
    model = _lm("llama")
    assert not any(m.pattern == "linear_cross_entropy" for m in fxtile.find(model))
    tiled = fxtile.transform(copy.deepcopy(model), shards=3)
    ids = torch.randint(0, V, (2, 9))
    assert tiled(input_ids=ids, labels=ids).logits is not None
    assert "" not in fxtile.testing.shard_counts(tiled)

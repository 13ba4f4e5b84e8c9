"""The promise on the stacks people train with: exact or refused, never silent.

Each test builds the real library's module (PEFT, bitsandbytes, torchao, transformers, torch.nn,
megatron-core) from tiny sizes, calls it the way training does (train mode, batch > 1, shard counts
that do not divide the rows) and compares outputs and every gradient with the untouched model, or
checks that what cannot be tiled is reported with its reason.
"""

from __future__ import annotations

import copy
import inspect
import gc
import linecache
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtile
import fxtile.testing
import modules as M
from fxtile.kernels.shards import shard_bounds
from helpers import TINY, assert_same_outputs_and_grads, profiled_matmuls, ran_tiled, tiled_copy

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama(**extra):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, **extra}))


def _lora(model, targets=("gate_proj", "up_proj", "down_proj"), dropout=0.0, **extra):
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                       lora_dropout=dropout, **extra))
    for n, p in lora.named_parameters():  # non-zero B so every LoRA weight gets a gradient
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    return lora


def _shard_wise_reference(block, x, shards, seed):
    """The untouched block run on the same row shards from the same generator state, with autograd."""
    rows = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    torch.manual_seed(seed)
    out = torch.cat([block(rows[lo:hi]) for lo, hi in shard_bounds(rows.shape[0], shards)])
    return rows, out


def _assert_replays_its_own_draws(block, x, shards=3, seed=5):
    """The tiled block's gradients are those of the forward it ran: the same shards through the
    untouched block from the same seed give the same output and every gradient."""
    tiled = tiled_copy(block, shards=shards)
    xt = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = tiled(xt)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    reference = copy.deepcopy(block)
    rows, ref = _shard_wise_reference(reference, x, shards, seed)
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


def _directional_derivative_error(model, loss_fn, eps=1e-6):
    """|<grad, d> - (L(p + eps d) - L(p - eps d)) / 2 eps| / |<grad, d>| along d = grad / |grad|, with
    every loss evaluated from the same seed (the same random draws). float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss_fn().backward()
    grads = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    direction = [g / norm for g in grads]
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            torch.manual_seed(7)
            values.append(loss_fn().item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    return abs(numeric - norm.item()) / norm.item()


# --- 1. randomness anywhere inside a region is replayed by the recompute -------------------------


@pytest.mark.parametrize("targets, extra", [(("gate_proj", "up_proj", "down_proj"), {}), (("down_proj",), {}),
                                            (("gate_proj", "up_proj", "down_proj"), {"use_dora": True})],
                         ids=["gate_up_down", "down", "dora"])
def test_peft_lora_dropout_gradients_are_those_of_the_tiled_forward(targets, extra):
    lora = _lora(_llama(), targets, dropout=0.5, **extra).train()
    block = lora.base_model.model.model.layers[0].mlp
    tiled = _assert_replays_its_own_draws(block, torch.randn(2, 7, TINY["hidden_size"]))
    assert [m.pattern for m in fxtile.find(tiled)] == ["gated"]


def test_peft_dora_model_is_tiled_and_exact():
    """DoRA's magnitude vector and weight norm (computed from the weights, per output feature) inside
    every projection: tiled, with the untouched model's loss, logits and every gradient."""
    lora = _lora(_llama(), use_dora=True).train()
    tiled = tiled_copy(lora, shards=3)
    assert len([m for m in fxtile.find(tiled) if m.tiled]) == 2
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    assert_same_outputs_and_grads(lora, tiled, ids, out_fn=lambda o: o.logits)
    assert ran_tiled(tiled, lambda: tiled(input_ids=ids, labels=ids).loss.backward()) == (6, 6)


class NoisyLinear(nn.Linear):
    """A projection that draws random numbers in code fxtile never sees (a leaf)."""

    def forward(self, x):
        return super().forward(F.dropout(x, 0.3, self.training))


class NoisyGated(nn.Module):
    def __init__(self, h=12, i=28):
        super().__init__()
        self.a, self.b, self.c = NoisyLinear(h, i), nn.Linear(h, i), NoisyLinear(i, h)

    def forward(self, x):
        return self.c(F.silu(self.a(x)) * self.b(x))


def test_dropout_inside_a_custom_leaf_is_replayed():
    torch.manual_seed(0)
    _assert_replays_its_own_draws(NoisyGated().train(), torch.randn(3, 5, 12))


def _float64_loss(model, ids):
    """A training call with labels; the loss recomputed from the logits in float64 (transformers' own
    loss upcasts to float32 only, too coarse for central differences)."""
    logits = model(input_ids=ids, labels=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_a_whole_lora_model_with_dropout_trains_on_the_gradient_of_its_own_loss():
    """model.train() and a training call, with lora_dropout: the gradient agrees with the loss it
    differentiates (central differences along the gradient, float64, same seed). GPT-2: every op in
    float64 (Llama's RMSNorm upcasts to float32, too coarse for central differences)."""
    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0)
    lora = _lora(T.GPT2LMHeadModel(config), ("c_fc", "mlp.c_proj"), dropout=0.1, fan_in_fan_out=True).double().train()
    tiled = tiled_copy(lora, shards=3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    loss = lambda: _float64_loss(tiled, ids)  # noqa: E731
    assert ran_tiled(tiled, lambda: loss().backward())[1] > 0
    assert _directional_derivative_error(lora, lambda: _float64_loss(lora, ids)) < 1e-6  # the check itself
    assert _directional_derivative_error(tiled, loss) < 1e-6


def test_dropout_in_a_tiled_region_compiles_fullgraph_and_replays():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = M.ParamAct(p=0.5).train()
    tiled = fxtile.transform(copy.deepcopy(block), shards=3)
    compiled = torch.compile(tiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 12, requires_grad=True)
    torch.manual_seed(5)
    out = compiled(x)
    assert ran_tiled(tiled, lambda: out.sum().backward()) == (0, 3)  # the compiled backward recomputed 3 shards
    rows, ref = _shard_wise_reference(copy.deepcopy(block), x, 3, 5)
    ref.sum().backward()
    torch.testing.assert_close(out.reshape(ref.shape), ref)
    torch.testing.assert_close(x.grad.reshape(rows.shape), rows.grad)
    torch._dynamo.reset()


# --- 2. projections through legacy autograd Functions (QLoRA, QAT) --------------------------------


def _quantized_llama(kind):
    bnb = pytest.importorskip("bitsandbytes")

    model = _llama(hidden_size=64, intermediate_size=128, head_dim=16)
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            if kind == "nf4":
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            setattr(layer.mlp, name, q.to("cpu"))  # quantized when moved to the device
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_on_bitsandbytes_projections_is_tiled_and_exact(kind):
    lora = _lora(_quantized_llama(kind)).train()
    assert lora.base_model.model.model.layers[0].mlp.gate_proj.base_layer.weight.dtype in (torch.uint8, torch.int8)
    tiled = tiled_copy(lora, shards=3)
    # the self-check ran in training, as the model will: bitsandbytes' CPU eval path would have repacked the
    # 4-bit weights (and computes in bf16) on CPUs with AVX512-BF16
    weight = tiled.base_model.model.model.layers[0].mlp.gate_proj.base_layer.weight
    assert not getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)
    assert len([m for m in fxtile.find(tiled) if m.tiled]) == 2
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        assert_same_outputs_and_grads(lora, tiled, ids, out_fn=lambda o: o.logits, atol=1e-4, rtol=1e-4)
        assert ran_tiled(tiled, lambda: tiled(input_ids=ids, labels=ids).loss.backward()) == (6, 6)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: keys differ: {sorted(set(expected) ^ set(got))}"
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {key}: {m}")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_state_dict_is_what_an_untiled_run_leaves(kind):
    """bitsandbytes keeps quantization state on its modules (Linear8bitLt's int8 scales move from the weight to
    ``self.state`` on its first call, where its state_dict reads them): transform and every tiled call must
    leave state_dict keys and values as an untiled run would, or a checkpoint saved after transform loses them."""
    torch.manual_seed(0)
    lora = _lora(_quantized_llama(kind)).train()
    reference = copy.deepcopy(lora)
    before = _state(lora)
    tiled = fxtile.transform(lora, shards=3)
    assert len([m for m in fxtile.find(tiled) if m.tiled]) == 2
    _assert_same_state(_state(tiled), before, "after transform")
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        for model in (reference, tiled):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    _assert_same_state(_state(tiled), _state(reference), "after a training step")
    if kind == "int8":
        assert any(k.endswith("gate_proj.base_layer.SCB") for k in before), "the int8 scales to actually perform the test"


def test_torchao_qat_fake_quantized_projections_are_tiled_and_exact():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = _llama(hidden_size=64, intermediate_size=128, head_dim=16).train()
    config = QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                       weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare")
    quantize_(model, config, filter_fn=lambda m, fqn: "mlp" in fqn and isinstance(m, nn.Linear))
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "FakeQuantizedLinear"
    tiled = tiled_copy(model, shards=3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    assert_same_outputs_and_grads(model, tiled, ids, out_fn=lambda o: o.logits, atol=1e-4, rtol=1e-4)


class _LegacyMatmul(torch.autograd.Function):
    """A legacy Function: forward(ctx, ...) with no setup_context (torch.func cannot run it)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))


class LegacyLinear(nn.Linear):
    def forward(self, x):
        return _LegacyMatmul.apply(x, self.weight) + self.bias


def test_a_hand_written_legacy_autograd_function_inside_a_region_is_exact():
    torch.manual_seed(0)
    model = M.Odd()
    model.wa, model.wo = LegacyLinear(12, 28), LegacyLinear(28, 12)
    tiled = tiled_copy(model, shards=3)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 7, 12, requires_grad=True))


# --- 3. layers traced per call are tiled in ordinary training calls ---------------------------------


def _per_call_lm(arch):
    torch.manual_seed(0)
    common = dict(vocab_size=100, max_position_embeddings=64)
    if arch == "opt":
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=72, num_hidden_layers=2, num_attention_heads=4,
                                            word_embed_proj_dim=32, dropout=0.0, **common))
    if arch == "biogpt":
        return T.BioGptForCausalLM(T.BioGptConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                                  num_attention_heads=4, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, **common))
    if arch == "xglm":
        return T.XGLMForCausalLM(T.XGLMConfig(d_model=32, ffn_dim=72, num_layers=2, attention_heads=4, dropout=0.0,
                                              attention_dropout=0.0, activation_dropout=0.0, **common))
    return T.BartForCausalLM(T.BartConfig(d_model=32, decoder_ffn_dim=72, decoder_layers=2, decoder_attention_heads=4,
                                          encoder_layers=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                          **common))


@pytest.mark.parametrize("arch", ["opt", "biogpt", "xglm", "bart"])
def test_inline_mlps_are_tiled_in_a_default_training_call(arch):
    """model.train(); model(input_ids=ids, labels=ids) with the config's use_cache: transformers hands
    each layer a Cache object, which fxtile passes through by type. (Dropout probabilities are 0: tiled
    dropout draws per shard, so outputs would match in distribution only.)"""
    model = _per_call_lm(arch).train()
    assert model.config.use_cache
    tiled = tiled_copy(model, shards=3)
    ids = torch.randint(3, 100, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "runs untiled" warning
        losses = []
        for m in (model, tiled):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    forward, recomputed = ran_tiled(tiled, lambda: tiled(input_ids=ids, labels=ids).loss.backward())
    assert forward == recomputed == 2 * 3, "both layers ran their MLP in 3 shards forward and backward"
    untiled = fxtile.testing.untiled_calls(tiled)
    assert len(untiled) == 2 and set(untiled.values()) == {0}, untiled


def test_a_call_a_tiled_block_cannot_take_runs_untiled_and_says_so_once():
    from test_patterns import InlineLayer, Scale

    model = tiled_copy(InlineLayer(), shards=3)
    x = torch.randn(2, 5, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x, scale=Scale())
    said = [w for w in caught if "runs untiled" in str(w.message)]
    assert len(said) == 1 and "Scale argument is used by traced code" in str(said[0].message)
    assert fxtile.testing.untiled_calls(model) == {"": 3}


# --- 4. filter_fn is never bypassed ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, h=12):
        super().__init__()
        self.norm, self.ffwd = M.RMS(h), M.Odd(h, 28)

    def forward(self, x):
        return x + self.ffwd(self.norm(x))


@pytest.mark.parametrize("exclude", [
    lambda m, fqn: fqn != "0.ffwd",
    lambda m, fqn: not (isinstance(m, M.Odd) and fqn.startswith("0")),
], ids=["by_name", "by_class_and_name"])
def test_a_block_filter_fn_excludes_is_not_tiled_inside_its_parent_either(exclude):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    tiled = tiled_copy(model, shards=3, filter_fn=exclude)
    assert [(m.path, m.tiled) for m in fxtile.find(tiled, filter_fn=exclude)] == [("1.ffwd", True)]
    x = torch.randn(2, 5, 12, requires_grad=True)
    assert_same_outputs_and_grads(model, tiled, x)
    rows = [shapes[1][0] for _, shapes, _ in profiled_matmuls(lambda: tiled(x))]
    assert rows[:3] == [10, 10, 10], "block 0's MLP runs untiled over all 10 rows"
    assert 10 not in rows[3:], "block 1's MLP runs in shards"


# --- 5. hooks on modules outside a region keep running ------------------------------------------------


def test_hooks_on_modules_outside_the_region_fire_every_call_and_change_the_output():
    torch.manual_seed(0)
    model = M.FlatResidual()
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    fired = []
    for m in (model, tiled):  # registered after transform too
        m.norm.register_forward_hook(lambda mod, args, out: fired.append(1) or out * 2)
        m.norm.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    assert_same_outputs_and_grads(model, tiled, x)
    assert len(fired) == 2, "the hook ran in the untouched and in the tiled model"
    tiled(x)
    assert len(fired) == 3


def test_hooks_outside_the_region_of_a_layer_traced_per_call_keep_running():
    from test_patterns import InlineLayer

    class Gain(nn.Module):  # traceable, outside the MLP region
        def forward(self, h):
            return h * 1.5

    class Layer(InlineLayer):
        def __init__(self):
            super().__init__()
            self.gain = Gain()

        def forward(self, h, mask=None):
            return super().forward(self.gain(h), mask)

    torch.manual_seed(0)
    model = Layer()
    tiled = tiled_copy(model, shards=3)
    fired = []
    tiled.gain.register_forward_hook(lambda *a: fired.append(1))
    tiled(torch.randn(2, 5, 12))
    tiled(torch.randn(2, 5, 12))
    assert fired == [1, 1]


# --- 6. every rewrite is checked numerically before it is installed ---------------------------------


class Centred(nn.Linear):
    """Looks like a projection, but centres its input over the tokens: not token-wise."""

    def forward(self, x):
        return super().forward(x - x.mean(-2, keepdim=True))


class CentredMLP(nn.Module):
    def __init__(self, h=12, i=36):
        super().__init__()
        self.a, self.b = Centred(h, i), nn.Linear(i, h)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_a_region_that_is_not_token_wise_is_refused_by_the_self_check_with_the_measured_error():
    torch.manual_seed(0)
    model = CentredMLP()
    x = torch.randn(2, 6, 12)
    with pytest.warns(UserWarning, match="found no MLP"):
        fxtile.transform(model, shards=3)
    found = fxtile.find(model)
    assert found == [] and "forward" not in model.__dict__
    (skip,) = found.skipped
    assert skip.why is fxtile.Why.SELF_CHECK and "not token-wise" in skip.reason, skip
    error = float(skip.reason.split("by ")[1].split(" ")[0])
    assert error > 0.05, skip.reason
    unchecked = fxtile.transform(copy.deepcopy(model), shards=3, verify=False)  # the net taken away
    (match,) = fxtile.find(unchecked)
    assert match.tiled and match.verified is None and "verify=False" in match.check
    assert not torch.allclose(unchecked(x), model(x), atol=1e-3)


class CentredInTraining(nn.Linear):
    """Token-wise in eval mode only: in training it centres over the tokens (batch-norm-like)."""

    def forward(self, x):
        return super().forward(x - x.mean(-2, keepdim=True) if self.training else x)


def test_the_self_check_probes_the_modes_the_user_set():
    torch.manual_seed(0)
    model = CentredMLP()
    model.a = CentredInTraining(12, 36)
    evaluated = fxtile.transform(copy.deepcopy(model).eval(), shards=3)  # token-wise as it will run: tiled
    assert [m.verified for m in fxtile.find(evaluated)] == [True]
    with pytest.warns(UserWarning, match="found no MLP"):
        fxtile.transform(model.train(), shards=3)  # not token-wise in the mode the next call runs in
    (skip,) = fxtile.find(model).skipped
    assert "self-check failed" in skip.reason, skip.reason
    assert model.training and model.a.training  # and the probe left the modes as they were


def test_verified_regions_carry_their_measured_error_and_meta_weights_are_not_verified():
    model = fxtile.transform(M.Odd(), shards=3)
    (match,) = fxtile.find(model)
    assert match.verified is True and "max relative error" in match.check
    with torch.device("meta"):
        meta = M.Odd()
    fxtile.transform(meta, shards=3)
    (match,) = fxtile.find(meta)
    assert match.tiled and match.verified is None and "meta device" in match.check


# --- 7. modes and memory are the user's -------------------------------------------------------------


def test_every_module_keeps_the_mode_the_user_set_mixed_modes_included():
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**{**TINY, "num_local_experts": 4, "num_experts_per_tok": 2})).train()
    model.model.layers[0].mlp.experts.act_fn.eval()  # mixed: a child in eval inside a training model
    model.model.layers[1].self_attn.eval()
    modes = [m.training for m in model.modules()]
    reference = copy.deepcopy(model)
    tiled = fxtile.transform(model, shards=3)
    assert [m.training for m in tiled.modules()] == modes
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    ran = ran_tiled(tiled, lambda: assert_same_outputs_and_grads(reference, tiled, ids, out_fn=lambda o: o.logits,
                                                                 atol=2e-5, rtol=1e-4))
    assert ran == (2 * 3, 2 * 3)  # both layers' expert banks ran tiled
    assert [m.training for m in tiled.modules()] == modes, "a forward must not change any module's mode"


def test_regions_die_with_their_model_over_many_transform_restore_cycles():
    gc.collect()
    live, lines = fxtile.testing.live_regions(), len(linecache.cache)
    model = _llama(num_hidden_layers=4)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    for _ in range(40):
        fxtile.transform(model, shards=2)
        model(ids)
        fxtile.restore(model)
    clone = fxtile.transform(copy.deepcopy(model), shards=2)
    assert fxtile.testing.live_regions() >= 4
    del clone
    gc.collect()
    assert fxtile.testing.live_regions() == live, "every region is freed with the model that owned it"
    assert len(linecache.cache) <= lines + 2, "torch.fx's generated sources are dropped with their graphs"


# --- 8. more real projections and blocks ---------------------------------------------------------------


class TorchtuneLoRALinear(nn.Module):
    """torchtune's ``LoRALinear.forward`` (torchtune 0.6 does not install beside torchao 0.18, so it is
    written out here): ``F.linear(x, W) + (alpha / rank) * lora_b(lora_a(dropout(x)))``."""

    def __init__(self, i, o, rank=4, alpha=8.0, dropout=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = None
        self.rank, self.alpha = rank, alpha
        self.lora_a, self.lora_b = nn.Linear(i, rank, bias=False), nn.Linear(rank, o, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        lora_out = self.lora_a(self.dropout(x))
        lora_out = (self.alpha / self.rank) * self.lora_b(lora_out)
        return out + lora_out


class TorchtuneFeedForward(nn.Module):
    def __init__(self, h=16, i=48, dropout=0.0):
        super().__init__()
        self.w1, self.w2 = TorchtuneLoRALinear(h, i, dropout=dropout), TorchtuneLoRALinear(i, h, dropout=dropout)
        self.w3, self.activation = TorchtuneLoRALinear(h, i, dropout=dropout), nn.SiLU()

    def forward(self, x):
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class InlineLoRA(nn.Module):
    """Hand-written LoRA inline in the MLP: ``up(x) + b(a(x)) * s``."""

    def __init__(self, h=16, i=48):
        super().__init__()
        self.up, self.down = nn.Linear(h, i), nn.Linear(i, h)
        self.a, self.b = nn.Parameter(torch.randn(4, h) * 0.1), nn.Parameter(torch.randn(i, 4) * 0.1)

    def forward(self, x):
        return self.down(F.gelu(self.up(x) + F.linear(F.linear(x, self.a), self.b) * 2.0))


@pytest.mark.parametrize("cls, pattern, roles", [
    (TorchtuneFeedForward, "gated", {"gate": "w1", "up": "w3", "down": "w2", "act": "activation"}),
    (InlineLoRA, "plain", {"fc1": "up", "fc2": "down"}),
], ids=["torchtune_lora_linear", "inline_lora"])
def test_a_sum_of_linear_maps_of_one_input_is_one_projection(cls, pattern, roles):
    torch.manual_seed(0)
    model = cls()
    (match,) = fxtile.find(model)
    assert (match.pattern, match.roles) == (pattern, roles)
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 7, 16, requires_grad=True)
    assert_same_outputs_and_grads(model, tiled, x)
    assert ran_tiled(tiled, lambda: tiled(x).sum().backward()) == (3, 3)


def test_torchtune_style_lora_dropout_is_replayed():
    torch.manual_seed(0)
    _assert_replays_its_own_draws(TorchtuneFeedForward(dropout=0.3).train(), torch.randn(2, 7, 16))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("cls", [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer])
def test_torch_transformer_layers_are_tiled_exactly(cls, norm_first):
    torch.manual_seed(0)
    layer = cls(32, 4, dim_feedforward=96, dropout=0.0, activation="gelu", norm_first=norm_first, batch_first=True).train()
    (match,) = fxtile.find(layer)
    assert match.pattern == "plain" and match.roles == {"fc1": "linear1", "fc2": "linear2"}
    tiled = tiled_copy(layer, shards=3)
    inputs = [torch.randn(2, 7, 32, requires_grad=True)]
    if cls is nn.TransformerDecoderLayer:
        inputs.append(torch.randn(2, 5, 32, requires_grad=True))  # the encoder's memory
    assert_same_outputs_and_grads(layer, tiled, *inputs)
    assert ran_tiled(tiled, lambda: tiled(*inputs).sum().backward()) == (3, 3)


def test_torch_transformer_layer_with_dropout_trains_on_the_gradient_of_its_own_forward():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=96, dropout=0.2, norm_first=True,
                                       batch_first=True).double().train()
    tiled = tiled_copy(layer, shards=3)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert _directional_derivative_error(tiled, lambda: tiled(x).square().mean()) < 1e-6


_MEGATRON = r"""
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
import fxtile
config = TransformerConfig(num_layers=1, hidden_size=16, ffn_hidden_size=48, num_attention_heads=4,
                           use_cpu_initialization=True, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                           bias_activation_fusion=False, add_bias_linear=False)
mlp = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
found = fxtile.find(mlp)
print("MATCHES", len(found))
for s in found.skipped:
    print("SKIPPED", repr(s.path), s.reason)
from megatron.core import tensor_parallel
class VocabParallelHead(torch.nn.Module):  # Megatron's output layer and loss: logits split over the vocabulary
    def __init__(self):
        super().__init__()
        self.output_layer = ColumnParallelLinear(16, 64, config=config, init_method=torch.nn.init.normal_, bias=False,
                                                 gather_output=False)
    def forward(self, h, labels):
        logits, _ = self.output_layer(h)
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()
found = fxtile.find(VocabParallelHead(), loss=True)
print("HEAD MATCHES", len(found))
for s in found.skipped:
    print("HEAD SKIPPED", repr(s.path), s.reason)
dist.destroy_process_group()
"""


def test_megatron_core_parallel_mlp_and_vocab_parallel_head_are_reported_with_their_reasons():
    pytest.importorskip("megatron.core")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _MEGATRON], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MATCHES 0" in proc.stdout
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped, "an MLP-shaped block must never yield an empty report"
    assert "ColumnParallelLinear (linear_fc1), RowParallelLinear (linear_fc2)" in skipped[0]
    assert "HEAD MATCHES 0" in proc.stdout  # a vocabulary-parallel head and loss: reported, not tiled
    (head,) = [line for line in proc.stdout.splitlines() if line.startswith("HEAD SKIPPED")]
    assert head.startswith("HEAD SKIPPED ''") and "found no head and loss to tile" in head and "not traced" in head, head


def test_hf_trainer_with_lora_and_gradient_checkpointing_trains_like_the_untiled_model(tmp_path):
    """Trainer (accelerate underneath) passes labels and num_items_in_batch, checkpoints each decoder
    layer (so every tiled call also runs in the layer's recompute) and steps AdamW: three steps land on
    the same LoRA weights as untiled training."""
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, TINY["vocab_size"], (6, 9), generator=gen)]
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                               gradient_checkpointing=True, use_cpu=True, report_to=[], save_strategy="no",
                               logging_steps=1, seed=0, disable_tqdm=True)
    trained, counts = [], None
    for tile in (False, True):
        model = _lora(_llama())
        if tile:
            fxtile.transform(model, shards=3)
        before = fxtile.testing.shard_counts(model)
        T.Trainer(model=model, args=args, train_dataset=data).train()
        if tile:
            counts = {p: c.backward_shards - before[p].backward_shards for p, c in fxtile.testing.shard_counts(model).items()}
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert counts and all(n == 3 * 3 for n in counts.values()), counts  # 3 steps, 3 recomputed shards each
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_hf_trainer_with_its_default_arguments_trains_with_the_loss_tiled(tmp_path):
    """Trainer's default remove_unused_columns=True keeps only the columns the model's forward signature
    names: the forward fxtile installs keeps the original's signature, so input_ids survive and the head and
    loss run tiled. Two SGD steps land on the untiled run's weights."""
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, TINY["vocab_size"], (4, 9), generator=gen)]
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                               use_cpu=True, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, optim="sgd")
    trained, ran = [], None
    for tile in (False, True):
        torch.manual_seed(0)
        model = _llama()
        if tile:
            fxtile.transform(model, shards=3, loss=True)
            assert [m.pattern for m in fxtile.find(model, loss=True)][0] == "linear_cross_entropy"
        before = fxtile.testing.shard_counts(model)
        T.Trainer(model=model, args=args, train_dataset=data).train()
        if tile:
            ran = fxtile.testing.shard_counts(model)[""].forward_shards - before[""].forward_shards
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert ran == 2 * 3  # the loss ran tiled in both steps
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("make, call", [
    (lambda: _llama(), lambda m: m.forward),  # the causal LM root (its loss head, traced per call)
    (lambda: _llama().model.layers[0].mlp, lambda m: m.forward),  # an MLP traced as one graph
    (lambda: T.MixtralForCausalLM(T.MixtralConfig(**TINY)).model.layers[0].mlp.experts, lambda m: m.forward),  # a bank
    (lambda: nn.TransformerEncoderLayer(16, 2, 64, dropout=0.0, batch_first=True), lambda m: m._ff_block),  # a method
], ids=["per_call_root", "traced_mlp", "expert_bank", "method"])
def test_every_installed_forward_keeps_the_signature_and_docstring_it_replaces(make, call):
    torch.manual_seed(0)
    model = make()
    original = call(model)
    expected = (inspect.signature(original), original.__doc__, original.__name__)
    fxtile.transform(model, shards=3, loss=True)
    assert any(m.tiled for m in fxtile.find(model, loss=True)), "something tiled to actually perform the test"
    installed = call(model)
    assert installed.__func__ is not type(model).__dict__.get(installed.__name__), "the tiled forward is installed"
    assert (inspect.signature(installed), installed.__doc__, installed.__name__) == expected

"""The shapes widened for coverage: each against the untouched module (outputs and every gradient,
batch > 1, shard counts that do not divide the rows), plus the refusals that keep them safe."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtile
import fxtile.testing
from fxtile.kernels.shards import shard_bounds
from helpers import assert_same_outputs_and_grads, tiled_copy

H, I, E = 12, 20, 4


# --- routed expert banks (stacked 3-D weights, called as experts(x, ids, weights)) --------------


class Bank(nn.Module):
    """Stacked expert weights (gate and up fused, up half first) with biases: a per-token loop."""

    def __init__(self, experts=E, h=H, i=I):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, 2 * i, h) / h**0.5)
        self.b_in = nn.Parameter(torch.randn(experts, 2 * i) * 0.1)
        self.w_out = nn.Parameter(torch.randn(experts, h, i) / i**0.5)
        self.nonlin = nn.GELU(approximate="tanh")

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            w_in, b_in, w_out = self.w_in[ids[:, slot]], self.b_in[ids[:, slot]], self.w_out[ids[:, slot]]
            up, gate = (torch.einsum("tih,th->ti", w_in, x) + b_in).chunk(2, dim=-1)
            y = torch.einsum("thi,ti->th", w_out, self.nonlin(gate) * up)
            out = out + weights[:, slot, None] * y
        return out


class CappedBank(Bank):
    """An expert bank with a capacity limit: beyond the first 4 rows, tokens are dropped, so a row's
    output depends on its position among all rows (tiling it over tokens would be wrong)."""

    def forward(self, x, ids, weights):
        out = super().forward(x, ids, weights)
        keep = (torch.arange(x.shape[0], device=x.device) < 4).to(x.dtype)
        return out * keep[:, None]


class MoE(nn.Module):
    """Router (softmax, top-2, renormalized), expert bank, and router logits returned for an aux loss."""

    def __init__(self, bank_cls=Bank):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.bank = bank_cls()

    def forward(self, z):
        rows = z.reshape(-1, H)
        logits = self.router(rows)
        top, ids = torch.topk(logits.softmax(-1), 2, dim=-1)
        out = self.bank(rows, ids, top / top.sum(-1, keepdim=True))
        return out.reshape(z.shape), logits


def test_routed_expert_bank_is_tiled_and_router_logits_keep_their_gradients():
    torch.manual_seed(0)
    model = MoE()
    (match,) = fxtile.find(model)
    assert (match.path, match.pattern, match.hidden_size, match.intermediate_size) == ("bank", "routed_experts", H, I)
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 7, H, requires_grad=True)  # 14 rows in shards of 4, 5, 5

    def loss_terms(out):  # the output and an aux loss on the router logits, both differentiated
        y, logits = out
        return torch.cat([y.reshape(-1), logits.logsumexp(-1).square()])

    assert_same_outputs_and_grads(model, tiled, x, out_fn=loss_terms)
    assert tiled.router.weight.grad is not None and tiled.router.weight.grad.abs().sum() > 0


def test_expert_bank_whose_rows_depend_on_other_rows_is_refused_with_the_reason():
    model = MoE(CappedBank)
    found = fxtile.find(model)
    assert found == []
    assert any(s.why is fxtile.Why.REFUSED and "depend on other rows" in s.reason for s in found.skipped), found.skipped


def test_transformers_moe_block_with_shared_expert_is_tiled_exactly():
    T = pytest.importorskip("transformers")
    config = T.Qwen2MoeConfig(hidden_size=32, intermediate_size=72, moe_intermediate_size=40,
                              shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    block = T.Qwen2MoeForCausalLM(config).model.layers[0].mlp  # built in a model: its experts implementation is set
    tiled = tiled_copy(block, shards=4)
    assert sorted(m.pattern for m in fxtile.find(tiled)) == ["gated", "routed_experts"]
    out_fn = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert_same_outputs_and_grads(block, tiled, torch.randn(2, 7, 32, requires_grad=True), out_fn=out_fn, atol=1e-5)


# --- blocks traced per call (untraceable parts kept as leaves) ------------------------------------


class Mixer(nn.Module):
    """A token mixer whose code does not trace (data-dependent branch): becomes an opaque leaf."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, z, mask=None):
        if z.sum() > 1e9:  # data-dependent control flow
            z = z * 0
        mixed = z.cumsum(1) / torch.arange(1, z.shape[1] + 1, device=z.device)[:, None]
        if mask is not None:
            mixed = mixed * mask[..., None]
        return self.proj(mixed), None


class InlineLayer(nn.Module):
    """A decoder layer with its MLP inline in its own forward (BART/OPT style), an optional mask, a
    flag, ``**kwargs`` and a tuple argument."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.mix, self.norm = Mixer(), nn.LayerNorm(H)
        self.fc1, self.fc2 = nn.Linear(H, I), nn.Linear(I, H)
        self.dropout = dropout

    def forward(self, h, mask=None, scale=(None, None), use_extra=False, **kwargs):
        mixed, _ = self.mix(h, mask=mask)
        h = h + mixed
        if scale[0] is not None:
            h = h * scale[0] + scale[1]
        if use_extra:
            h = h * 2
        residual = h
        h = F.gelu(self.fc1(self.norm(h)))
        h = F.dropout(h, p=self.dropout, training=self.training)
        return residual + self.fc2(h)


def test_inline_mlp_in_an_untraceable_layer_is_tiled_per_call():
    torch.manual_seed(0)
    model = InlineLayer()
    (match,) = fxtile.find(model)
    assert match.pattern == "plain" and match.roles["fc1"].endswith("fc1")
    tiled = tiled_copy(model, shards=4)
    x = torch.randn(2, 7, H, requires_grad=True)
    mask = (torch.rand(2, 7) > 0.3).float()
    scale = (torch.randn(H), torch.randn(H))
    assert_same_outputs_and_grads(model, tiled, x)
    calls = [((x,), {}), ((x, mask), {}), ((x,), {"scale": scale, "use_extra": True, "extra_kw": 3})]
    for args, kwargs in calls:
        model.zero_grad(), tiled.zero_grad()
        xr, xt = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        yr, yt = model(xr, *args[1:], **kwargs), tiled(xt, *args[1:], **kwargs)
        torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
        cot = torch.randn_like(yr)
        (yr * cot).sum().backward()
        (yt * cot).sum().backward()
        torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), tiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert fxtile.testing.call_graphs(tiled) == {"": 3}, "one tiled graph per call signature"
    assert fxtile.testing.untiled_calls(tiled) == {"": 0}


class Scale:
    """A non-tensor argument the layer's own traced code reads (not only passes to a leaf)."""

    def __getitem__(self, i):
        return torch.ones(H) if i == 0 else torch.zeros(H)


def test_an_object_argument_passed_through_is_tiled_and_one_the_code_reads_runs_untiled_with_a_warning():
    model = tiled_copy(InlineLayer(), shards=3)
    x = torch.randn(2, 5, H)
    out = model(x, extra_kw=object())  # an object that flows nowhere: keyed by its type, still tiled
    torch.testing.assert_close(out, InlineLayer.forward(model, x))
    assert fxtile.testing.untiled_calls(model) == {"": 0}
    with pytest.warns(UserWarning, match=r"\(root\) runs untiled for this call: its Scale argument is used by traced code"):
        out = model(x, scale=Scale())
    torch.testing.assert_close(out, InlineLayer.forward(model, x, scale=Scale()))
    assert fxtile.testing.untiled_calls(model) == {"": 1}


def test_mode_dependent_dropout_in_the_mlp_replays_the_forward_mask():
    """``F.dropout(..., training=self.training)`` in the MLP: one graph per mode, and in train mode
    the recompute reuses the forward's dropout masks (compared with the same shards run with autograd)."""
    torch.manual_seed(0)
    model = InlineLayer(dropout=0.5).train()
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 6, H)
    torch.manual_seed(123)
    out = tiled(x)
    out.square().sum().backward()
    assert fxtile.testing.call_graphs(tiled) == {"": 1}
    # reference: the same layer with the MLP run on the same row shards from the same RNG state
    ref = copy.deepcopy(model)
    mixed, _ = ref.mix(x)
    h = x + mixed
    rows = ref.norm(h).reshape(-1, H)
    torch.manual_seed(123)
    parts = []
    for lo, hi in shard_bounds(12, 3):
        a = F.dropout(F.gelu(ref.fc1(rows[lo:hi])), p=0.5, training=True)
        parts.append(ref.fc2(a))
    ref_out = h + torch.cat(parts).reshape(2, 6, H)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out)
    for (n, p), q in zip(ref.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{n}: {m}")
    tiled.eval()
    torch.testing.assert_close(tiled(x), model.eval()(x))


# --- blocks with several required inputs -----------------------------------------------------


class TwoInputs(nn.Module):
    """``forward(hidden, residual)`` (BLOOM's MLP): both inputs traced as placeholders."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, hidden, residual):
        return residual + self.down(F.gelu(self.up(hidden)))


def test_block_with_two_required_inputs():
    torch.manual_seed(0)
    model = TwoInputs()
    tiled = tiled_copy(model, shards=4)
    assert [m.pattern for m in fxtile.find(tiled)] == ["plain"]
    assert_same_outputs_and_grads(model, tiled, torch.randn(3, 5, H, requires_grad=True),
                                  torch.randn(3, 5, H, requires_grad=True))


# --- PEFT LoRA on an inline MLP (traced per call) --------------------------------------------


def test_peft_lora_on_an_inline_mlp_keeps_exact_lora_grads():
    peft = pytest.importorskip("peft")
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = T.OPTConfig(hidden_size=32, ffn_dim=72, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                         max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0)
    model = T.OPTForCausalLM(config).eval()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    tiled = tiled_copy(lora, shards=4)
    assert [m.pattern for m in fxtile.find(tiled)] == ["plain", "plain"]
    ids = torch.randint(0, 100, (2, 7))
    assert_same_outputs_and_grads(lora, tiled, ids, out_fn=lambda o: o.logits, atol=2e-5, rtol=1e-4)
    trainable = [n for n, p in tiled.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in tiled.named_parameters() if "lora_" in n)


# --- activations with parameters computed in forward, norms inside the MLP --------------------


class XIELULike(nn.Module):
    """xIELU-style activation: parameters transformed in forward (softplus), comparisons, ``where``,
    a binary ``torch.min`` against a scalar buffer-like parameter."""

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor(0.8))
        self.alpha_n = nn.Parameter(torch.tensor(0.8))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.eps = nn.Parameter(torch.tensor(-1e-6), requires_grad=False)

    def forward(self, x):
        alpha_p, alpha_n = F.softplus(self.alpha_p), self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x)


class PlainXIELU(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(H, I), XIELULike(), nn.Linear(I, H)

    def forward(self, z):
        return self.down(self.act(self.up(z)))


class SubNormGated(nn.Module):
    """Gated MLP with an RMSNorm over the intermediate features before the down projection (BitNet),
    cast to fp32 and back via ``x.dtype``."""

    def __init__(self):
        super().__init__()
        self.g, self.u, self.d = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, I))

    def forward(self, z):
        h = torch.relu(self.g(z)).square() * self.u(z)
        f = h.to(torch.float32)
        f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.d(self.w * f.to(h.dtype))


class TokenCentered(nn.Module):
    """Subtracts the mean over *tokens* (dim 0 of the rows) inside the MLP: mixes rows, never tiled."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, z):
        h = F.gelu(self.a(z))
        return self.b(h - h.mean(1, keepdim=True))


@pytest.mark.parametrize("cls, pattern", [(PlainXIELU, "plain"), (SubNormGated, "gated")])
def test_parametrized_activations_and_row_norms_inside_the_mlp(cls, pattern):
    torch.manual_seed(0)
    model = cls()
    tiled = tiled_copy(model, shards=4)
    assert [m.pattern for m in fxtile.find(tiled)] == [pattern]
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 7, H, requires_grad=True))


def test_a_reduction_over_tokens_inside_the_mlp_is_never_tiled():
    assert fxtile.find(TokenCentered()) == []


# --- the new region kinds keep the invariants: re-tile, restore, deepcopy ----------------------


@pytest.mark.parametrize("make, inputs", [
    (MoE, lambda: (torch.randn(2, 7, H),)),
    (InlineLayer, lambda: (torch.randn(2, 7, H),)),
])
def test_new_region_kinds_retile_restore_and_deepcopy(make, inputs):
    torch.manual_seed(0)
    model = make()
    reference = copy.deepcopy(model)
    x = inputs()
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    fxtile.transform(model, shards=2)
    fxtile.transform(model, shards=5)  # a new shard count re-tiles
    assert [m.policy for m in fxtile.find(model)] == [fxtile.ShardPolicy(shards=5)]
    torch.testing.assert_close(first(model(*x)), first(reference(*x)), rtol=1e-5, atol=1e-6)
    clone = copy.deepcopy(model)  # independent weights, still tiled
    assert all(m.tiled for m in fxtile.find(clone))
    torch.testing.assert_close(first(clone(*x)), first(reference(*x)), rtol=1e-5, atol=1e-6)
    assert fxtile.restore(model) is model
    assert not any(set(vars(m)) - set(vars(r)) for m, r in zip(model.modules(), reference.modules()))
    assert torch.equal(first(model(*x)), first(reference(*x)))


class PositionalOnly(nn.Module):
    """``forward(x, /, flag=False, *rest)``: positional-only and variadic arguments survive the keying."""

    def __init__(self):
        super().__init__()
        self.mix, self.a, self.b = Mixer(), nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x, /, flag=False, *rest):
        x = x + self.mix(x)[0]
        if flag:
            x = x * 2
        return x + self.b(F.relu(self.a(x))) + sum(rest)


def test_positional_only_and_variadic_arguments():
    torch.manual_seed(0)
    model = PositionalOnly()
    tiled = tiled_copy(model, shards=3)
    x = torch.randn(2, 5, H)
    for args in [(), (True,), (False, torch.ones(H), torch.ones(H))]:
        torch.testing.assert_close(tiled(x, *args), model(x, *args))
    assert fxtile.testing.call_graphs(tiled) == {"": 3}
    assert_same_outputs_and_grads(model, tiled, x.requires_grad_())

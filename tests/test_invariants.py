"""Invariants 2-4: nothing lost, reversible, idempotent, no silent failure, safe by construction."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fxtile
import fxtile.testing
import modules as M
from helpers import assert_same_outputs_and_grads, profiled_matmuls, ran_tiled, tiled_copy, tiny_causal_lm


def test_parameters_state_dict_names_and_hooks_are_unchanged():
    model = tiny_causal_lm("llama")
    params_before = {n: p for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_modules()]
    fired = []
    model.model.layers[0].mlp.register_forward_hook(lambda *a: fired.append("hook"))
    assert fxtile.transform(model, shards=2) is model
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all(a is b for a, b in zip(model.parameters(), params_before.values()))
    after = model.state_dict()
    assert list(after) == list(state_before)
    assert all(torch.equal(after[k], v) for k, v in state_before.items())
    assert [n for n, _ in model.named_modules()] == names_before
    model(torch.randint(0, 97, (1, 5)))
    assert fired == ["hook"]


def test_the_tiled_path_really_runs():
    model = tiled_copy(M.Odd(), shards=3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    matmuls = profiled_matmuls(lambda: model(x).sum().backward())
    rows = [shapes[1][0] for name, shapes, _ in matmuls if name == "aten::addmm"]  # bias + rows @ W^T
    assert rows[:9] == [3, 3, 3, 3, 3, 3, 4, 4, 4], "3 forward shards of 10 rows, 3 projections each"
    assert max(r for r in rows) < 10, "no matmul ever sees all 10 rows"
    assert ran_tiled(model, lambda: model(x).sum().backward()) == (3, 3), "3 forward shards, 3 recomputed"


def test_transform_twice_is_transform_once():
    """A second transform with the same shards keeps what the first installed: the same forwards and the same
    regions (their op counters go on counting), and a walk that does not read the last report (another
    filter_fn) finds the same matches."""
    model = tiled_copy(M.Stack(), shards=2)
    forwards = {n: m.forward.__func__ for n, m in model.named_modules() if "forward" in m.__dict__}
    x = torch.randn(2, 5, 12, requires_grad=True)
    model(x).sum().backward()
    counts = fxtile.testing.shard_counts(model)
    assert counts and all(c.forward_calls == 1 for c in counts.values()), counts
    assert fxtile.transform(model, shards=2) is model
    assert fxtile.testing.shard_counts(model) == counts  # the same regions, not rebuilt ones at zero
    assert {n: m.forward.__func__ for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    walked = fxtile.find(model, filter_fn=lambda module, fqn: True)
    assert [(m.path, m.pattern, m.policy) for m in walked] == [(m.path, m.pattern, m.policy) for m in fxtile.find(model)]


def test_transform_again_with_new_shards_retiles():
    model = tiled_copy(M.Odd(), shards=2)
    fxtile.transform(model, shards=5)
    assert [m.policy for m in fxtile.find(model)] == [fxtile.ShardPolicy(shards=5)]
    reference = M.Odd()
    reference.load_state_dict(model.state_dict())
    assert_same_outputs_and_grads(reference, model, torch.randn(2, 5, 12, requires_grad=True))


def test_restore_brings_back_the_original_forward_exactly():
    model = M.Stack()
    reference = copy.deepcopy(model)
    attributes = [set(vars(m)) for m in model.modules()]
    fxtile.transform(model, shards=3)
    assert any(m.tiled for m in fxtile.find(model))
    assert [set(vars(m)) for m in model.modules()] != attributes
    assert fxtile.restore(model) is model
    assert [set(vars(m)) for m in model.modules()] == attributes, "restore leaves no attribute behind"
    assert all(not m.tiled for m in fxtile.find(model)) and len(fxtile.find(model)) == 3
    x = torch.randn(2, 5, 12)
    assert torch.equal(model(x), reference(x))
    for (n, p), (m, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert n == m and torch.equal(p, q)
    assert fxtile.restore(model) is model  # restoring an untiled model is a no-op


def test_find_is_a_dry_run():
    model = M.Stack()
    matches = fxtile.find(model)
    assert len(matches) == 3 and not any(m.tiled for m in matches)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_model_without_mlps_is_left_alone_with_a_warning():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(-1), torch.nn.Linear(4, 4))
    assert fxtile.find(model) == []
    with pytest.warns(UserWarning, match="found no MLP"):
        fxtile.transform(model)
    assert "forward" not in model.__dict__


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.branchy, self.fine = M.Branchy(), M.Odd()

    def forward(self, z):
        return self.fine(self.branchy(z))


def test_an_untraceable_block_is_reported_and_the_rest_is_still_tiled():
    model = Mixed()
    found = fxtile.find(model)
    assert [m.path for m in found] == ["fine"]
    (skip,) = found.skipped
    assert skip.path == "branchy" and skip.why is fxtile.Why.UNTRACED and "TraceError" in skip.reason, skip
    tiled = tiled_copy(model, shards=3)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 4, 12).abs().requires_grad_())


@pytest.mark.parametrize(
    "cls, reason",
    [
        (M.TokenMixer, "transpose"),
        (M.Leaky, "also used outside the region"),
        (M.Stateful, "holds buffers"),
    ],
)
def test_unsafe_blocks_are_never_tiled_and_say_why(cls, reason):
    model = cls()
    found = fxtile.find(model)
    assert found == []
    assert any(s.why is fxtile.Why.REFUSED and reason in s.reason for s in found.skipped), found.skipped
    with pytest.warns(UserWarning, match="found no MLP"):
        fxtile.transform(model)
    assert "forward" not in model.__dict__


def test_mode_dependent_trace_is_traced_per_mode():
    """``F.dropout(..., self.training)`` bakes the mode into the trace: such a block is traced per call
    key (which includes ``self.training``), so each mode runs its own graph (mask replay: test_patterns)."""

    class DropF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, z):
            return self.b(torch.nn.functional.dropout(torch.relu(self.a(z)), 0.1, self.training))

    found = fxtile.find(DropF())
    assert [m.pattern for m in found] == ["plain"]
    model = DropF().eval()
    tiled = tiled_copy(model, shards=3)
    assert_same_outputs_and_grads(model, tiled, torch.randn(2, 5, 8, requires_grad=True))
    assert fxtile.testing.call_graphs(tiled) == {"": 1}
    tiled.train()(torch.randn(2, 5, 8))
    assert fxtile.testing.call_graphs(tiled) == {"": 2}, "train mode is another call key: its own graph"


def test_filter_fn_selects_blocks_by_name():
    model = M.Stack()
    fxtile.transform(model, shards=2, filter_fn=lambda module, fqn: fqn != "tail")
    assert sorted(m.path for m in fxtile.find(model) if m.tiled) == ["blocks.0.ffwd", "blocks.1.ffwd"]


def test_deepcopy_of_a_tiled_model_is_independent_and_exact():
    model = tiled_copy(M.Residual(), shards=3)
    clone = copy.deepcopy(model)
    assert clone.ffwd.wa.weight is not model.ffwd.wa.weight
    assert [m.tiled for m in fxtile.find(clone)] == [True]
    x = torch.randn(2, 5, 12)
    clone(x).sum().backward()
    assert model.ffwd.wa.weight.grad is None and clone.ffwd.wa.weight.grad is not None
    fxtile.restore(clone)
    assert [m.tiled for m in fxtile.find(model)] == [True]


def test_state_dict_round_trip_and_save_pretrained(tmp_path):
    import transformers as T

    model = tiny_causal_lm("llama")
    tiled = tiled_copy(model, shards=2)
    tiled.save_pretrained(tmp_path)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    buffer = io.BytesIO()
    torch.save(tiled.state_dict(), buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer))


def test_generate_works_on_a_tiled_model():
    model = tiny_causal_lm("llama")
    tiled = tiled_copy(model, shards=2)
    prompt = torch.randint(1, 97, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tiled.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_gradient_checkpointing_stays_exact():
    model = tiny_causal_lm("qwen2").train()
    model.gradient_checkpointing_enable()
    tiled = tiled_copy(model, shards=3)
    ids = torch.randint(0, 97, (2, 9))
    assert_same_outputs_and_grads(model, tiled, ids, out_fn=lambda o: o.logits, atol=2e-5, rtol=1e-4)


def test_peft_lora_projections_keep_exact_lora_grads():
    peft = pytest.importorskip("peft")
    model = tiny_causal_lm("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, config)
    for n, p in lora.named_parameters():  # non-zero B so LoRA contributes to the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    tiled = tiled_copy(lora, shards=3)
    assert all(m.tiled for m in fxtile.find(tiled)) and len(fxtile.find(tiled)) == 2
    ids = torch.randint(0, 97, (2, 7))
    assert_same_outputs_and_grads(lora, tiled, ids, out_fn=lambda o: o.logits, atol=2e-5, rtol=1e-4)
    trainable = [n for n, p in tiled.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_replacing_a_tiled_submodule_fails_loudly():
    model = tiled_copy(M.Odd(), shards=2)
    model.wa = M.MyLinear(12, 28)
    with pytest.raises(RuntimeError, match="'wa' is now MyLinear.*fxtile.restore"):
        model(torch.randn(1, 3, 12))


class Linear(torch.nn.Linear):
    """Shares its class name with torch.nn.Linear, as PEFT's lora.Linear does."""


def test_a_replacement_of_the_same_class_name_is_named_by_its_qualified_name():
    model = tiled_copy(M.Odd(), shards=2)
    model.wa = Linear(12, 28)
    with pytest.raises(RuntimeError, match=r"'wa' is now test_invariants\.Linear, but was torch\.nn\.modules\.linear\.Linear"):
        model(torch.randn(1, 3, 12))


def test_hooks_inside_a_tiled_region_are_reported():
    model = M.Odd()
    model.wa.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"wa inside a tiled region has module hooks.*filter_fn"):
        fxtile.transform(model, shards=2)


def test_a_refused_restore_leaves_the_tiling_intact():
    model = tiled_copy(M.Stack(), shards=2)
    block = model.blocks[0].ffwd
    tiled_forward = block.forward
    block.forward = lambda z: tiled_forward(z)  # someone wraps it after transform
    with pytest.raises(RuntimeError, match="was replaced after fxtile.transform"):
        fxtile.restore(model)
    assert all(m.tiled for m in fxtile.find(model)), "nothing may be half-restored"
    block.forward = tiled_forward
    fxtile.restore(model)
    assert not any(m.tiled for m in fxtile.find(model))


def test_a_failed_retile_keeps_the_old_tiling():
    model = tiled_copy(M.Stack(), shards=2)
    x = torch.randn(2, 5, 12)
    before = model(x)

    def boom(module, fqn):  # fails on the last block, after the first two were taken off for re-tiling
        if fqn == "tail":
            raise RuntimeError("boom")
        return True

    with pytest.raises(RuntimeError, match="boom"):
        fxtile.transform(model, shards=5, filter_fn=boom)
    assert [m.policy for m in fxtile.find(model)] == [fxtile.ShardPolicy(shards=2)] * 3
    assert torch.equal(model(x), before)


def test_an_instance_level_forward_is_reported_not_bypassed():
    model = M.Odd()
    original = model.forward
    model.forward = lambda q: original(q) * 2
    found = fxtile.find(model)
    assert found == [] and "instance-level forward" in found.skipped[0].reason


def test_each_module_inside_a_region_keeps_its_own_train_eval_mode():
    reference = M.ParamAct(p=0.5).train()
    model = tiled_copy(reference, shards=2).train()
    reference.drop.eval()
    model.drop.eval()  # dropout off, the rest in training: the tiled region must not apply dropout
    assert_same_outputs_and_grads(reference, model, torch.randn(2, 5, 12, requires_grad=True))


def test_changing_a_peft_adapter_after_transform_raises_instead_of_running_stale():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = fxtile.transform(peft.get_peft_model(tiny_causal_lm("llama"), config), shards=2)
    ids = torch.randint(0, 97, (1, 6))
    model(ids)
    with model.disable_adapter(), pytest.raises(RuntimeError, match="changed since fxtile.transform"):
        model(ids)
    model(ids)  # back to the state it was tiled in


def test_pickling_a_tiled_model_says_what_to_do():
    import pickle

    model = tiled_copy(M.Odd(), shards=2)
    with pytest.raises(TypeError, match="fxtile.restore"):
        pickle.dumps(model)
    torch.save(fxtile.restore(model), io.BytesIO())  # restored, the model pickles again

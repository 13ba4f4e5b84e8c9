"""Contracts of the graph passes (``passes/``), tested on their own: trace -> match -> region -> rewrite.

Matching is pure; a graph without a region comes back unchanged and unmodified; every rewritten graph
lints; each filter states its reason; the generated code of a rewritten Llama MLP is pinned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtile
import modules as M
from fxtile.region import tiled
from helpers import tiny_causal_lm
from fxtile.passes.labels import LINEAR, label
from fxtile.passes.match import find_candidates
from fxtile.passes.patterns import MLP_PATTERNS
from fxtile.passes.cut import cut_region
from fxtile.passes.rewrite import rewrite
from fxtile.passes.trace import trace


def _graph(module):
    result = trace(module)
    assert result.graph_module is not None, result.reason
    return result.graph_module


def _snapshot(gm):
    return gm.code, [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def _rewrite_all(gm):
    candidates, _ = find_candidates(gm)
    calls = [(c, tiled(cut_region(gm, c, f"{c.pattern}_{i}"), fxtile.ShardPolicy())) for i, c in enumerate(candidates)]
    return rewrite(gm, calls)


@pytest.mark.parametrize("make", [M.Odd, M.FusedUpFirst, M.FusedSplit, M.ParamAct, M.Functional, M.Residual,
                                  M.FlatResidual, M.Leaky, M.TokenMixer])
def test_matching_is_pure(make):
    gm = _graph(make())
    before = _snapshot(gm)
    find_candidates(gm)
    label(gm)
    assert _snapshot(gm) == before


def test_a_graph_without_a_region_comes_back_unchanged_and_marked_unmodified():
    gm = _graph(nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 4)))
    before = _snapshot(gm)
    assert find_candidates(gm) == ([], [])
    result = _rewrite_all(gm)
    assert result.modified is False and result.graph_module is gm
    assert _snapshot(gm) == before


@pytest.mark.parametrize("make", [M.Odd, M.FusedUpFirst, M.FusedSplit, M.ParamAct, M.Functional, M.Residual,
                                  M.FlatResidual, M.Stack])
def test_every_rewritten_graph_lints_and_computes_the_same(make):
    torch.manual_seed(0)
    module = make()
    gm = _graph(module)
    x = torch.randn(2, 5, 12)
    expected = gm(x)
    result = _rewrite_all(gm)
    calls = [n for n in result.graph_module.graph.nodes if n.op == "call_function" and str(n.target).startswith("fxtile_")]
    assert result.modified and len(calls) == (3 if isinstance(module, M.Stack) else 1), calls  # Stack: 3 MLPs, one graph
    result.graph_module.graph.lint()
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-6)


def test_the_rewritten_llama_mlp_is_one_call_with_its_weights_as_inputs():
    gm = _graph(tiny_causal_lm("llama").model.layers[0].mlp)
    assert _rewrite_all(gm).modified
    assert gm.code.strip() == """\
def forward(self, x):
    gate_proj_1 = self.gate_proj
    up_proj_1 = self.up_proj
    down_proj_1 = self.down_proj
    gate_proj_weight = self.gate_proj.weight
    up_proj_weight = self.up_proj.weight
    down_proj_weight = self.down_proj.weight
    gated_0 = fxtile_gated_0((x,), (gate_proj_1, up_proj_1, down_proj_1), (gate_proj_weight, up_proj_weight, down_proj_weight));  x = gate_proj_1 = up_proj_1 = down_proj_1 = gate_proj_weight = up_proj_weight = down_proj_weight = None
    return gated_0"""


def test_each_pattern_is_an_object_with_its_graph_and_a_cut_that_finds_its_own_shape():
    assert [p.name for p in MLP_PATTERNS] == ["gated", "gated_fused", "plain"]
    for pattern, make in zip(MLP_PATTERNS, (M.Odd, M.FusedUpFirst, M.PlainSwish)):
        assert pattern.graph.number_of_nodes() >= 3 and not pattern.nests
        candidates, rejections = find_candidates(_graph(make()))
        assert [c.pattern for c in candidates] == [pattern.name] and rejections == [], (pattern.name, candidates, rejections)


class _Escapes(nn.Module):  # the activation is also returned: it cannot be recomputed away
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = F.gelu(self.a(x))
        return self.b(h), h


class _Transposed(_Escapes):  # the rows the MLP sees are features, not tokens
    def forward(self, x):
        return self.b(F.gelu(self.a(x.transpose(-1, -2))))


class _Counting(nn.Module):  # a projection that updates a buffer in forward
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)
        self.a.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class _Chain(nn.Module):  # a -> act -> b -> act -> c -> act -> d: plain MLPs (a, b), (b, c), (c, d), none widening
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.d(F.relu(self.c(F.gelu(self.b(F.relu(self.a(x)))))))


class _Widening(_Escapes):  # H -> H -> wider: an output head after a transform (BERT's), not an MLP
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 32)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("make, accepted, reason", [
    (_Escapes, [], "is also used outside the region"),
    (_Transposed, [], "so its rows may not be tokens"),
    (_Counting, [], "holds buffers, which its forward may update"),
    (_Chain, [{"fc1": "a", "fc2": "b"}, {"fc1": "c", "fc2": "d"}], "overlaps the plain region ending at b"),
    (_Widening, [], "its second projection widens (8 -> 32)"),
], ids=["contained", "rows_are_tokens", "stateless", "no_overlap", "contracts_back"])
def test_each_filter_refuses_what_it_names_with_its_reason(make, accepted, reason):
    """The filters run in order on every candidate; each rejection comes back with its reason (the
    overlap filter included: the larger, earlier region is kept)."""
    found, rejected = find_candidates(_graph(make()))
    assert [c.roles for c in found] == accepted
    assert any(reason in r.reason for r in rejected), rejected


def test_a_sum_of_linear_maps_of_one_input_is_labelled_one_projection():
    class LoRAUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.a, self.b = nn.Linear(8, 32), nn.Linear(8, 2, bias=False), nn.Linear(2, 32, bias=False)

        def forward(self, x):
            return self.w(x) + self.b(self.a(F.dropout(x, 0.1, False))) * 0.5

    gm = _graph(LoRAUp())
    labels = label(gm)
    linear = [n.name for n, kind in labels.kind.items() if kind == LINEAR]
    assert linear == ["add"], "the three projections and their glue are one projection of x"
    (add,) = [n for n in gm.graph.nodes if n.name == "add"]
    assert labels.proj_input[add].name == "x"
    assert [n.name for n in labels.inner[add]] == ["w", "dropout", "a", "b", "mul"]

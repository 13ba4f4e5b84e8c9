"""Invariant 3: bad arguments raise a clear error that names the argument."""

import pytest
import torch

import fxtile
import modules as M


@pytest.mark.parametrize(
    "shards, error",
    [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("lots", ValueError), (True, TypeError), (None, TypeError)],
)
def test_bad_shards_name_the_argument(shards, error):
    with pytest.raises(error, match="shards"):
        fxtile.transform(M.Odd(), shards=shards)


def test_bad_policy_fields_name_the_field():
    with pytest.raises(ValueError, match="min_tokens"):
        fxtile.ShardPolicy(min_tokens=0)
    with pytest.raises(ValueError, match="budget"):
        fxtile.ShardPolicy(budget=-1.0)
    with pytest.raises(ValueError, match="shards"):
        fxtile.ShardPolicy(shards=0)


def test_model_and_filter_fn_are_checked():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fxtile.transform("llama")
    with pytest.raises(TypeError, match="filter_fn"):
        fxtile.transform(M.Odd(), filter_fn="mlp")
    with pytest.raises(TypeError, match="model"):
        fxtile.restore(None)


def test_a_bad_call_leaves_the_model_untouched():
    model = M.Odd()
    with pytest.raises(ValueError):
        fxtile.transform(model, shards=0)
    assert "forward" not in model.__dict__ and fxtile.find(model)[0].tiled is False


def test_auto_policy_rule():
    policy = fxtile.ShardPolicy()
    # memory: intermediate 4x hidden, budget 1/8 -> 32 shards; speed: never below min_tokens=512 rows
    assert policy.count(rows=16384, hidden=512, intermediate=2048) == 32
    assert policy.count(rows=4096, hidden=512, intermediate=2048) == 8
    assert policy.count(rows=100, hidden=512, intermediate=2048) == 1
    assert fxtile.ShardPolicy(shards=7).count(rows=3, hidden=8, intermediate=32) == 7


def test_auto_runs_short_inputs_untiled():
    from helpers import ran_tiled

    model = fxtile.transform(M.Odd())
    assert ran_tiled(model, lambda: model(torch.randn(2, 5, 12)).sum().backward()) == (0, 0)

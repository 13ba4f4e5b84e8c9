"""What fxtile says when it has nothing to do, and where a mismatched input fails.

A model with nothing to tile gets one warning that says how much was looked at, and points to
``find(model).skipped`` only when that list has something in it. An input of another dtype or device than a
tiled region's weights fails at the tiled call, naming the region, with the exception type the untiled
model raises (and only where the untiled model raises too), instead of dozens of frames deep in the op.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtile
import modules as M
from helpers import TINY, ran_tiled, tiled_copy

REGION_FILE = os.path.join("fxtile", "region.py")


# --- nothing to tile -------------------------------------------------------------------------------------


def test_nothing_to_tile_says_what_was_looked_at_and_points_to_no_empty_list():
    model = nn.Linear(8, 8)
    assert fxtile.find(model).skipped == []  # nothing there to point to
    with pytest.warns(UserWarning, match=r"found no MLP to tile in Linear \(1 module looked at, none with the shape "
                                         r"of an MLP or expert bank .*loss=True also looks for a loss head") as record:
        fxtile.transform(model)
    (warning,) = [w for w in record if "found no MLP" in str(w.message)]
    assert ".skipped" not in str(warning.message)
    assert "forward" not in model.__dict__


def test_nothing_to_tile_with_loss_says_it_looked_for_a_loss_head_too():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 4))
    assert fxtile.find(model, loss=True).skipped == []
    with pytest.warns(UserWarning, match=r"found no MLP to tile in Sequential \(4 modules looked at, none with the "
                                         r"shape of an MLP or expert bank .*nor of a loss head") as record:
        fxtile.transform(model, loss=True)
    assert not any(".skipped" in str(w.message) for w in record)


def test_nothing_tiled_with_one_refused_block_names_it_and_its_reason():
    model = M.TokenMixer()
    (skip,) = fxtile.find(model).skipped
    assert "transpose" in skip.reason
    with pytest.warns(UserWarning, match=r"found no MLP to tile in TokenMixer \(4 modules looked at\); 1 block looks "
                                         r"like one and was left as it is \(\(root\): .*transpose.*\); "
                                         r"fxtile\.find\(model\)\.skipped lists it"):
        fxtile.transform(model)


class _TwoRefused(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer, self.leaky = M.TokenMixer(), M.Leaky()

    def forward(self, x):
        return self.leaky(self.mixer(x))


def test_nothing_tiled_with_several_refused_blocks_gives_the_count_and_the_call_that_lists_them():
    model = _TwoRefused()
    assert [s.path for s in fxtile.find(model).skipped] == ["mixer", "leaky"]
    with pytest.warns(UserWarning, match=r"\(9 modules looked at\); 2 blocks look like one and were left as they are "
                                         r"\(the first, mixer: .*transpose.*\); fxtile\.find\(model\)\.skipped lists "
                                         r"each with its reason"):
        fxtile.transform(model)


def test_nothing_tiled_because_of_filter_fn_points_to_find_with_that_filter():
    def nothing(module, fqn):
        return False

    model = M.Odd()
    (skip,) = fxtile.find(model, filter_fn=nothing).skipped
    assert skip.why is fxtile.Why.EXCLUDED
    with pytest.warns(UserWarning, match=r"1 block looks like one .*excluded by filter_fn.*"
                                         r"fxtile\.find\(model, filter_fn=filter_fn\)\.skipped lists it"):
        fxtile.transform(model, filter_fn=nothing)


# --- a mismatched input fails at the tiled call ------------------------------------------------------------


def _raised(call) -> tuple[BaseException, list[traceback.FrameSummary]]:
    with pytest.raises(Exception) as info:
        call()
    return info.value, traceback.extract_tb(info.value.__traceback__)


def _assert_raised_in_fxtile_at_the_call(frames: list[traceback.FrameSummary], untiled: list) -> None:
    assert frames[-1].filename.endswith(REGION_FILE), frames[-1]
    assert not any(f"torch{os.sep}_library" in f.filename or f"torch{os.sep}_dynamo" in f.filename for f in frames)
    # here: the caller, two frames of nn.Module's call, the rewritten forward, the tiled call and its check
    assert len(frames) <= min(8, len(untiled) + 1), [f"{f.filename}:{f.lineno}" for f in frames]


@pytest.mark.parametrize("weights, given", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_an_input_of_another_dtype_raises_at_the_tiled_call_naming_the_region(weights, given):
    model = M.Odd().to(weights)
    tiled = tiled_copy(model, shards=2)
    x = torch.randn(2, 8, 12, dtype=given)
    expected, untiled_frames = _raised(lambda: model(x))
    assert type(expected) is RuntimeError  # what F.linear raises
    error, frames = _raised(lambda: tiled(x))
    assert type(error) is type(expected)
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    assert f"tiled region gated_0 (wb, wa, wo) got a {name(given)} input, but its weights are {name(weights)}" \
        in str(error)
    assert f".to({weights})" in str(error)  # the remedy
    _assert_raised_in_fxtile_at_the_call(frames, untiled_frames)


def test_a_transformers_mlp_given_float64_raises_at_the_call_not_in_the_op():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    mlp = llama.model.layers[0].mlp
    tiled = tiled_copy(mlp, shards=2)
    x = torch.randn(2, 8, TINY["hidden_size"], dtype=torch.float64)
    expected, untiled_frames = _raised(lambda: mlp(x))
    error, frames = _raised(lambda: tiled(x))
    assert type(error) is type(expected) is RuntimeError
    assert "tiled region gated_0 (gate_proj, up_proj, down_proj) got a float64 input, but its weights are float32" \
        in str(error)
    _assert_raised_in_fxtile_at_the_call(frames, untiled_frames)


class _Head(nn.Module):
    """A projection to logits and its cross-entropy: the loss region."""

    def __init__(self, h=12, v=50):
        super().__init__()
        self.lm_head = nn.Linear(h, v, bias=False)

    def forward(self, h, labels):
        logits = self.lm_head(h)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1))


def test_a_tiled_loss_head_given_hidden_states_of_another_dtype_raises_at_the_call():
    model = _Head()
    tiled = fxtile.transform(copy.deepcopy(model), shards=2, loss=True)
    assert [m.pattern for m in fxtile.find(tiled, loss=True) if m.tiled] == ["linear_cross_entropy"]
    h, labels = torch.randn(2, 8, 12, dtype=torch.float64), torch.randint(0, 50, (2, 8))
    expected, untiled_frames = _raised(lambda: model(h, labels))
    error, frames = _raised(lambda: tiled(h, labels))
    assert type(error) is type(expected) is RuntimeError
    assert "tiled region linear_cross_entropy_0 (lm_head) got a float64 input, but its weights are float32" \
        in str(error)
    _assert_raised_in_fxtile_at_the_call(frames, untiled_frames)


def test_an_input_on_another_device_raises_at_the_tiled_call():
    """A CUDA input to CPU weights, on fake tensors (no GPU needed): the untiled model raises a RuntimeError
    (FakeTensorDeviceMismatchError is one) for it, the tiled call raises one before entering the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = M.Odd()
    tiled = tiled_copy(model, shards=2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 8, 12, device="cuda")
        assert tiled(torch.randn(2, 8, 12)).shape == (2, 8, 12)  # the same call on the weights' device runs
        expected, untiled_frames = _raised(lambda: model(x))
        error, frames = _raised(lambda: tiled(x))
    assert isinstance(expected, RuntimeError) and "same device" in str(expected)
    assert type(error) is RuntimeError
    assert "tiled region gated_0 (wb, wa, wo) got an input on cuda:0, but its weights are on cpu" in str(error)
    assert "model.to('cuda:0')" in str(error)
    _assert_raised_in_fxtile_at_the_call(frames, untiled_frames)


def _unbiased_odd() -> nn.Module:
    model = M.Odd()
    model.wa, model.wb = nn.Linear(12, 28, bias=False), nn.Linear(12, 28, bias=False)
    model.wo = nn.Linear(28, 12, bias=False)
    return model


def test_a_meta_input_is_left_to_the_region_as_torch_leaves_it():
    """torch takes a meta input to CPU weights without a bias (a meta result: shapes only) and refuses it with one
    (the bias add checks devices): the meta device is no mismatch fxtile can call, so the tiled call does as the
    untiled one does in both cases."""
    x = torch.randn(2, 8, 12, device="meta")
    unbiased = _unbiased_odd()
    assert unbiased(x).device.type == "meta"
    out = tiled_copy(unbiased, shards=2)(x)
    assert out.device.type == "meta" and out.shape == (2, 8, 12)
    biased = M.Odd()
    expected, _ = _raised(lambda: biased(x))
    error, _ = _raised(lambda: tiled_copy(biased, shards=2)(x))
    assert type(error) is type(expected) is RuntimeError and not str(error).startswith("fxtile")


def test_under_autocast_an_input_of_another_dtype_runs_as_untiled():
    """Under autocast the untiled model takes bf16 rows into fp32 weights (autocast casts both): no error."""
    torch.manual_seed(0)
    model = M.Odd()
    tiled = tiled_copy(model, shards=2)
    x = torch.randn(2, 8, 12).bfloat16()
    with pytest.raises(RuntimeError):
        model(x)  # without autocast the untiled model refuses it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(x), tiled(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


class _CastingLinear(nn.Linear):
    """A projection that casts its input to its weight's dtype itself (the untiled model takes any dtype)."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


def test_a_region_that_casts_its_input_itself_takes_other_dtypes_and_still_runs_tiled():
    """The untouched region takes a float64 input (its projections cast it): the tiled call finds so on one
    row and runs tiled, exact, with nothing to say."""
    torch.manual_seed(0)
    model = M.Odd()
    model.wa, model.wb = _CastingLinear(12, 28), _CastingLinear(12, 28)
    tiled = tiled_copy(model, shards=2)
    x = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    ref = model(x)  # no error untiled
    ref.sum().backward()
    expected, x.grad = x.grad, None
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even "ran untiled"
        assert ran_tiled(tiled, lambda: out.append(tiled(x)) or out[0].sum().backward()) == (2, 2)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


def test_weights_of_mixed_dtypes_are_left_to_the_region():
    """bf16 gate/up with an fp32 down projection: the tiled call does not claim to know which dtype is right, and
    raises what the untiled region raises, from inside it."""
    model = M.Odd()
    model.wa.bfloat16(), model.wb.bfloat16()
    tiled = fxtile.transform(copy.deepcopy(model), shards=2, verify=False)
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    expected, _ = _raised(lambda: model(x))
    error, frames = _raised(lambda: tiled(x))
    assert type(error) is type(expected) is RuntimeError
    assert not str(error).startswith("fxtile") and not frames[-1].filename.endswith(REGION_FILE)


def test_a_compiled_tiled_call_given_another_dtype_raises_as_before():
    """Under torch.compile(fullgraph=True) the untiled region cannot be tried on a mismatched input (dynamo
    traces it), so the call goes to the op as before and dynamo reports the error: a RuntimeError still, and
    a matching input compiles with no graph break."""
    torch.manual_seed(0)
    model = M.Odd()
    compiled = torch.compile(tiled_copy(model, shards=2), fullgraph=True)
    x = torch.randn(2, 8, 12)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        compiled(x.double())


# --- the examples print what is theirs --------------------------------------------------------------------

_NOISE_PROBE = r"""
import json, logging, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
if sys.argv[2] == "quiet":
    from fxtile.noise import quiet_library_noise
    quiet_library_noise()
import transformers as T
T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=11, head_dim=8))
logging.getLogger("torchao").warning("a torchao message of another kind")
with warnings.catch_warnings(record=True) as seen:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_gather_into_tensor(torch.empty(2), torch.ones(2))  # what DeepSpeed's ZeRO calls
    dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2))
    warnings.warn("the user's own deprecation", FutureWarning)
    dist.destroy_process_group()
print(json.dumps(sorted(str(w.message) for w in seen if w.category is FutureWarning)))
"""


def _noise(quiet: str) -> tuple[str, list[str]]:
    """(stderr, FutureWarnings) of a process that builds a transformers model, logs a torchao message and
    meets torch.distributed's deprecations, with fxtile's programs' filters installed first (``"quiet"``) or
    none."""
    import json
    import subprocess
    import sys

    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    done = subprocess.run([sys.executable, "-c", _NOISE_PROBE, examples, quiet], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unfiltered() -> tuple[str, list[str]]:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchao") is None or torch.version.cuda is not None:
        pytest.skip("the noise is torchao's CUDA wheel on a CPU-only torch")
    stderr, future = _noise("none")
    # what the filters are for must be there without them, or the tests below could not fail
    assert "torchao/_C_mxfp8" in stderr and "torchao/_C_cutlass_90a" in stderr, stderr[-3000:]
    assert stderr.count("is an Enum subclass") == 2, stderr[-3000:]
    assert len(future) == 3 and "the user's own deprecation" in future, future
    return stderr, future


def test_fxtiles_programs_drop_library_noise_and_keep_other_messages(unfiltered):
    stderr, future = _noise("quiet")
    assert "Failed to load" not in stderr and "is an Enum subclass" not in stderr, stderr[-3000:]
    assert "a torchao message of another kind" in stderr
    assert future == ["the user's own deprecation"], future  # DeepSpeed's deprecated collectives are ignored


@pytest.mark.parametrize("argv", [["-m", "fxtile", "convert", "llama", "--seq-len", "1024", "--no-loss", "--no-verify"],
                                  [os.path.join("examples", "tile_llama.py"), "--seq-len", "256"]])
def test_the_command_and_the_example_print_no_library_noise(unfiltered, argv):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr and "Warning" not in done.stderr, \
        done.stderr[-3000:]


def test_a_deep_copy_of_a_called_tiled_model_warns_nothing():
    """A model tiled with its loss head holds the output spec of the call it traced; deep-copying a TreeSpec
    warns from inside torch 2.13, so a copy shares it (it is immutable) and says nothing."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = fxtile.transform(T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 1})), shards=2, loss=True)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        twin = copy.deepcopy(model)
    assert [str(w.message) for w in seen] == []
    torch.testing.assert_close(twin(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)


class _CastingDropout(nn.Module):
    """Casts its input itself (inside its first projection, a leaf), then a dropout: the one-row try must not
    draw from the generator."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.drop = _CastingLinear(12, 40), nn.Linear(40, 12), nn.Dropout(0.5)

    def forward(self, x):
        return self.down(self.drop(F.silu(self.up(x))))


def test_trying_a_mismatched_input_draws_no_random_numbers():
    torch.manual_seed(0)
    tiled = tiled_copy(_CastingDropout().train(), shards=2)
    x = torch.randn(2, 8, 12)
    states = []
    for given in (x, x.double()):  # the same call, matching and mismatched: the same draws
        torch.manual_seed(1)
        out = []
        assert ran_tiled(tiled, lambda: out.append(tiled(given))) == (2, 0)  # the mismatched one was tried, then tiled
        states.append((torch.get_rng_state(), out[0]))
    assert torch.equal(states[0][0], states[1][0])
    torch.testing.assert_close(states[1][1], states[0][1])

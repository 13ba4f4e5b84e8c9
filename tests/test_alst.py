"""ALST (Arctic Long Sequence Training): fxtile tiling + activation checkpointing + Ulysses sequence parallelism.

One ``torchrun`` launch of 2 CPU processes (gloo: it runs ``all_to_all``) runs every job of
``tests/dist/alst_worker.py``: both ranks form one sequence-parallel group, a batch of 24-token sequences
is cut 12 + 12 by DeepSpeed's ``UlyssesSPDataLoaderAdapter``, the tiny Llama (sdpa) is tiled with
``fxtile.transform(model, shards=3, loss=True)``, ``shift_labels`` go INTO the model so that its loss head
runs tiled, and one SGD step (lr 1.0, no clipping) runs under ZeRO-3 (default and ``reduce_scatter:
false``), ZeRO-1, ZeRO-2, Accelerate's ``ParallelismConfig(sp_backend="deepspeed", sp_size=2)``, with
checkpointing enabled before or after ``fxtile.transform``, and with masked prompt tokens and two sequences
per batch. Each job is compared with a single-process *untiled* step on the full sequences. The
example (``examples/alst.py``) runs in a second launch. Budget: both launches together about 40 s on 2
idle cores (process start-up and imports dominate; each job takes about a second).

Tolerances: ``tests/test_distributed.py``'s (atol 1e-6, rtol 1e-5, float32). The distributed and the
reference step compute the same sums in different orders (per-shard weight-gradient and loss sums, the
attention's all-to-alls, the ranks' summed token losses added by DeepSpeed's gradient reduction), nothing
else; measured at most 1.2e-7 (ZeRO-3's weights are O(1), where one float32 ulp is 1.2e-7). A wrong
combination of the ranks' losses scales the whole step by 1/2 or 2, which moves parameters by about 5e-2:
the controls below check that the comparison sees it.

The TRL and offload tests at the end run in this process (no launch).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import fxtile
import fxtile.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import alst_worker as worker  # noqa: E402  (tests/dist/alst_worker.py: the jobs, the model, the batches)
from test_distributed import ATOL, PG_TIMEOUT, RTOL, torchrun  # noqa: E402  (the shared launcher and tolerances)


def _has_ulysses() -> bool:
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, e.g. the GPU image, or a DeepSpeed without Ulysses)
        return False
    return True


HAS_ULYSSES = importlib.util.find_spec("deepspeed") is not None and _has_ulysses()
needs_ulysses = pytest.mark.skipif(not HAS_ULYSSES, reason="DeepSpeed with Ulysses sequence parallelism is not installed")
LAUNCH_TIMEOUT = 180  # seconds for one torchrun launch (about 20 s when idle)
MLPS = [f"model.layers.{i}.mlp" for i in range(worker.common.CONFIG["num_hidden_layers"])]
EXACT = [name for name, job in worker.JOBS.items() if job.combine == "tokens"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alst")
    out = tmp / "out"
    out.mkdir()
    args = ["--out", str(out), "--jobs", ",".join(worker.JOBS), "--pg-timeout", str(PG_TIMEOUT)]
    returncode, log = torchrun(ROOT / "tests" / "dist" / "alst_worker.py", args, tmp, timeout=LAUNCH_TIMEOUT)
    return out, returncode, log, tmp / "torch_extensions"


def _result(launch, job: str) -> dict:
    out, returncode, log, _ = launch
    if (out / f"{job}.err").exists():
        pytest.fail(f"{job} raised on the ranks:\n{(out / f'{job}.err').read_text()[-6000:]}")
    if not (out / f"{job}.pt").exists():
        pytest.fail(f"{job} left no result (launch returned {returncode}); log tail:\n{log[-6000:]}")
    return torch.load(out / f"{job}.pt")


def _reference(r: dict) -> tuple[dict[str, torch.Tensor], float]:
    """One untiled single-process SGD step on the full sequences: the mean loss over their labelled tokens."""
    model = worker.build_model()
    missing, unexpected = model.load_state_dict(r["before"], strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    loss = model(input_ids=r["input_ids"], labels=r["labels"]).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=worker.common.LR).step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, loss.item()


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _scaled_step(r: dict, reference: dict, scale: float) -> dict:
    """The reference step scaled by ``scale`` (what a wrong loss combination gives)."""
    return {n: r["before"][n] + scale * (reference[n] - r["before"][n]) for n in reference}


@needs_ulysses
@pytest.mark.parametrize("job", EXACT)
def test_alst_step_matches_single_process_untiled_step(launch, job):
    spec, r = worker.JOBS[job], _result(launch, job)
    assert r["tiled"] == [""] + MLPS, "both MLPs and the loss head must be tiled to perform the test"
    assert r["local_shapes"] == [(spec.micro_batch, worker.SEQ // worker.SP)] * worker.SP, "each rank holds half the tokens"
    assert r["checkpointing"] == (spec.checkpointing is not None)

    # Every rank ran every MLP and the loss head tiled: (forward calls, forward shards, backward calls,
    # backward shards). Under checkpointing each MLP runs once more in its decoder layer's recompute; the
    # loss op computes its gradients in forward, and backward hands them over.
    calls = 2 if spec.checkpointing else 1
    expected = {m: (calls, calls * worker.SHARDS, 1, worker.SHARDS) for m in MLPS} | {"": (1, worker.SHARDS, 1, 0)}
    assert worker.SHARDS > 1
    assert r["shard_counts"] == [expected] * worker.SP, r["shard_counts"]
    assert r["warnings"] == [[]] * worker.SP, "no fxtile warning on any rank (ZeRO-3's own hooks on lm_head included)"

    reference, ref_loss = _reference(r)
    assert r["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), "the logged loss is the sequence's mean token loss"
    assert set(r["after"]) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(r["after"][name], value, atol=ATOL, rtol=RTOL, msg=lambda m: f"{job} {name}: {m}")

    # Controls: the step moved the weights, and half or twice the step (a wrong loss combination) would
    # fail the comparison by orders of magnitude.
    moved = _max_diff(r["after"], r["before"])
    assert moved > 1e-2, moved
    for scale in (0.5, 2.0):
        assert _max_diff(r["after"], _scaled_step(r, reference, scale)) > 1e3 * ATOL
    print(f"{job}: max |updated - reference| = {_max_diff(r['after'], reference):.2e} (step {moved:.2e})")


@needs_ulysses
def test_deepspeed_sums_over_sequence_parallel_ranks_except_zero3_reduce_scatter(launch):
    """The factor each rank's summed-token loss needs: 1 where DeepSpeed sums the ranks' gradients, sp
    where ZeRO-3's default reduce-scatter averages them."""
    factors = {job: _result(launch, job)["factor"] for job in ("zero1", "zero2", "zero3", "zero3_allreduce", "accelerate")}
    assert factors == {"zero1": 1, "zero2": 1, "zero3": 2, "zero3_allreduce": 1, "accelerate": 2}


@needs_ulysses
@pytest.mark.parametrize("job, scale", [("zero1_ds_recipe", 2.0), ("zero3_ds_recipe", 1.0), ("zero3_no_factor", 0.5)])
def test_loss_combination_controls(launch, job, scale):
    """DeepSpeed's own recipe (differentiable all-gather of the ranks' losses) doubles the ZeRO-1 step and is
    right under default ZeRO-3; the summed-token recipe without ZeRO-3's factor halves it. The comparison of
    the test above fails on the wrong ones."""
    r = _result(launch, job)
    reference, ref_loss = _reference(r)
    assert r["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)  # the logged loss is right every time
    for name, value in _scaled_step(r, reference, scale).items():
        torch.testing.assert_close(r["after"][name], value, atol=ATOL, rtol=RTOL, msg=lambda m: f"{job} {name}: {m}")
    if scale != 1.0:
        assert _max_diff(r["after"], reference) > 1e3 * ATOL, "the exactness comparison must catch this recipe"


@needs_ulysses
def test_the_adapters_shards_are_contiguous_only_for_one_sequence_per_batch(launch):
    """``UlyssesSPDataLoaderAdapter`` slices ``[B, S]`` along S: for B > 1 the shards are strided views, which
    the user must make ``.contiguous()`` (the worker does)."""
    assert _result(launch, "zero1")["contiguous"] == [dict.fromkeys(["input_ids", "position_ids", "shift_labels"], True)] * 2
    assert _result(launch, "zero3_prompt_mb2")["contiguous"] == [dict.fromkeys(["input_ids", "position_ids", "shift_labels"], False)] * 2


@needs_ulysses
def test_launch_exits_cleanly_and_builds_no_deepspeed_op(launch):
    _, returncode, log, extensions = launch
    assert returncode == 0, log[-6000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(p.name for p in extensions.iterdir())


@needs_ulysses
def test_example_trains_with_ulysses_on_two_cpu_ranks_and_every_rank_runs_tiled(tmp_path):
    returncode, log = torchrun(ROOT / "examples" / "alst.py", ["--steps", "3", "--seq-len", "64"], tmp_path, timeout=LAUNCH_TIMEOUT)
    assert returncode == 0, log[-6000:]
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([\d.]+)", log, re.M)]
    assert len(losses) == 3 and all(x == x for x in losses), log[-3000:]
    # each rank: 32 tokens, 2 MLPs and the loss head, each run in 4 shards (checkpointing: MLPs twice)
    for rank in range(2):
        line = re.search(rf"^  rank {rank}: local input \[1, 32\]; tiled \(calls, shards\): (.*)$", log, re.M)
        assert line, log[-3000:]
        assert line.group(1) == "{'(loss head)': (1, 4), 'model.layers.0.mlp': (2, 8), 'model.layers.1.mlp': (2, 8)}", line.group(1)
    assert not any((tmp_path / "torch_extensions").glob("*")), "the example must not JIT-build DeepSpeed ops"


# In this process: TRL, and the offload path of activation checkpointing.


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_trl_sft_trainer_trains_like_the_untiled_model_with_the_mlps_tiled(tmp_path):
    """TRL 1.16's SFTTrainer (activation checkpointing on by default, its own loss from ``fused_lm_head``
    outputs) with the MLPs tiled (``loss=False``: TRL computes the loss itself) lands on the untiled run's
    weights after 2 steps. float32 (``bf16=False``; TRL's default is bf16 autocast, where tiled and untiled
    weight gradients differ by bf16 rounding, ~1e-3 relative); clipping at TRL's default 1.0."""
    import transformers as T
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from trl import SFTConfig, SFTTrainer

    vocab_size = worker.common.CONFIG["vocab_size"]
    vocab = {f"t{i}": i for i in range(vocab_size - 2)} | {"[PAD]": vocab_size - 2, "[EOS]": vocab_size - 1}
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[PAD]")),
                                          pad_token="[PAD]", eos_token="[EOS]")
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, vocab_size - 2, (4, 12), generator=gen).tolist()})
    trained, ran = [], None
    for tile in (False, True):
        model = worker.common.build_model()
        if tile:
            fxtile.transform(model, shards=3)
        args = SFTConfig(output_dir=str(tmp_path / str(tile)), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         optim="sgd", bf16=False, use_cpu=True, report_to=[], save_strategy="no", seed=0, disable_tqdm=True)
        assert args.gradient_checkpointing
        before = fxtile.testing.shard_counts(model)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
        if tile:
            ran = {p: tuple(a - b for a, b in zip(vars(c).values(), vars(before[p]).values()))
                   for p, c in fxtile.testing.shard_counts(model).items()}
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # 2 steps: each MLP forward twice per step (checkpoint recompute), 3 shards each, backward once per step
    assert ran == {m: (4, 12, 2, 6) for m in MLPS}, ran
    assert _max_diff(trained[0], {n: p.detach() for n, p in worker.common.build_model().named_parameters()}) > 1e-4
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_checkpoint_offload_needs_an_accelerator():
    model = worker.build_model()
    model.activation_checkpointing_enable(offload=True)
    ids = torch.randint(0, worker.common.CONFIG["vocab_size"], (1, 8))
    with pytest.raises(RuntimeError, match="pin_memory=True requires a CUDA or other accelerator backend"):
        model(input_ids=ids, labels=ids)


def test_checkpoint_offload_composes_with_tiling(monkeypatch):
    """transformers' offload path (each checkpointed layer under ``save_on_cpu``) around tiled MLPs and the
    tiled loss: on CPU-only torch with ``pin_memory=False`` (the pinned allocator is what a GPU adds),
    gradients equal the untiled model's."""
    import transformers.modeling_utils as mu

    if not torch.cuda.is_available():
        def unpinned(pin_memory: bool = False, device_type: str = "cpu"):
            return torch.autograd.graph.save_on_cpu(pin_memory=False, device_type=device_type)

        monkeypatch.setattr(mu, "save_on_cpu", unpinned)
    offloaded = []
    monkeypatch.setattr(mu, "save_on_cpu", lambda *a, _f=mu.save_on_cpu, **k: offloaded.append(1) or _f(*a, **k))
    ids = torch.randint(0, worker.common.CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for tile in (False, True):
        model = worker.build_model()
        model.activation_checkpointing_enable(offload=True)
        if tile:
            fxtile.transform(model, shards=3, loss=True)
        before = fxtile.testing.shard_counts(model)
        model(input_ids=ids, labels=ids).loss.backward()
        if tile:
            after = fxtile.testing.shard_counts(model)
            assert {p: after[p].forward_shards - before[p].forward_shards for p in after} == {"": 3} | dict.fromkeys(MLPS, 6)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(offloaded) == 2 * 2, "each decoder layer's checkpoint must run under save_on_cpu, in both models"
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")

"""Coverage: every causal LM the installed transformers registers, tiled with no registry.

One session-scoped sweep (``coverage_sweep.sweep``: forked workers, a memory cap and a timeout per
architecture) builds each architecture from its tiny config, tiles a deep copy with ``shards=4`` and runs one
training call the default way (``model.train(); model(input_ids=ids, labels=ids)``, the config's
cache setting), comparing the loss, logits, the MoE aux loss and every parameter's gradient on a batch
of 2 x 7 tokens, and requiring that every tiled block ran tiled in that call (the op's counters, no
per-call fallback).

Per architecture: a wrong output or gradient, or a tiled block that ran untiled, fails (never
acceptable); so does an architecture that ``coverage_expected.json`` (checked in, written by
``python tests/coverage_sweep.py --write-expected``) lists as tiled and that is no longer tiled in every
layer, or tiles other kinds of region. One that does not build from a tiny config, or whose
feed-forward compute is not tiled in every layer and never was, is skipped with the measured reason
(``pytest -ra`` lists them). ``test_coverage_summary`` requires at least 95% of the architectures that
build to be tiled in every layer with exact gradients.

Run time: about 196 architectures at 2 workers; set ``FXTILE_COVERAGE=0`` to skip the sweep (e.g. for
a quick local run), or ``FXTILE_COVERAGE=arch1,arch2`` to sweep only those.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

import coverage_sweep as S  # noqa: E402

_CHOICE = os.environ.get("FXTILE_COVERAGE", "all")
ARCHS = [] if _CHOICE == "0" else (list(S.architectures()) if _CHOICE == "all" else _CHOICE.split(","))
NOT_BUILT = ("build-failed", "run-failed", "no-ffn")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def sweep_results() -> dict[str, S.Result]:
    workers = int(os.environ.get("FXTILE_COVERAGE_WORKERS", "2"))
    results = S.sweep(ARCHS, workers=workers, timeout=180.0, mem_gb=3.0)
    table = S.format_table(results)
    out = os.environ.get("FXTILE_COVERAGE_TABLE")
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    return {r.arch: r for r in results}


EXPECTED = S.expected()


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, sweep_results):
    r = sweep_results[arch]
    was = EXPECTED.get(arch, {})
    if was.get("status") == "tiled":  # a regression is a failure, not a skip
        assert r.status == "tiled", f"{arch} was tiled in every layer and is now {r.status}: {r.detail}"
        assert S.kinds(r) == was["kinds"], f"{arch} tiled {was['kinds']} and now tiles {S.kinds(r)}"
    if r.status in NOT_BUILT:
        pytest.skip(f"{arch} does not build or run from a tiny config: {r.detail}")
    assert r.status != "mismatch", f"{arch}: tiled model differs from the untouched one: {r.detail} (max error {r.max_error})"
    assert r.status not in ("transform-failed", "untiled-call", "crashed", "timeout"), f"{arch}: {r.status}: {r.detail}"
    if r.status != "tiled":
        pytest.skip(f"{arch} {r.status} ({r.tiled_layers}/{r.layers} layers): {r.detail}")
    assert r.max_error is not None  # status "tiled" means every compared tensor passed allclose


@pytest.mark.skipif(not ARCHS, reason="FXTILE_COVERAGE=0")
def test_coverage_summary(sweep_results):
    results = list(sweep_results.values())
    summary = S.summary(results)
    assert summary["built"] > 0
    if _CHOICE != "all":
        pytest.skip(f"coverage of a chosen subset (FXTILE_COVERAGE={_CHOICE}): {summary}")
    assert summary["registered"] == len(S.architectures()) >= 150, "the sweep must cover every registered causal LM"
    assert summary["percent"] >= 95.0, f"coverage {summary}:\n{S.format_table(results)}"

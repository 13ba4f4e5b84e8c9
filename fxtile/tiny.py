"""Tiny random models of real architectures, and the check that tiling one is exact.

One builder, one config shrinker and one verifier, shared by ``fxtile convert`` (which checks the
architecture it plans) and the coverage sweep (``tests/coverage_sweep.py``, which checks every causal LM
transformers registers): the command checks exactly what the README's coverage figure proves.

The verifier calls the model the way training does: ``model.train()`` with the config's defaults (the
cache on, where the config says so), ``model(input_ids=ids, labels=ids)``, then backward of the loss plus
a random projection of the logits (and the MoE aux loss where there is one); dropout probabilities are
zeroed by the shrinker so both models compute the same function. It compares the loss, the logits, the
aux loss and every parameter gradient with the untouched model (:func:`fxtile.compare.max_error`), and
reports every tiled block that did not really run tiled in that call (shards forward and recomputed
backward: the op's own counters; a vision tower is not called by a text call), and fails if a block
traced per call fell back to its original code or if no block ran tiled at all.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from . import testing
from .api import Why, find, transform
from .compare import max_error, tolerance

__all__ = ["SHARDS", "Exactness", "build_model", "exactness", "shrink_config"]

SHARDS = 4
BATCH, SEQ = 2, 7  # odd length: 14 rows in shards of 3, 3, 4, 4
VOCAB = 100
HIDDEN = 32
# Feed-forward widths, all distinct from every attention width (32 = 4 heads x 8, 16 = 2 kv heads x 8).
FFN_WIDTHS = {"intermediate_size": 72, "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56}
EXPERTS = 4

# Tiny values by config field name (set only where the config class has the field).
TINY = {
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "model_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "hidden_dim": HIDDEN, "emb_dim": HIDDEN,
    "intermediate_size": FFN_WIDTHS["intermediate_size"], "n_inner": FFN_WIDTHS["intermediate_size"],
    "ffn_dim": FFN_WIDTHS["intermediate_size"], "d_ff": FFN_WIDTHS["intermediate_size"],
    "ffn_hidden_size": FFN_WIDTHS["intermediate_size"], "inner_hidden_size": FFN_WIDTHS["intermediate_size"],
    "moe_intermediate_size": FFN_WIDTHS["moe_intermediate_size"], "expert_intermediate_size": FFN_WIDTHS["moe_intermediate_size"],
    "shared_expert_intermediate_size": FFN_WIDTHS["shared_expert_intermediate_size"],
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_dim": 8,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "seq_length": 64,
    # MoE: 4 experts, top-2, one shared expert, a dense first layer then MoE
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k": 2, "moe_k": 2, "num_experts_per_token": 2, "moe_num_shared_experts": 1,
    "zero_expert_num": 2, "expert_ffn_hidden_size": FFN_WIDTHS["moe_intermediate_size"],
    "n_shared_experts": 1, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "decoder_sparse_step": 1,
    # state-space mixers: widths consistent with 4 heads x 8
    "expand": 1, "mamba_expand": 1, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_ssm": 32,
    # MLA
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "num_nextn_predict_layers": 0, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4, "rotary_dim": 8, "vocab_size_per_layer_input": VOCAB,
}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _layers(values: dict) -> Optional[int]:
    return next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)


def _shrink(values: dict, default_layers: Optional[int]) -> dict:
    out = {}
    for key, value in values.items():
        if key in TINY and isinstance(value, int) and not isinstance(value, bool):
            out[key] = TINY[key]
        elif key in ("head_dim", "num_key_value_heads", "num_experts_per_tok") and value is None:
            out[key] = TINY[key]  # derived from other fields when unset; set it to keep the sizes consistent
        elif "dropout" in key or "pdrop" in key:
            out[key] = 0.0 if isinstance(value, float) else value
        elif isinstance(value, list) and default_layers and len(value) == default_layers and default_layers > 2:
            other = next((v for v in value if v != value[0]), value[-1])
            out[key] = [value[0], other]  # per-layer lists (layer_types, ...): the first kind and another one
        elif key == "hybrid_layer_ids" and isinstance(value, list):
            out[key] = [1]  # Zamba2: the shared transformer block (with the MLP) on the second layer
        elif isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value, _layers(value))
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1
    kv, heads = values.get("num_key_value_heads"), values.get("num_attention_heads")
    if isinstance(kv, int) and isinstance(heads, int) and "num_key_value_heads" in out:  # MHA, GQA or MQA stays so
        out["num_key_value_heads"] = out.get("num_attention_heads", 4) if kv >= heads else (1 if kv == 1 else 2)
    if "kv_lora_rank" in values and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)  # MLA: one latent KV per head
    if "output_router_logits" in values:
        out["output_router_logits"] = True  # the aux loss joins the checked output: router grads must survive
    return out


def shrink_config(config):
    """A config of the same class (so the same architecture and code paths) with every size shrunk:
    2 layers, hidden 32, 4 heads of 8 (2 kv heads), feed-forward widths no attention width shares,
    4 experts top-2, per-layer lists cut to two kinds, dropout probabilities 0. A config whose
    validation refuses top-2 routing is built with top-1."""
    values = config.to_dict()
    try:
        defaults = type(config)().to_dict()
    except Exception:  # noqa: BLE001 - a config class without usable defaults: keep every field
        defaults = {}
    own = {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}  # what makes this config itself
    kwargs = {**own, **_shrink(values, _layers(values))}
    for drop in ("architectures", "transformers_version", "_name_or_path", "model_type"):
        kwargs.pop(drop, None)
    try:
        small = type(config)(**kwargs)
    except Exception as exc:  # noqa: BLE001
        if "num_experts_per_tok" not in str(exc) or "num_experts_per_tok" not in kwargs:
            raise
        small = type(config)(**{**kwargs, "num_experts_per_tok": 1})
    try:  # MLA: the derived head size follows (some configs hold these per layer and refuse a global read)
        rope, nope = getattr(small, "qk_rope_head_dim", None), getattr(small, "qk_nope_head_dim", None)
        if isinstance(rope, int) and isinstance(nope, int) and hasattr(small, "qk_head_dim"):
            small.qk_head_dim = rope + nope
    except Exception:  # noqa: BLE001
        pass
    return small


def build_model(config, device: str | torch.device = "cpu", trust_remote_code: bool = False, cls=None) -> nn.Module:
    """A causal LM for ``config`` (``cls`` if given; else the base model where there is no causal-LM head)."""
    import transformers as T

    with torch.device(device):
        if cls is not None:
            return cls(config)
        for auto in (T.AutoModelForCausalLM, T.AutoModel):
            try:
                return auto.from_config(config, trust_remote_code=trust_remote_code)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
    raise ValueError(f"transformers has no model class for {type(config).__name__}")


@dataclass(frozen=True)
class Exactness:
    """``status``: passed | mismatch | untiled-call | no-mlp | build-failed | run-failed | transform-failed."""

    status: str
    detail: str
    max_error: Optional[float] = None
    tiled: int = 0
    dtype: str = ""
    seconds: float = 0.0
    model: Optional[nn.Module] = field(default=None, compare=False, repr=False)  # the tiled copy, if kept
    idle: tuple[str, ...] = ()  # tiled blocks the call did not run tiled (e.g. a vision tower in a text call)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


# How the training call is made: the default way first; where the untouched model itself cannot run
# that way from a tiny config (a hybrid's cache needs an attention layer, a head needs pixel inputs for
# its loss), without the cache, then without labels. The detail names the call that was compared.
CALLS = (("model(input_ids=ids, labels=ids)", True, {}),
         ("model(input_ids=ids, labels=ids, use_cache=False)", True, {"use_cache": False}),
         ("model(input_ids=ids, use_cache=False)", False, {"use_cache": False}))


def _outputs(model: nn.Module, ids: torch.Tensor, encoder_decoder: bool, call, loss: bool) -> dict[str, torch.Tensor]:
    """Run one training call and its backward; the tensors to compare (before the parameter grads).
    With the loss tiled (``loss``) a call with labels returns no logits: only the loss is compared."""
    _, labels, extra = call
    inputs = {"input_ids": ids, "labels": ids, **extra} if labels else {"input_ids": ids, **extra}
    if encoder_decoder:
        inputs["decoder_input_ids"] = ids
    torch.manual_seed(3)  # the same draws in both models (router jitter, any dropout left)
    out = model(**inputs)
    terms = {}
    for name in ("loss", "logits", "aux_loss"):
        if name == "logits" and loss and labels:
            continue
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            terms[name] = value
    if not terms:
        raise RuntimeError("the model returned no differentiable loss, logits or aux loss")
    gen = torch.Generator().manual_seed(2)
    total = sum((t.float() * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)).sum()
                if t.dim() else t.float() for t in terms.values())
    total.backward()
    return {k: v.detach() for k, v in terms.items()}


def _compare_once(reference: nn.Module, config, dtype: torch.dtype, shards: int, loss: bool) -> Exactness:
    reference = reference.to(dtype).train()
    try:
        tiled = copy.deepcopy(reference)
    except RuntimeError:  # a model holding non-leaf tensors cannot be deep-copied: build it again
        tiled = build_model(reference.config, cls=type(reference)).to(dtype).train()
        tiled.load_state_dict(reference.state_dict())
    vocab = getattr(reference.config.get_text_config(), "vocab_size", None) or VOCAB
    ids = torch.randint(3, min(vocab, VOCAB), (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    name = str(dtype).removeprefix("torch.")
    first_error = None
    for call in CALLS:
        try:
            ref_terms = _outputs(reference, ids, encoder_decoder, call, loss)
            break
        except Exception as exc:  # noqa: BLE001 - the untouched model's own limit, tried the next way
            reference.zero_grad(set_to_none=True)
            first_error = first_error or exc
    else:
        return Exactness("run-failed", f"the tiny model did not run forward and backward: {_first_line(first_error)}",
                            dtype=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transform(tiled, shards=shards, loss=loss)
        found = find(tiled, loss=loss)
        count = sum(m.tiled for m in found)
        refused = [s.reason for s in found.skipped if s.why is Why.SELF_CHECK]
        if count == 0 and refused:
            return Exactness("mismatch", refused[0], tiled=0, dtype=name, model=tiled)
        if count == 0:
            return Exactness("no-mlp", "the tiny model of this architecture has no MLP fxtile can tile", dtype=name,
                                model=tiled)
        before = testing.shard_counts(tiled)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got_terms = _outputs(tiled, ids, encoder_decoder, call, loss)
        after = testing.shard_counts(tiled)
    except Exception as exc:  # noqa: BLE001
        return Exactness("transform-failed", _first_line(exc), dtype=name)
    untiled = [str(w.message) for w in caught if "runs untiled" in str(w.message)]
    if untiled:
        return Exactness("untiled-call", untiled[0], tiled=count, dtype=name, model=tiled)
    zero = testing.ShardCount(0, 0, 0, 0)
    # ran tiled: the op ran shards forward and its backward ran (a loss op recomputes no shards in backward)
    idle = tuple(p for p, c in after.items() if c.forward_shards == before.get(p, zero).forward_shards
                 or c.backward_calls == before.get(p, zero).backward_calls)
    if len(idle) == len(after):
        return Exactness("untiled-call", f"no tiled block ran tiled in {call[0]}", tiled=count, dtype=name,
                            model=tiled, idle=idle)
    # the loss is computed from fp32 logits (transformers upcasts them): with it tiled, fp32 rounding bounds it
    worst, limit = 0.0, tolerance(torch.float32) if loss else tolerance(dtype)
    compared = [(k, ref_terms[k], got_terms.get(k)) for k in ref_terms]
    ref_grads = dict(reference.named_parameters())
    compared += [(f"gradient of {n}", p.grad, q.grad) for (n, p), q in zip(ref_grads.items(), tiled.parameters())]
    for what, a, b in compared:
        if (a is None) != (b is None):
            return Exactness("mismatch", f"{what}: only one of the two models has it", worst, count, name, model=tiled)
        if a is None:
            continue
        err = max_error(a, b, floor=1.0)
        worst = max(worst, err)
        if not err <= limit:
            return Exactness("mismatch", f"{what} differs by {err:.3g} (relative, {name})", worst, count, name, model=tiled)
    grads = sum(p.grad is not None for p in ref_grads.values())
    ran = f"{count - len(idle)} of them ran tiled in model.train(); {call[0]}" + (
        f" (not called: {', '.join(idle[:3])}{' ...' if len(idle) > 3 else ''})" if idle else "")
    detail = f"{count} regions tiled in {shards} shards, {ran}; {', '.join(ref_terms)} and {grads} parameter gradients equal ({name})"
    return Exactness("passed", detail, worst, count, name, model=tiled, idle=idle)


def exactness(config, *, shards: int = SHARDS, loss: bool = False, trust_remote_code: bool = False, cls=None,
           keep_model: bool = False) -> Exactness:
    """Build a tiny random model of ``config``'s architecture, tile a copy, and compare one training call.

    float64 (any difference is a real error, not rounding), float32 where the architecture has no float64
    kernels on CPU (grouped MoE matmuls). ``cls``: the model class (default: the Auto causal-LM class).
    ``keep_model``: return the tiled copy in ``.model`` (the coverage sweep inspects it).
    """
    start = time.perf_counter()
    result = None
    for dtype in (torch.float64, torch.float32):
        try:
            small = shrink_config(config)
            torch.manual_seed(0)
            reference = build_model(small, "cpu", trust_remote_code, cls)
        except Exception as exc:  # noqa: BLE001
            return Exactness("build-failed", f"could not build a tiny model of this architecture: {_first_line(exc)}")
        result = _compare_once(reference, small, dtype, shards, loss)
        if result.status != "run-failed":
            break
    assert result is not None
    return replace(result, seconds=time.perf_counter() - start, model=result.model if keep_model else None)

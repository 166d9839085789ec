"""The implementations inside transformers models: call counts, phases, fallbacks, untouched KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sagecheck import attention
from sagecheck.attention import hf as ah
from sagecheck.engines.hf import HFEngine


class _Tok:
    pad_token_id = 0
    bos_token_id = None


def small(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    ah.register()
    model = cls[1](cls[0](**common)).eval()
    return HFEngine(model, _Tok(), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("impl", ["sdpa", "eager", "sage-emulated", "sage2-fp8-emulated"])
def test_each_implementation_runs_and_is_counted(kind, impl):
    engine = small(kind)
    ids = torch.randint(3, 300, (2, 40)).tolist()
    with engine.backend("sdpa") as b:
        ref = b.logits(ids)
    with engine.backend(impl) as b:
        out = b.logits(ids)
        gen = b.generate(ids, 4)
        calls = b.calls()
    layers = engine.model.config.num_hidden_layers
    # one forward for logits, one prefill and 3 decode steps for generate
    assert calls["calls"] == {impl: layers * 5}
    assert calls["by_phase"] == {f"{impl}:prefill": layers * 2, f"{impl}:decode": layers * 3}
    assert len(gen[0]) == 4
    err = float((out - ref).norm() / ref.norm())
    assert err < {"sage-emulated": 2e-2, "sage2-fp8-emulated": 6e-2}.get(impl, 1e-5)


def test_builtin_model_counts_calls(builtin):
    ids = builtin.tokenizer("To be, or not to be").input_ids
    with builtin.backend("sage-emulated") as b:
        b.generate([ids], 3)
        calls = b.calls()
    assert calls["calls"]["sage-emulated"] == builtin.model.config.num_hidden_layers * 3


def test_candidate_phases_send_decode_to_the_baseline():
    engine = small("llama")
    engine.phases = ("prefill",)
    ids = torch.randint(3, 300, (1, 20)).tolist()
    with engine.backend("sage-emulated") as b:
        b.generate(ids, 3)
        calls = b.calls()
    assert calls["by_phase"] == {"sage-emulated:prefill": 2, "sdpa:decode": 4}


def test_isolated_layers():
    engine = small("llama")
    ids = torch.randint(3, 300, (1, 20)).tolist()
    with engine.backend("sage-emulated", layers={1}) as b:
        b.logits(ids)
        calls = b.calls()
    assert calls["calls"] == {"sage-emulated": 1, "sdpa": 1}


@torch.inference_mode()
def test_unsupported_call_falls_back_and_is_counted(monkeypatch):
    """A candidate that cannot honour a padding mask hands the call to the baseline."""
    engine = small("llama")

    def picky(q, k, v, *, causal=False, scale=None, mask=None):
        if mask is not None:
            raise attention.UnsupportedCall("no masks")
        return attention.get("sdpa")(q, k, v, causal=causal, scale=scale)

    monkeypatch.setitem(attention.ATTENTION._loaded, "sage-emulated", picky)
    x = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    with engine.backend("sdpa"):
        ref = engine.model(input_ids=x, attention_mask=mask).logits
    with engine.backend("sage-emulated") as b:
        out = engine.model(input_ids=x, attention_mask=mask).logits
        calls = b.calls()
    assert calls["fallbacks"] == {"sage-emulated": 2}
    assert "sage-emulated: no masks" in calls["fallback_reasons"]
    torch.testing.assert_close(out[:, 4:], ref[:, 4:])
    with engine.backend("sage-emulated") as b:  # without padding the candidate runs
        engine.model(input_ids=x)
        assert b.calls()["calls"] == {"sage-emulated": 2}


@torch.inference_mode()
def test_padding_mask_is_honoured_by_the_emulation():
    engine = small("llama")
    x = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with engine.backend("sdpa"):
        ref = engine.model(input_ids=x, attention_mask=mask).logits
    with engine.backend("sage-emulated") as b:
        out = engine.model(input_ids=x, attention_mask=mask).logits
        assert b.calls()["fallbacks"] == {}
    assert float((out[:, 5:] - ref[:, 5:]).norm() / ref[:, 5:].norm()) < 2e-2


@pytest.mark.parametrize("impl", ["sdpa", "eager", "sage-emulated", "sdpa-noisy"])
def test_kv_cache_is_never_changed(impl):
    engine = small("llama")
    ids = torch.randint(3, 300, (1, 30))
    with engine.backend(impl) as b:
        _, cache = b.prefill(ids)
        snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        forward = ah._make_forward(impl)
        layer0 = engine.model.model.layers[0].self_attn
        q = torch.randn(1, 4, 1, 16)
        for (k_cached, v_cached), layer in zip(snapshot, cache.layers):
            forward(layer0, q, layer.keys, layer.values, None, scaling=0.25)
            assert torch.equal(layer.keys, k_cached) and torch.equal(layer.values, v_cached)


def test_sage_is_refused_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = small("llama")
    with pytest.raises(attention.AttentionUnavailable, match="sage-emulated"):
        with engine.backend("sage"):
            pass
    assert engine.current_implementation() == "sdpa"

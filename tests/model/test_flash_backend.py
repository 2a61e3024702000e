"""The flash-attn backend's plumbing (cache layout, in-place append, seqlens, window) with a stand-in for
`flash_attn_with_kvcache` that follows its documented contract; the real package runs where it is installed."""
import pytest
import torch

import llmdrop_rt
from llmdrop_rt.engine import Sampling
from llmdrop_rt.model import layers as model_module
from llmdrop_rt.model.attention import reference_attention


def documented_flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size):
    """q [B,T,Hq,D]; caches [B,S,Hkv,D] updated in place at cache_seqlens..+T; causal aligned bottom-right;
    window (left, right): query at position p sees keys in [p-left, p+right]."""
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    b, t = q.shape[:2]
    start = int(cache_seqlens)
    k_cache[:, start:start + t] = k
    v_cache[:, start:start + t] = v
    keys = torch.arange(start + t)
    queries = torch.arange(start, start + t)[:, None]
    visible = keys <= queries if causal else torch.ones(t, start + t, dtype=torch.bool)
    if window_size[0] >= 0:
        visible &= keys >= queries - window_size[0]
    out = reference_attention(q.transpose(1, 2), k_cache[:, :start + t].transpose(1, 2),
                              v_cache[:, :start + t].transpose(1, 2), visible[None, None], softmax_scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("name", ["mistral", "llama3"])
def test_flash_backend_plumbing_matches_sdpa(tiny_checkpoints, monkeypatch, name):
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(kwargs["cache_seqlens"])
        return documented_flash_attn_with_kvcache(*args, **kwargs)

    monkeypatch.setattr(model_module, "flash_attn_with_kvcache", stand_in)
    batch = [torch.randint(2, 300, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    sdpa = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=[1]).engine.generate(batch, 16, Sampling())
    flash = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=[1], attn_backend="sdpa")
    flash.engine.attn_backend = "flash"  # the package is not installed here, so load() would refuse it
    assert flash.engine.generate(batch, 16, Sampling()) == sdpa
    assert calls and max(calls) == 12 + 14  # prefill at 0, then one call per decode step and kept layer

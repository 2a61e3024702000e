"""Qwen2, Qwen3 and Gemma2 against transformers' own models on tiny random checkpoints (fp32): logits full and
dropped, greedy generation, KV bytes, the decode path each family gets, and the config fields we refuse."""
import json
import shutil

import pytest
import torch
from helpers import VOCAB, hf_greedy, hf_model

import llmdrop_rt
from llmdrop_rt.config import ConfigError, ModelConfig
from llmdrop_rt.engine import Sampling

ATOL = 1e-4
PROMPT_LENGTHS = (5, 11, 8)  # the longer ones pass the sliding windows (5 and 6) once generation has run


def random_tokens(batch, length, seed):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def edited(folder, tmp_path, **changes):
    """A copy of `folder` with config.json fields changed (None deletes one)."""
    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("drop_attn, drop_mlp", [([], []), ([1, 2], []), ([], [0, 2]), ([1, 3], [1, 3])],
                         ids=["full", "attn", "mlp", "block"])
def test_family_logits_match_transformers(family, drop_attn, drop_mlp):
    tokens = random_tokens(2, 23, seed=1)
    ours = llmdrop_rt.load(family, drop_attn=drop_attn, drop_mlp=drop_mlp).logits(tokens)
    with torch.no_grad():
        ref = hf_model(family, drop_attn, drop_mlp)(tokens).logits
        full = hf_model(family)(tokens).logits if drop_attn or drop_mlp else None
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    if full is not None:
        assert (ref - full).abs().max() > 1e-2  # the drop changes the output, so the comparison means something


@pytest.mark.parametrize("name, changes", [
    ("gemma2", {"attn_logit_softcapping": None}), ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 12}), ("gemma2", {"layer_types": ["full_attention"] * 5}),
    ("qwen2_sliding", {"layer_types": None, "max_window_layers": 4}),
])
def test_each_family_feature_changes_the_output(family_checkpoints, tmp_path, name, changes):
    """The fixtures are shaped so that every feature the family adds matters: without it (in transformers too)
    the logits move, and ours follow."""
    folder = family_checkpoints[name]
    changed = edited(folder, tmp_path, **changes)
    tokens = random_tokens(1, 23, seed=4)
    with torch.no_grad():
        before, after = hf_model(folder)(tokens).logits, hf_model(changed)(tokens).logits
    assert (before - after).abs().max() > 1e-2
    torch.testing.assert_close(llmdrop_rt.load(changed).logits(tokens), after, atol=ATOL, rtol=0)




def test_family_batched_greedy_equals_transformers(family):
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    llm = llmdrop_rt.load(family)
    ours = llm.engine.generate(batch, 16, Sampling(), eos_ids=frozenset())
    static = llmdrop_rt.load(family, decode="static").engine.generate(batch, 16, Sampling(), eos_ids=frozenset())
    with torch.no_grad():
        ref = hf_greedy(hf_model(family), batch, 16)
    assert ours == ref
    assert static == ref


def test_dropped_gemma2_greedy_equals_identity_reference(family_checkpoints):
    """No cache on the reference side: each step re-runs the sequence through transformers."""
    folder = family_checkpoints["gemma2"]
    drop_attn, drop_mlp = [0, 3], [3]
    llm = llmdrop_rt.load(folder, drop_attn=drop_attn, drop_mlp=drop_mlp)
    ref_model = hf_model(folder, drop_attn, drop_mlp)
    prompt = random_tokens(1, 9, seed=6)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(ref_model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert llm.engine.generate([prompt], 10, Sampling())[0] == seq[len(prompt):]


def test_family_kv_bytes_count_kept_attention_layers_only(family):
    cfg = ModelConfig.from_folder(family)
    full = llmdrop_rt.load(family)
    dropped = llmdrop_rt.load(family, drop_attn=[0, 2])
    per_layer = 2 * 3 * cfg.num_kv_heads * 40 * cfg.head_dim * 4  # K and V, batch 3, 40 positions, fp32
    assert full.kv_cache_bytes(3, 40) == cfg.num_layers * per_layer
    assert dropped.kv_cache_bytes(3, 40) == (cfg.num_layers - 2) * per_layer


def test_cpu_decode_kernel_only_for_llama_shaped_layers(family_checkpoints):
    """The C++ decode layer is Llama's: Qwen2 (biases, no window) runs it, the others run the modules."""
    calls = {name: llmdrop_rt.load(folder).model.decode_stack for name, folder in family_checkpoints.items()}
    assert calls["qwen2"] is not None
    assert all(calls[name] is None for name in ("qwen2_sliding", "qwen3", "gemma2"))


@pytest.mark.parametrize("name, changes, message", [
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention = True: not supported"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported for gemma2"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping = -1.0: expected a positive number"),
    ("gemma2", {"query_pre_attn_scalar": "x"}, "query_pre_attn_scalar = 'x': expected a positive number"),
    ("gemma2", {"layer_types": ["full_attention"] * 4}, "layer_types = .*: expected a list of 5 entries"),
    ("qwen2", {"layer_types": ["sliding_attention"] * 4},
     "layer_types has sliding layers but use_sliding_window is false"),
    ("qwen2", {"use_sliding_window": "yes"}, "use_sliding_window = 'yes': expected true or false"),
    ("qwen2_sliding", {"sliding_window": 0}, "sliding_window = 0: expected a positive integer"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for qwen3"),
])
def test_family_fields_we_do_not_implement_are_refused(family_checkpoints, tmp_path, name, changes, message):
    folder = edited(family_checkpoints[name], tmp_path, **changes)
    with pytest.raises(ConfigError, match=f"config.json: {message}") as error:
        llmdrop_rt.load(folder)
    assert "\n" not in str(error.value)


def test_flash_backend_is_not_used_for_soft_capped_attention(family_checkpoints, monkeypatch):
    """flash-attn's kernel does not soft-cap here: asked for, it is refused; as the default, sdpa runs instead."""
    from llmdrop_rt import runtime

    folder = family_checkpoints["gemma2"]
    monkeypatch.setattr(runtime, "flash_attn_with_kvcache", object())  # as if flash-attn were installed
    with pytest.raises(ValueError, match="attn_backend='flash' does not soft-cap attention logits, which gemma2"):
        llmdrop_rt.load(folder, attn_backend="flash")
    monkeypatch.setattr(runtime, "default_backend", lambda device: "flash")
    assert llmdrop_rt.load(folder).engine.attn_backend == "sdpa"
    assert llmdrop_rt.load(family_checkpoints["qwen3"]).engine.attn_backend == "flash"

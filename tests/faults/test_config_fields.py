"""Every config.json field we read is checked for type and range: property-based over arbitrary JSON values, and
the valid-but-unusual spellings load the same model as transformers does."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

import llmdrop_rt
from llmdrop_rt.config import ConfigError, ModelConfig

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1}

# Any JSON value: what a hand-edited or machine-written config.json may hold in a field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=5,
)


def parse(**changes) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **changes}, source="cfg.json")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def refused(field: str, **changes) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(**changes)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cfg.json: ") and field in message
    return message


@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_num_hidden_layers_is_a_positive_integer_or_refused(value):
    if is_int(value) and value >= 1:
        assert parse(num_hidden_layers=value).num_layers == value
    else:
        assert "expected a positive integer" in refused("num_hidden_layers", num_hidden_layers=value)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["tie_word_embeddings", "attention_bias", "mlp_bias"]), value=json_values)
def test_bool_fields_take_only_json_booleans(field, value):
    if isinstance(value, bool):
        assert getattr(parse(**{field: value}), field) is value
    else:
        assert "expected true or false" in refused(field, **{field: value})


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["rms_norm_eps", "rope_theta"]), value=json_values)
def test_positive_number_fields(field, value):
    accepted = (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0
    if accepted:
        cfg = parse(**{field: value})
        assert (cfg.rms_norm_eps if field == "rms_norm_eps" else cfg.rope.theta) == float(value)
    else:
        assert "expected a finite number > 0" in refused(field, **{field: value})


@settings(max_examples=100, deadline=None)
@given(heads=st.integers(1, 12), kv_heads=st.integers(1, 12), hidden=st.integers(1, 96))
def test_head_counts_must_divide(heads, kv_heads, hidden):
    changes = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden)
    if heads % kv_heads:
        refused("num_key_value_heads", **changes)
    elif hidden % heads:
        refused("does not divide hidden_size", **changes)
    elif (hidden // heads) % 2:
        refused("head_dim", **changes)
    else:
        cfg = parse(**changes)
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (heads, kv_heads, hidden // heads)


@pytest.mark.parametrize("field,value,allowed", [
    ("tie_word_embeddings", "false", "true or false"),
    ("num_attention_heads", 4.7, "a positive integer"),
    ("num_attention_heads", 4.0, "a positive integer"),  # integers must be JSON integers, as transformers needs
    ("num_hidden_layers", -1, "a positive integer"),
    ("rms_norm_eps", -1e-5, "> 0"),
    ("rope_theta", 0, "> 0"),
    ("sliding_window", -4, "a positive integer or null"),
    ("eos_token_id", [1, "2"], "token id"),
    ("eos_token_id", 300, "outside the vocabulary"),
    ("bos_token_id", True, "non-negative integer"),
    ("head_dim", 0, "a positive integer or null"),
    ("vocab_size", "300", "a positive integer"),
])
def test_each_refusal_names_field_value_and_what_is_allowed(field, value, allowed):
    message = refused(field, **{field: value})
    assert allowed in message
    shown = {True: "true", False: "false"}.get(value, repr(value)) if not isinstance(value, list) else "["
    assert shown in message or str(value) in message


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("params,field", [
    ({"rope_type": "linear", "factor": 0}, "factor"),
    ({"rope_type": "linear", "factor": "2"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8.5},
     "original_max_position_embeddings"),
    ({"rope_type": "default", "rope_theta": -1.0}, "rope_theta"),
])
def test_rope_fields(spelling, params, field):
    message = refused(field, **{spelling: params})
    assert spelling in message


@pytest.mark.parametrize("block_change,field", [
    ({"attention": {"n_heads_in_group": 2, "no_op": "false"}}, "no_op"),
    ({"attention": {"n_heads_in_group": 2, "replace_with_linear": 0}}, "replace_with_linear"),
    ({"ffn": {"intermediate_size": 64.5}}, "intermediate_size"),
    ({"ffn": {"ffn_mult": "1.5"}}, "ffn_mult"),
])
def test_decilm_block_fields(block_change, field):
    block = {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 64}, **block_change}
    changes = dict(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
                   block_configs=[block, {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 64}}])
    message = refused(field, **changes)
    assert "block_configs[0]" in message


UNUSUAL_BUT_VALID = {
    "rope_theta_integer": lambda cfg: {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 10000}},
    "eos_as_list": lambda cfg: {**cfg, "eos_token_id": [1]},
    "head_dim_null": lambda cfg: {**cfg, "head_dim": None},
    "head_dim_absent": lambda cfg: {k: v for k, v in cfg.items() if k != "head_dim"},
    "kv_heads_absent_means_all": lambda cfg: {k: v for k, v in cfg.items() if k != "num_key_value_heads"},
    "unknown_field": lambda cfg: {**cfg, "some_future_field": {"x": [1, 2]}},
}


@pytest.mark.parametrize("change", list(UNUSUAL_BUT_VALID))
def test_unusual_but_valid_configs_match_transformers(tiny_checkpoints, tmp_path, change):
    folder = tmp_path / change
    shutil.copytree(tiny_checkpoints["llama2"], folder)  # 4 heads, 4 KV heads: dropping the count changes nothing
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(UNUSUAL_BUT_VALID[change](cfg)))
    tokens = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    ours = llmdrop_rt.load(folder, device="cpu", dtype="float32").logits(tokens)
    with torch.no_grad():
        theirs = hf_model(folder)(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)

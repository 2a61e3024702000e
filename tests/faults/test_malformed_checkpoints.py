"""A corpus of malformed checkpoints, each refused with the exact error class and the tensor or file named; strict
tensor accounting and its opt-out; folders without tokenizer files for token-id work."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import hf_model
from safetensors.torch import load_file, save_file

import llmdrop_rt
from llmdrop_rt.config import ConfigError
from llmdrop_rt.io.checkpoint import CheckpointError
from llmdrop_rt.io.tokenizer import TokenizerMissingError

TOKENS = torch.tensor([[0, 40, 71, 33, 250, 7, 9, 101]])


@pytest.fixture
def llama2(tiny_checkpoints, tmp_path):
    """A writable copy of the 4-layer llama2 checkpoint (q/k/v/o and MLP biases, untied head)."""
    folder = tmp_path / "llama2"
    shutil.copytree(tiny_checkpoints["llama2"], folder)
    return folder


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    save_file(change(tensors), str(folder / "model.safetensors"))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_config_with_fewer_layers_than_the_weights_is_refused(llama2):
    edit_config(llama2, num_hidden_layers=2)
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(llama2)
    message = one_line(caught)
    assert "config has 2 layers (num_hidden_layers) but the checkpoint has layers 0-3" in message
    assert "'model.layers.2.input_layernorm.weight'" in message and "strict=False" in message


def test_strict_false_loads_what_the_config_describes_like_transformers(llama2):
    edit_config(llama2, num_hidden_layers=2)
    ours = llmdrop_rt.load(llama2, strict=False, device="cpu", dtype="float32").logits(TOKENS)
    with torch.no_grad():
        theirs = hf_model(llama2)(TOKENS).logits  # transformers ignores the extra layers too
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_biases_without_attention_bias_are_refused(llama2):
    edit_config(llama2, attention_bias=False)
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(llama2)
    assert "k_proj.bias present but attention_bias is false" in one_line(caught)
    assert "16 checkpoint tensor(s)" in str(caught.value)  # q, k, v, o biases of 4 layers
    assert "'model.layers.0.self_attn.k_proj.bias'" in str(caught.value)


def test_mlp_biases_without_mlp_bias_are_refused(llama2):
    edit_config(llama2, mlp_bias=False)
    with pytest.raises(CheckpointError, match="down_proj.bias present but mlp_bias is false"):
        llmdrop_rt.load(llama2)


def test_tied_config_with_a_distinct_head_is_refused_and_with_the_same_one_loads(llama2):
    edit_config(llama2, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight but "
                                              "tie_word_embeddings is true"):
        llmdrop_rt.load(llama2)
    edit_tensors(llama2, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    ours = llmdrop_rt.load(llama2, device="cpu", dtype="float32").logits(TOKENS)
    with torch.no_grad():
        theirs = hf_model(llama2)(TOKENS).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["model.extra.weight", "model.layers.1.self_attn.q_norm.weight", "lm_head.bias"])
def test_unknown_tensors_are_named(llama2, name):
    edit_tensors(llama2, lambda t: {**t, name: torch.zeros(4)})
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(llama2)
    assert f"'{name}'" in one_line(caught) and "1 checkpoint tensor(s) not used" in str(caught.value)


def test_derived_buffers_and_dropped_modules_are_accounted_for(llama2):
    edit_tensors(llama2, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6)})
    llm = llmdrop_rt.load(llama2, drop_attn=[1], drop_mlp=[3])
    assert sorted(llm.plan.drop_attn) == [1] and sorted(llm.plan.drop_mlp) == [3]


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.bias", "model.norm.weight", "lm_head.weight"])
def test_missing_tensors_are_named(llama2, name):
    edit_tensors(llama2, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing from the checkpoint"):
        llmdrop_rt.load(llama2)


def test_integer_tensor_where_weights_belong_is_refused(llama2):
    edit_tensors(llama2, lambda t: {**t, "model.layers.0.mlp.up_proj.weight":
                                    (t["model.layers.0.mlp.up_proj.weight"] * 100).to(torch.int32)})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' is stored as torch.int32"):
        llmdrop_rt.load(llama2)


@pytest.fixture
def sharded(tiny_checkpoints, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["sharded"], folder)
    return folder


def edit_index(folder, change):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("change,message", [
    (lambda index: [index], "model.safetensors.index.json: expected a JSON object, got a list"),
    (lambda index: {"metadata": {}}, "weight_map = null" if False else "weight_map: expected a JSON object"),
    (lambda index: {"weight_map": list(index["weight_map"].items())}, "weight_map: expected a JSON object, got a list"),
    (lambda index: {"weight_map": {**index["weight_map"], "lm_head.weight": "../elsewhere.safetensors"}},
     "weight_map['lm_head.weight'] = '../elsewhere.safetensors'"),
    (lambda index: {"weight_map": {**index["weight_map"], "lm_head.weight": 7}}, "weight_map['lm_head.weight'] = 7"),
])
def test_malformed_index_files(sharded, change, message):
    edit_index(sharded, change)
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(sharded)
    assert message in one_line(caught)


def test_a_tensor_stored_but_not_indexed_is_named(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.layers.3.mlp.down_proj.weight"
    edit_index(sharded, lambda old: {"weight_map": {k: v for k, v in index["weight_map"].items() if k != name}})
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(sharded)
    assert f"tensor '{name}' is missing from the checkpoint (it is stored in {index['weight_map'][name]}, but " \
           "model.safetensors.index.json does not list it there)" in one_line(caught)
    llmdrop_rt.load(sharded, drop_mlp=[3])  # a dropped module's tensor: never needed


@pytest.mark.parametrize("file", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text,kind", [("[{}]", "a list"), ('"x"', "a string"), ("7", "a number"), ("null", "null")])
def test_json_files_of_the_wrong_shape_name_the_file(llama2, file, text, kind):
    (llama2 / file).write_text(text)
    with pytest.raises(ConfigError) as caught:
        llmdrop_rt.load(llama2)
    assert f"{llama2 / file}: expected a JSON object, got {kind}" in one_line(caught)


def test_generation_config_eos_must_be_token_ids(llama2):
    (llama2 / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id = '2': expected a token id"):
        llmdrop_rt.load(llama2)


def test_folder_without_tokenizer_files_serves_token_ids(llama2, tiny_checkpoints):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama2 / name).unlink()
    llm = llmdrop_rt.load(llama2, device="cpu", dtype="float32")
    full = llmdrop_rt.load(tiny_checkpoints["llama2"], device="cpu", dtype="float32")
    torch.testing.assert_close(llm.logits(TOKENS), full.logits(TOKENS), atol=0, rtol=0)
    assert llm.generate_ids([[0, 40, 71]], max_new_tokens=4) == full.generate_ids([[0, 40, 71]], max_new_tokens=4)
    for needs_text in (lambda: llm.generate("hello", max_new_tokens=2), lambda: llm.generate([[0, 40]], 2),
                       lambda: llm.chat_prompt("hi")):
        with pytest.raises((TokenizerMissingError, ValueError)) as caught:
            needs_text()
        assert str(llama2) in one_line(caught)
    with pytest.raises(TokenizerMissingError, match="no tokenizer.json, so text cannot be encoded or decoded"):
        llm.generate("hello", max_new_tokens=2)


def test_single_file_and_index_together_are_ambiguous(sharded, tiny_checkpoints):
    shutil.copy(tiny_checkpoints["llama2"] / "model.safetensors", sharded / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        llmdrop_rt.load(sharded)
    assert "holds both model.safetensors and model.safetensors.index.json; expected one of them" in one_line(caught)


def test_generation_config_eos_outside_the_vocabulary(llama2):
    (llama2 / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 300]}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id = 300 is outside the vocabulary"):
        llmdrop_rt.load(llama2)

"""Malformed GGUF headers and metadata values: each refused in one line naming the key (or header count), before
the gguf reader allocates from it; the pristine file of the same weights loads the same model as its folder."""
from __future__ import annotations

import json
import struct
import time

import gguf
import numpy as np
import pytest
import torch

import llmdrop_rt
from llmdrop_rt.io.gguf_import import GGUFImportError, convert_gguf

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 48, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
TOKENS = ["<s>", "</s>", *[chr(c) for c in range(ord("!"), ord("~") + 1)]]
METADATA = {  # key -> (GGUFWriter adder, value)
    "llama.block_count": ("add_uint32", LAYERS), "llama.context_length": ("add_uint32", 128),
    "llama.embedding_length": ("add_uint32", HIDDEN), "llama.feed_forward_length": ("add_uint32", INTER),
    "llama.attention.head_count": ("add_uint32", HEADS), "llama.attention.head_count_kv": ("add_uint32", KV_HEADS),
    "llama.rope.freq_base": ("add_float32", 10000.0), "llama.attention.layer_norm_rms_epsilon": ("add_float32", 1e-5),
    "tokenizer.ggml.bos_token_id": ("add_uint32", 0), "tokenizer.ggml.eos_token_id": ("add_uint32", 1),
}
LAYER_SHAPES = {"attn_norm": (HIDDEN,), "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
                "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN), "ffn_norm": (HIDDEN,),
                "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}


def write_gguf(path, changes=None, skip_tensor=None):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, entry in {**METADATA, **(changes or {})}.items():
        if entry is not None:
            getattr(writer, entry[0])(key, entry[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    shapes.update({f"blk.{i}.{name}.weight": shape for i in range(LAYERS) for name, shape in LAYER_SHAPES.items()})
    for name, shape in shapes.items():
        if name != skip_tensor:
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patched(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def array_count_offset(path, key):
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key.encode()) + 4 + 4


def refused(path, tmp_path) -> str:
    started = time.perf_counter()
    with pytest.raises(GGUFImportError) as caught:
        convert_gguf(path, tmp_path / "out")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert not (tmp_path / "out").exists()
    return message


@pytest.mark.parametrize("changes,named", [
    ({"llama.attention.head_count": ("add_uint32", 0)}, "llama.attention.head_count = 0: expected a positive integer"),
    ({"llama.attention.head_count": ("add_uint32", 5), "llama.attention.head_count_kv": ("add_uint32", 5)},
     "llama.attention.head_count = 5 does not divide llama.embedding_length = 32"),
    ({"llama.attention.head_count_kv": ("add_uint32", 3)}, "4 attention heads are not a multiple of 3 KV heads"),
    ({"llama.attention.head_count": ("add_string", "4")}, "llama.attention.head_count = '4'"),
    ({"llama.attention.head_count": ("add_float32", 4.0)}, "llama.attention.head_count = 4.0"),
    ({"llama.block_count": ("add_uint64", 2**40)}, "llama.block_count = 1099511627776, but the file holds only 20"),
    ({"llama.block_count": ("add_uint32", 1)}, "llama.block_count = 1 but the file has blocks 0-1"),
    ({"llama.block_count": None}, "metadata key 'llama.block_count' is missing"),
    ({"llama.attention.layer_norm_rms_epsilon": ("add_float32", -1e-5)}, "layer_norm_rms_epsilon = "),
    ({"llama.attention.layer_norm_rms_epsilon": ("add_float32", float("nan"))}, "expected a finite number > 0"),
    ({"llama.rope.freq_base": ("add_float32", 0.0)}, "llama.rope.freq_base = 0.0"),
    ({"llama.context_length": ("add_int32", -3)}, "llama.context_length = -3"),
    ({"llama.embedding_length": ("add_uint32", 64)}, "'token_embd.weight' has shape (96, 32), expected (96, 64)"),
    ({"llama.feed_forward_length": ("add_uint32", 64)},
     "'blk.0.ffn_gate.weight' has shape (48, 32), expected (64, 32)"),
    ({"tokenizer.ggml.bos_token_id": ("add_string", "0")}, "tokenizer.ggml.bos_token_id = '0'"),
    ({"tokenizer.ggml.add_bos_token": ("add_uint8", 1)}, "tokenizer.ggml.add_bos_token = 1: expected true or false"),
])
def test_bad_metadata_values_name_the_key(tmp_path, changes, named):
    assert named in refused(write_gguf(tmp_path / "bad.gguf", changes), tmp_path)


def test_missing_tensor_is_named(tmp_path):
    message = refused(write_gguf(tmp_path / "bad.gguf", skip_tensor="blk.1.attn_v.weight"), tmp_path)
    assert "tensors missing from the file: ['blk.1.attn_v.weight']" in message


@pytest.mark.parametrize("offset,fmt,value,named", [
    (0, "<4s", b"GGML", "not a readable GGUF file"),
    (4, "<I", 7, "GGUF version 7 is not supported"),
    (8, "<Q", 2**62, "GGUF.tensor_count = 4611686018427387904: more tensors than the file could hold"),
    (16, "<Q", 2**62, "GGUF.kv_count = 4611686018427387904: more metadata entries than the file could hold"),
    (8, "<Q", 21, "GGUF.tensor_count = 21"),
])
def test_impossible_header_counts_are_refused_before_reading(tmp_path, offset, fmt, value, named):
    path = patched(write_gguf(tmp_path / "bad.gguf"), offset, fmt, value)
    assert named in refused(path, tmp_path)


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
@pytest.mark.parametrize("count", [2**60, 2**33, len(TOKENS) + 1])
def test_impossible_array_lengths_are_refused_before_reading(tmp_path, key, count):
    path = write_gguf(tmp_path / "bad.gguf")
    path = patched(path, array_count_offset(path, key), "<Q", count)
    message = refused(path, tmp_path)
    assert f"array of {count} items" in message or f"after metadata key '{key}'" in message


def test_pristine_gguf_converts_to_the_weights_it_holds(tmp_path):
    """The control: the same writer's unmodified file converts and loads (and its folder is strict-clean)."""
    folder = convert_gguf(write_gguf(tmp_path / "good.gguf"), tmp_path / "out")
    llm = llmdrop_rt.load(folder, device="cpu", dtype="float32")
    assert llm.cfg.num_layers == LAYERS and llm.logits(torch.tensor([[0, 5, 9]])).isfinite().all()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS

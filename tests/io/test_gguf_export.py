"""GGUF export: round trips through our importer, the file's metadata and tensors, refusals, and llama.cpp.

Tiny random checkpoints (written by transformers) cover the writer itself; the embedded SmolLM2 covers the
comparison with llama.cpp (skipped, with a message, until `make peers` has built it). Random seeds and text
excerpts are drawn afresh each session and named in failure messages.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import DATA, VOCAB, make_checkpoint
from safetensors.torch import load_file, save_file

import llmdrop_rt
from llmdrop_rt import DropPlan
from llmdrop_rt.bench import llama_cpp as llama_cpp_peer
from llmdrop_rt.io.gguf_export import TABLE_STORAGE, GGUFExportError, export_gguf
from llmdrop_rt.io.gguf_import import _unpermute_rotary_rows, convert_gguf, smollm2_gguf_path
from llmdrop_rt.io.publish import OutputError

SEED = random.SystemRandom().randrange(2**31)
EVAL_TEXT = DATA / "eval.txt"


def tiny_config(tie: bool, hidden_size: int = 64, attention_bias: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=0,
                       eos_token_id=1, attention_bias=attention_bias)


def write_bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE with a few merges and SmolLM's pre-tokenizer (digits split off), smaller than the
    model's vocabulary (so the export pads it), adding BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "u"), ("a", "n")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}",
    }))


def tiny_checkpoint(folder: Path, seed: int, **config) -> Path:
    make_checkpoint(folder, tiny_config(**config), seed=seed)
    write_bpe_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("untied"), SEED, tie=False)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tied"), SEED + 1, tie=True)


def random_tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, count), generator=torch.Generator().manual_seed(seed))


def read_fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


# ---------------------------------------------------------------------------------------------------------
# (a) Round trips through our own importer (architecture llama)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_full_model_round_trip_gives_the_same_logits(tie, tiny_untied, tiny_tied, tmp_path):
    source = tiny_tied if tie else tiny_untied
    out = export_gguf(source, tmp_path / "model.gguf", DropPlan.create(4), "f32")
    converted = convert_gguf(out, tmp_path / "converted")
    assert ("lm_head.weight" in load_file(converted / "model.safetensors")) is not tie

    tokens = random_tokens(48, SEED)
    expected = llmdrop_rt.load(source).logits(tokens)
    actual = llmdrop_rt.load(converted).logits(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4, msg=lambda m: f"seed {SEED}: {m}")


def test_block_drop_round_trip_renumbers_the_kept_layers(tiny_untied, tmp_path):
    dropped = sorted(random.Random(SEED).sample(range(4), 2))
    plan = DropPlan.create(4, drop_attn=dropped, drop_mlp=dropped)
    out = export_gguf(tiny_untied, tmp_path / "blocks.gguf", plan, "f32")
    fields, tensors = read_fields(out)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert not any(name.startswith("blk.2.") for name in tensors)

    converted = convert_gguf(out, tmp_path / "converted")
    tokens = random_tokens(40, SEED + 2)
    expected = llmdrop_rt.load(tiny_untied, drop_attn=dropped, drop_mlp=dropped).logits(tokens)
    actual = llmdrop_rt.load(converted).logits(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4, msg=lambda m: f"seed {SEED}, {dropped}: {m}")


def test_tokenizer_round_trip_encodes_alike(tiny_untied, tmp_path):
    converted = convert_gguf(export_gguf(tiny_untied, tmp_path / "model.gguf", DropPlan.create(4)),
                             tmp_path / "converted")
    ours, back = llmdrop_rt.load(tiny_untied).tokenizer, llmdrop_rt.load(converted).tokenizer
    start = random.Random(SEED).randrange(len(EVAL_TEXT.read_text()) - 2000)
    text = EVAL_TEXT.read_text()[start:start + 2000] + " the 2024 answer\n\t  in"
    assert back.encode(text) == ours.encode(text), f"excerpt at {start}"
    assert ours.encode(text)[0] == 0  # BOS added, on both sides


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_stored_matrices_are_our_weights_converted_or_quantized(gguf_type, tiny_untied, tmp_path):
    """The importer dequantizes what we stored; that must be our weights through the type's round trip."""
    out = export_gguf(tiny_untied, tmp_path / f"model-{gguf_type}.gguf", DropPlan.create(4), gguf_type)
    fields, tensors = read_fields(out)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == gguf_type.upper()
    converted = load_file(convert_gguf(out, tmp_path / "converted") / "model.safetensors")
    original = load_file(tiny_untied / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.2.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        # The vocabulary matrices of a q4_0 file are q8_0 (see gguf_export.TABLE_STORAGE).
        table = name in ("model.embed_tokens.weight", "lm_head.weight")
        qtype = gguf.GGMLQuantizationType[(TABLE_STORAGE.get(gguf_type, gguf_type) if table else gguf_type).upper()]
        weight = original[name].float().numpy()
        # Quantization blocks run along rows and the Q/K permutation moves whole rows, so Q and K too must come
        # back exactly as quantizing them unpermuted gives.
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)
        np.testing.assert_array_equal(converted[name].numpy(), expected, err_msg=name)
        assert not np.array_equal(expected, weight), f"{name}: the {gguf_type} round trip lost nothing"


# ---------------------------------------------------------------------------------------------------------
# (b) deci files: per-layer metadata and the tensors of dropped modules
# ---------------------------------------------------------------------------------------------------------


def test_deci_file_describes_each_layer(tiny_untied, tmp_path):
    # Layer 3 loses both modules (left out), layer 2 its attention, layer 1 its MLP.
    plan = DropPlan.create(4, drop_attn=[2, 3], drop_mlp=[1, 3])
    out = export_gguf(tiny_untied, tmp_path / "deci.gguf", plan, "q8_0")
    fields, tensors = read_fields(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [4, 4, 0]
    assert fields["deci.attention.head_count_kv"] == [2, 2, 0]
    assert fields["deci.feed_forward_length"] == [96, 1, 96]  # layer 1: the 1-wide zero stand-in MLP
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.add_bos_token"] is True

    assert not [name for name in tensors if name.startswith("blk.2.attn")]
    assert not [name for name in tensors if name.startswith("blk.3.")]
    for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"):
        assert f"blk.0.{part}.weight" in tensors and f"blk.1.{part}.weight" in tensors
    for part in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
        stand_in = tensors[f"blk.1.{part}.weight"]
        assert stand_in.tensor_type == gguf.GGMLQuantizationType.F32 and not stand_in.data.any()
    assert "output.weight" in tensors and tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0

    # Kept layer 2's MLP is source layer 2's; Q of layer 0 is in llama.cpp's rotary row order.
    original = load_file(tiny_untied / "model.safetensors")
    down = gguf.quants.dequantize(tensors["blk.2.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(down, original["model.layers.2.mlp.down_proj.weight"].numpy(), atol=0.02)
    q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(_unpermute_rotary_rows(q, 4), original["model.layers.0.self_attn.q_proj.weight"],
                               atol=0.02)


def test_tokenizer_metadata_matches_the_shipped_smollm2_gguf(smollm2_dir, tmp_path):
    """Exported from a folder converted from the shipped GGUF, the vocabulary must come back unchanged."""
    fields, _ = read_fields(export_gguf(smollm2_dir, tmp_path / "smollm2.gguf", DropPlan.create(30)))
    shipped, _ = read_fields(smollm2_gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
                "llama.vocab_size"):
        assert fields[key] == shipped[key], key


# ---------------------------------------------------------------------------------------------------------
# (c) Refusals
# ---------------------------------------------------------------------------------------------------------


def test_refuses_a_deci_plan_without_first_layer_attention(tiny_untied, tmp_path):
    with pytest.raises(GGUFExportError, match="layer 0, the first layer written, has its attention dropped"):
        export_gguf(tiny_untied, tmp_path / "x.gguf", DropPlan.create(4, drop_attn=[0, 2]))
    assert not list(tmp_path.iterdir())
    # Dropping layer 0 whole is fine: the first layer written is then layer 1.
    export_gguf(tiny_untied, tmp_path / "y.gguf", DropPlan.create(4, drop_attn=[0, 2], drop_mlp=[0]))


def test_refuses_to_overwrite_unless_asked(tiny_untied, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(tiny_untied, out, DropPlan.create(4))
    with pytest.raises(OutputError, match="not a file of the kind"):  # overwrite replaces a GGUF file only
        export_gguf(tiny_untied, out, DropPlan.create(4), overwrite=True)
    assert out.read_bytes() == b"precious"
    out.write_bytes(b"GGUF an earlier export")
    export_gguf(tiny_untied, out, DropPlan.create(4), overwrite=True)
    assert read_fields(out)[0]["general.architecture"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind


@pytest.mark.parametrize("gguf_type", ["q4_1", "bf16", "Q8_0"])
def test_refuses_an_unsupported_type(gguf_type, tiny_untied, tmp_path):
    with pytest.raises(GGUFExportError, match="gguf_type .* is not supported"):
        export_gguf(tiny_untied, tmp_path / "x.gguf", DropPlan.create(4), gguf_type)


def test_refuses_rows_that_do_not_fill_quantization_blocks(tmp_path):
    source = tiny_checkpoint(tmp_path / "h48", SEED, tie=False, hidden_size=48)
    with pytest.raises(GGUFExportError, match="not a multiple of 32, the Q[48]_0 block size"):
        export_gguf(source, tmp_path / "x.gguf", DropPlan.create(4), "q4_0")
    export_gguf(source, tmp_path / "x.gguf", DropPlan.create(4), "f16")


def test_refuses_biases_and_a_wrong_plan(tmp_path, tiny_untied):
    source = tiny_checkpoint(tmp_path / "bias", SEED, tie=False, attention_bias=True)
    with pytest.raises(GGUFExportError, match="attention_bias"):
        export_gguf(source, tmp_path / "x.gguf", DropPlan.create(4))
    with pytest.raises(GGUFExportError, match="plan is for 5 layers"):
        export_gguf(tiny_untied, tmp_path / "x.gguf", DropPlan.create(5))


def test_a_failed_write_leaves_nothing(tiny_untied, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_untied / name).read_bytes())
    tensors = load_file(tiny_untied / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        export_gguf(broken, out_dir / "x.gguf", DropPlan.create(4))
    assert not list(out_dir.iterdir())


# ---------------------------------------------------------------------------------------------------------
# (d) llama.cpp on our exports of SmolLM2 (needs `make peers`)
# ---------------------------------------------------------------------------------------------------------


def test_missing_llama_cpp_is_reported_with_the_make_target(tmp_path, monkeypatch):
    monkeypatch.delenv(llama_cpp_peer.ENV_VAR, raising=False)
    monkeypatch.setenv("LLMDROP_RT_CACHE", str(tmp_path))
    with pytest.raises(llama_cpp_peer.LlamaCppNotBuilt, match="run `make peers`"):
        llama_cpp_peer.bin_dir()
    monkeypatch.setenv(llama_cpp_peer.ENV_VAR, str(tmp_path))
    with pytest.raises(llama_cpp_peer.LlamaCppNotBuilt, match="holds no llama-bench"):
        llama_cpp_peer.bin_dir()


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        return llama_cpp_peer.bin_dir()
    except llama_cpp_peer.LlamaCppNotBuilt as exc:
        pytest.skip(str(exc))


SMOLLM2_PLANS = {
    "full": {},
    "attn14-28": {"drop_attn": list(range(14, 29))},
    "mlp10,20": {"drop_mlp": [10, 20]},
    "blocks5,6": {"drop_attn": [5, 6], "drop_mlp": [5, 6]},
    "mixed": {"drop_attn": [3, 16, 17, 18], "drop_mlp": [3, 25]},
}


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    """~1000 SmolLM2 tokens of eval.txt from a random line: 8 llama-perplexity chunks of 128."""
    lines = EVAL_TEXT.read_text().splitlines(keepends=True)
    start = random.Random(SEED).randrange(len(lines) - 200)
    text, end = "", start
    while len(text) < 3000:
        text += lines[end]
        end += 1
    path = tmp_path_factory.mktemp("excerpt") / "excerpt.txt"
    path.write_text(text)
    return path, f"eval.txt lines {start}-{end}"


@pytest.mark.parametrize("plan_name", list(SMOLLM2_PLANS))
def test_llama_cpp_agrees_with_us_on_smollm2(plan_name, llama_cpp, smollm2_dir, excerpt, tmp_path):
    drops = SMOLLM2_PLANS[plan_name]
    llm = llmdrop_rt.load(smollm2_dir, dtype="float32", device="cpu", **drops)
    out = export_gguf(smollm2_dir, tmp_path / f"{plan_name}.gguf", llm.plan, "f32")
    text_file, where = excerpt

    # llama-perplexity drops one trailing newline before tokenizing.
    tokens = llm.tokenizer.encode(text_file.read_text().removesuffix("\n"))
    ours = llama_cpp_peer.chunked_perplexity(llm, tokens, ctx=128)
    theirs = llama_cpp_peer.perplexity(out, text_file, ctx=128)
    assert theirs.chunks == ours.chunks, f"{where}: llama.cpp tokenized the text differently"
    # Compared as mean NLL per token, relative to it: llama.cpp's F32 run strays from the exact value more where the
    # model predicts almost uniformly (plan attn14-28, NLL ~10: up to 1.2e-4 of the NLL over random excerpts, while
    # ours matched transformers in float64 to 1e-8), and less on the full model (NLL ~4: up to 3.4e-5).
    assert theirs.mean_nll == pytest.approx(ours.mean_nll, rel=2.5e-4), where

    prompt = "".join(text_file.read_text().splitlines(keepends=True)[:3])
    ours = llm.generate(prompt, max_new_tokens=16)[0]
    decided = decided_greedy_prefix(llm, prompt, 16)
    assert ours.startswith(decided), f"{where}: our generate() left our own logits' greedy choice"
    theirs = llama_cpp_peer.greedy(out, prompt, 16)
    assert theirs.startswith(decided), f"{where}: prompt {prompt!r}, ours {ours!r}"


# Two fp32 implementations summing in different orders give slightly different logits (the perplexities above
# agree to 1e-3); a greedy step whose best two logits lie closer than this may go either way.
NEAR_TIE = 0.02


def decided_greedy_prefix(llm, prompt: str, n: int) -> str:
    """The text of our greedy continuation of `prompt` (up to n tokens) before its first near-tie, from full
    forward passes: the part every correct fp32 implementation of the model must also produce."""
    ids = llm.tokenizer.encode(prompt)
    new: list[int] = []
    while len(new) < n:
        best = llm.logits(ids + new)[0, -1].double().topk(2)
        if float(best.values[0] - best.values[1]) < NEAR_TIE or int(best.indices[0]) in llm.eos_ids:
            break
        new.append(int(best.indices[0]))
    return llm.tokenizer.decode(new)


def test_llama_bench_runs_on_a_quantized_export(llama_cpp, tiny_untied, tmp_path):
    out = export_gguf(tiny_untied, tmp_path / "tiny-q4_0.gguf", DropPlan.create(4, drop_attn=[1]), "q4_0")
    records = llama_cpp_peer.run_llama_bench(out, threads=(1, 2), n_prompt=16, n_gen=8, repetitions=2)
    rows = llama_cpp_peer.bench_summary(records)
    assert {(row["test"], row["threads"]) for row in rows} == {("pp16", 1), ("pp16", 2), ("tg8", 1), ("tg8", 2)}
    assert all(row["tok_s"] > 0 and "deci" in row["type"] and "Q4_0" in row["type"] for row in rows)


def test_export_command_writes_gguf(tiny_untied, tmp_path, capsys):
    from llmdrop_rt.cli import main

    out = tmp_path / "dropped.gguf"
    main(["export", "--model", str(tiny_untied), "--drop-attn", "2", "--format", "gguf", "--gguf-type", "q8_0",
          "--out", str(out)])
    fields, tensors = read_fields(out)
    assert fields["general.architecture"] == "deci" and "blk.2.attn_q.weight" not in tensors
    assert tensors["blk.1.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(SystemExit):  # an existing file is never replaced unasked
        main(["export", "--model", str(tiny_untied), "--format", "gguf", "--out", str(out)])
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# (e) The other families: llama.cpp's qwen2 / qwen3 / gemma2 architectures
# ---------------------------------------------------------------------------------------------------------


def family_gguf_config(name: str):
    """Tiny checkpoints llama.cpp's graphs can describe (Gemma2: query_pre_attn_scalar = head_dim, tied)."""
    from transformers import Gemma2Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    if name == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, **common)
    if name == "qwen3":
        return Qwen3Config(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
    return Gemma2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                        attn_logit_softcapping=3.0, final_logit_softcapping=4.0, tie_word_embeddings=True, **common)


@pytest.fixture(scope="module")
def family_gguf_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-families")
    folders = {}
    for offset, name in enumerate(("qwen2", "qwen3", "gemma2")):
        folders[name] = make_checkpoint(root / name, family_gguf_config(name), seed=SEED + 10 + offset)
        write_bpe_tokenizer(folders[name])
    return folders


def test_gemma2_file_keeps_each_layers_window_and_llama_cpp_conventions(family_gguf_sources, tmp_path):
    source = family_gguf_sources["gemma2"]
    plan = DropPlan.create(5, drop_attn=[1], drop_mlp=[1])  # renumbering shifts the later layers' parity
    fields, tensors = read_fields(export_gguf(source, tmp_path / "g.gguf", plan, "f32"))
    assert fields["general.architecture"] == "gemma2" and fields["gemma2.block_count"] == 4
    assert fields["gemma2.attention.sliding_window_pattern"] == [True, True, False, True]  # layers 0, 2, 3, 4
    assert fields["gemma2.attention.sliding_window"] == 6
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(3.0)
    assert "output.weight" not in tensors and "blk.1.post_ffw_norm.weight" in tensors
    weights = load_file(source / "model.safetensors")
    norm = weights["model.layers.2.pre_feedforward_layernorm.weight"]
    np.testing.assert_array_equal(tensors["blk.1.ffn_norm.weight"].data, norm.numpy() + np.float32(1))
    q = weights["model.layers.2.self_attn.q_proj.weight"]  # NeoX rotary layout: rows as Hugging Face has them
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"].data.reshape(q.shape), q.numpy())


def test_family_gguf_refusals_name_the_reason(family_gguf_sources, family_checkpoints, tmp_path):
    with pytest.raises(GGUFExportError, match="llama.cpp's 'qwen2' architecture has one head count"):
        export_gguf(family_gguf_sources["qwen2"], tmp_path / "a.gguf", DropPlan.create(4, drop_attn=[2]))
    with pytest.raises(GGUFExportError, match="sliding_window=5 is not supported by the GGUF export of qwen2"):
        export_gguf(family_checkpoints["qwen2_sliding"], tmp_path / "b.gguf")
    with pytest.raises(GGUFExportError, match=r"query_pre_attn_scalar=20, but llama.cpp's gemma2 would scale "
                                              r"queries by 1/sqrt\(12\)"):
        export_gguf(family_checkpoints["gemma2"], tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, dropped", [("qwen2", []), ("qwen2", [1]), ("qwen3", [0, 2]), ("gemma2", []),
                                           ("gemma2", [1])])
def test_llama_cpp_agrees_with_us_on_the_families(name, dropped, llama_cpp, family_gguf_sources, excerpt,
                                                  tmp_path):
    source = family_gguf_sources[name]
    llm = llmdrop_rt.load(source, drop_attn=dropped, drop_mlp=dropped)
    out = export_gguf(source, tmp_path / f"{name}.gguf", llm.plan, "f32")
    text_file, where = excerpt
    tokens = llm.tokenizer.encode(text_file.read_text().removesuffix("\n"))
    theirs = llama_cpp_peer.perplexity(out, text_file, ctx=64)
    # llama-perplexity's asynchronous log can lose its last rows on a loaded machine: compare the chunks it printed
    # (its running mean over them), at most one fewer than the text holds.
    assert len(tokens) // 64 - 1 <= theirs.chunks <= len(tokens) // 64, f"{where}: {theirs.chunks} chunks"
    ours = llama_cpp_peer.chunked_perplexity(llm, tokens[:theirs.chunks * 64], ctx=64, bos_token_id=0)  # (BOS: as
    # llama-perplexity puts it first in each chunk when the vocabulary adds it)
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=1e-3), f"seed {SEED}, {where}"

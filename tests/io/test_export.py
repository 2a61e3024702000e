"""Exported dropped models: stripped and referencing folders load in the runtime with the same logits; the
renumbered block-drop folder loads in stock transformers and matches; unsafe exports are refused."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import folder_digest, hf_model

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.config import DropPlan
from llmdrop_rt.io.checkpoint import CheckpointReader
from llmdrop_rt.io.export import ExportError, export_model, is_dropped_tensor
from llmdrop_rt.io.publish import OutputError


def random_tokens(seed, length=13):
    return torch.randint(2, 300, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["strip", "reference"])
def test_dropped_export_loads_with_the_same_logits(tiny, tmp_path, fmt):
    before = folder_digest(tiny)
    num_layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    plan = DropPlan.create(num_layers, [1, num_layers - 1], [0, 1])
    out = export_model(tiny, tmp_path / "dropped", plan, fmt)
    assert folder_digest(tiny) == before  # the source is never written
    config = json.loads((out / "config.json").read_text())
    assert config["drop_attn_list"] == [1, num_layers - 1] and config["drop_mlp_list"] == [0, 1]
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    exported = llmdrop_rt.load(out, device="cpu")  # drop lists come from the exported config.json
    original = llmdrop_rt.load(tiny, drop_attn=plan.drop_attn, drop_mlp=plan.drop_mlp, device="cpu")
    assert exported.plan == original.plan
    tokens = random_tokens(1)
    assert torch.equal(exported.logits(tokens), original.logits(tokens))

    names = CheckpointReader(out).names()
    if fmt == "strip":
        assert not any(is_dropped_tensor(n, plan) for n in names)
        assert "model.layers.1.self_attn.q_proj.weight" not in names
        assert "model.layers.1.input_layernorm.weight" not in names
        assert "model.layers.0.self_attn.q_proj.weight" in names
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        assert size < sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    else:
        assert all(p.is_symlink() for p in out.glob("*.safetensors"))
        assert len(names) == len(CheckpointReader(tiny).names())


def test_strip_export_in_several_shards(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama2"]
    plan = DropPlan.create(4, [2], [3])
    out = export_model(source, tmp_path / "sharded", plan, "strip", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(out.glob("*.tmp"))
    tokens = random_tokens(2)
    assert torch.equal(llmdrop_rt.load(out, device="cpu").logits(tokens),
                       llmdrop_rt.load(source, drop_attn=[2], drop_mlp=[3], device="cpu").logits(tokens))


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral"])
def test_renumbered_block_drop_loads_in_stock_transformers(tiny_checkpoints, tmp_path, name):
    from transformers import AutoModelForCausalLM

    source = tiny_checkpoints[name]
    num_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    dropped = [1, num_layers - 2]
    plan = DropPlan.create(num_layers, dropped, dropped)
    out = export_model(source, tmp_path / "renumbered", plan, "renumbered")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == num_layers - 2
    assert "drop_attn_list" not in config and "drop_mlp_list" not in config
    layers = {int(n.split(".")[2]) for n in CheckpointReader(out).names() if n.startswith("model.layers.")}
    assert layers == set(range(num_layers - 2))

    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    reference = hf_model(source, dropped, dropped)  # the original with the dropped layers as identities
    ours = llmdrop_rt.load(source, drop_attn=dropped, drop_mlp=dropped, device="cpu")
    tokens = random_tokens(3, length=11)
    with torch.no_grad():
        stock_logits = stock(tokens).logits
        reference_logits = reference(tokens).logits
    torch.testing.assert_close(stock_logits, reference_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.logits(tokens), stock_logits, rtol=0, atol=1e-4)


def test_unsafe_or_wrong_exports_are_refused(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama2"]
    before = folder_digest(source)
    plan = DropPlan.create(4, [1], [])
    with pytest.raises(ExportError, match="must not be the source"):
        export_model(source, source, plan)
    with pytest.raises(ExportError, match="must not be the source"):
        export_model(source, source / "inside", plan)
    with pytest.raises(ExportError, match="pure block drop"):
        export_model(source, tmp_path / "x", plan, "renumbered")
    with pytest.raises(ExportError, match="not one of"):
        export_model(source, tmp_path / "x", plan, "zip")
    with pytest.raises(ExportError, match="for 6 layers"):
        export_model(source, tmp_path / "x", DropPlan.create(6, [1], []))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        export_model(source, existing, plan, "strip")
    with pytest.raises(OutputError, match="not a folder written by llmdrop-rt"):  # --force replaces our outputs only
        export_model(source, existing, plan, "strip", overwrite=True)
    assert (existing / "keep.txt").read_text() == "mine"
    ours = export_model(source, tmp_path / "ours", plan, "strip")
    (ours / "stale.txt").write_text("from an earlier export")
    export_model(source, ours, plan, "strip", overwrite=True)
    assert not (ours / "stale.txt").exists() and (ours / "config.json").is_file()
    assert folder_digest(source) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_cli_score_drop_export(tiny_checkpoints, tmp_path, capsys):
    source = tiny_checkpoints["llama3"]
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37} and more text" for i in range(400)))
    scores = tmp_path / "scores.json"
    main(["score", "--model", str(source), "--calib", str(calib), "--n-samples", "4", "--seq-len", "32",
          "--out", str(scores), "--no-progress"])
    data = json.loads(scores.read_text())
    assert len(data["importance"]["cosine"]["attn"]) == 6 and data["calibration"]["seq_len"] == 32
    out = tmp_path / "dropped"
    plan_file = tmp_path / "plan.json"
    main(["drop", "--model", str(source), "--scores", str(scores), "--granularity", "block", "-k", "2",
          "--out", str(plan_file), "--export", str(out), "--export-format", "renumbered"])
    plan = json.loads(plan_file.read_text())
    assert plan["drop_attn_list"] == plan["drop_mlp_list"] and len(plan["drop_attn_list"]) == 2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    main(["drop", "--model", str(source), "--calib", str(calib), "--n-samples", "4", "--seq-len", "32",
          "--metric", "cosine", "--granularity", "joint", "-k", "3", "--mode", "iterative", "--no-progress",
          "--out", str(plan_file)])
    assert len(json.loads(plan_file.read_text())["scores"]) == 3  # re-scored before each of the 3 drops
    with pytest.raises(SystemExit):
        main(["drop", "--model", str(source), "--scores", str(scores), "--granularity", "attn", "-k", "7"])
    assert "only 6 are left" in capsys.readouterr().err


def test_the_default_format_is_one_no_loader_mistakes(tiny_checkpoints, tmp_path):
    """auto: a block drop becomes a plain renumbered checkpoint, anything else DeciLM -- never LLM-Drop's drop lists
    in a Llama config, which stock transformers would load with random weights in place of the dropped modules."""
    source = tiny_checkpoints["llama2"]
    block = export_model(source, tmp_path / "block", DropPlan.create(4, [2], [2]))
    config = json.loads((block / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "drop_attn_list" not in config
    with pytest.raises(ExportError, match="256"):  # decilm, whose FFN widths this model's 80 cannot express
        export_model(source, tmp_path / "attn", DropPlan.create(4, [1], []))
    assert not (tmp_path / "attn").exists()


@pytest.mark.parametrize("name", ["qwen2_sliding", "qwen3", "gemma2"])
def test_family_exports(family_checkpoints, tmp_path, name):
    """strip: the whole dropped units are gone (Gemma2's post-norms too) and the logits are the dropped model's;
    renumbered (a block drop that shifts every later layer): stock transformers loads it, each layer keeping its
    window; decilm is refused."""
    source = family_checkpoints[name]
    num_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    tokens = random_tokens(3, length=19)  # longer than the sliding windows
    plan = DropPlan.create(num_layers, [1], [2])
    stripped = export_model(source, tmp_path / "strip", plan, "auto")
    names = CheckpointReader(stripped).names()
    assert not [n for n in names if n.startswith(("model.layers.1.input_layernorm", "model.layers.1.self_attn",
                                                  "model.layers.2.mlp", "model.layers.2.pre_feedforward",
                                                  "model.layers.2.post_feedforward"))]
    assert ("model.layers.1.post_attention_layernorm.weight" in names) == (name != "gemma2")
    with torch.no_grad():
        torch.testing.assert_close(llmdrop_rt.load(stripped).logits(tokens), hf_model(source, [1], [2])(tokens).logits,
                                   atol=1e-4, rtol=0)

    block = DropPlan.create(num_layers, [0], [0])
    renumbered = export_model(source, tmp_path / "renumbered", block, "auto")
    with torch.no_grad():
        stock = hf_model(renumbered)(tokens).logits
        torch.testing.assert_close(stock, hf_model(source, [0], [0])(tokens).logits, atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match=f"a {name.split('_')[0]} model cannot be written as decilm"):
        export_model(source, tmp_path / "decilm", plan, "decilm")

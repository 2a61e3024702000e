"""`quantize`: GPTQModel makes GPTQ / AWQ checkpoints of dropped models; they load in our runtime and in GPTQModel,
and both agree.

GPTQModel is an optional extra; `make test` installs it (see the Makefile), so these tests run in CI.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import DATA, folder_digest, hf_model, make_checkpoint
from safetensors import safe_open

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.config import DropPlan
from llmdrop_rt.drop.calibration import load_calibration
from llmdrop_rt.io.export import ExportError, export_model
from llmdrop_rt.io.publish import OutputError
from llmdrop_rt.io.tokenizer import Tokenizer
from llmdrop_rt.model.standins import ZeroAttention
from llmdrop_rt.quant.gptqmodel import (
    QuantizeError,
    compare_with_gptqmodel,
    exclusion_rules,
    load_in_gptqmodel,
    quantize_model,
)

DROP_ATTN, DROP_MLP = [1], [2]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny GQA Llama whose projections are multiples of 64 (GPTQModel's AWQ clip search needs that)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return make_checkpoint(tmp_path_factory.mktemp("quantize") / "tiny", cfg, seed=11)


def calibration(folder: Path, n_samples=8, seq_len=64):
    return load_calibration(Tokenizer(folder), DATA / "calib.txt", n_samples, seq_len)




def tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("method,how", [("gptq", "cli"), ("gptq-act-order-asym", "api"), ("awq", "api")])
def test_quantized_dropped_model_round_trip(source, tmp_path, monkeypatch, capsys, method, how):
    monkeypatch.chdir(tmp_path)  # GPTQModel writes ./logs; quantize must keep it out of the working directory
    before = folder_digest(source)
    out = tmp_path / "quantized"
    calib = calibration(source)
    calls = []
    original_forward = ZeroAttention.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(ZeroAttention, "forward", counting_forward)
    if how == "cli":
        main(["quantize", "--model", str(source), "--drop-attn", "1", "--drop-mlp", "2", "--method", "gptq",
              "--group-size", "32", "--calib", str(DATA / "calib.txt"), "--n-samples", "8", "--seq-len", "64",
              "--out", str(out), "--verify"])
        assert "top-1 agreement" in capsys.readouterr().out
    else:  # from a stripped export: the dropped tensors do not even exist in the source
        stripped = export_model(source, tmp_path / "stripped", DropPlan.create(4, DROP_ATTN, DROP_MLP), "strip")
        kwargs = {"method": "awq"} if method == "awq" else {"method": "gptq", "desc_act": True, "sym": False}
        quantize_model(stripped, out, calib, group_size=32, **kwargs)
    assert folder_digest(source) == before and not (tmp_path / "logs").exists()
    assert calls, "the quantizer's forward never went through the dropped attention's stand-in"

    config = json.loads((out / "config.json").read_text())
    assert (config["drop_attn_list"], config["drop_mlp_list"]) == (DROP_ATTN, DROP_MLP)
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == method[:4] and qcfg["group_size"] == 32
    assert qcfg["dynamic"] == exclusion_rules(DropPlan.create(4, DROP_ATTN, DROP_MLP))
    names = tensor_names(out)
    assert not [n for n in names if n.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm",
                                                  "model.layers.2.mlp", "model.layers.2.post_attention"))]
    assert "model.layers.2.self_attn.q_proj.qweight" in names and "model.layers.1.mlp.down_proj.qweight" in names
    if method.startswith("gptq-act-order"):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
        assert (g_idx.diff() < 0).any(), "act-order should store a non-monotone g_idx"

    # Our runtime and GPTQModel agree on the quantized model (ours in fp32, GPTQModel in fp16).
    tokens = calibration(source, n_samples=2, seq_len=48).tokens
    check = compare_with_gptqmodel(out, tokens)
    assert check["max_abs_diff"] <= 1e-2 * check["max_abs_logit"], check
    assert check["top1_agreement"] >= 0.97, check

    # ... and it is the dropped fp32 model, quantized: much nearer to it than to the undropped one. (Random
    # Gaussian weights lose ~10% per weight to 4 bits, so the error itself is not small.)
    ours = llmdrop_rt.load(out, dtype="float32").logits(tokens)
    dropped = hf_model(source, DROP_ATTN, DROP_MLP)(tokens).logits
    full = hf_model(source)(tokens).logits
    error = (ours - dropped).norm() / dropped.norm()
    print(f"{method}: relative error {error:.3f}, vs the undropped model {(ours - full).norm() / full.norm():.3f}")
    assert error <= 0.35 and error <= 0.5 * (ours - full).norm() / full.norm()


def test_gptqmodel_reload_keeps_the_dropped_modules_out(source, tmp_path, monkeypatch):
    """Without the exclusion rules GPTQModel would demand the dropped modules' qweights; with them it loads, and
    `load_in_gptqmodel` puts the weightless stand-ins where the modules were."""
    monkeypatch.chdir(tmp_path)
    out = quantize_model(source, tmp_path / "q", calibration(source, 4, 32), "gptq",
                         DropPlan.create(4, [0, 3], []), group_size=64)
    model = load_in_gptqmodel(out)
    assert isinstance(model.model.layers[0].self_attn, ZeroAttention)
    assert isinstance(model.model.layers[3].self_attn, ZeroAttention)
    assert not isinstance(model.model.layers[1].self_attn, ZeroAttention)
    assert not any(p.numel() for p in model.model.layers[3].self_attn.parameters())


def test_quantize_refuses_bad_requests(source, tmp_path):
    calib = calibration(source, 2, 16)
    with pytest.raises(QuantizeError, match="method 'int8'"):
        quantize_model(source, tmp_path / "a", calib, method="int8")
    with pytest.raises(QuantizeError, match="desc_act"):
        quantize_model(source, tmp_path / "a", calib, method="awq", desc_act=True)
    with pytest.raises(QuantizeError, match="dtype 'float32'"):
        quantize_model(source, tmp_path / "a", calib, dtype="float32")
    with pytest.raises(QuantizeError, match="AWQ group_size=256 does not divide hidden_size=128"):
        quantize_model(source, tmp_path / "a", calib, method="awq", group_size=256)
    with pytest.raises(QuantizeError, match="group_size=12"):
        quantize_model(source, tmp_path / "a", calib, group_size=12)
    with pytest.raises(QuantizeError, match="drop plan is for 6 layers"):
        quantize_model(source, tmp_path / "a", calib, plan=DropPlan.create(6, [1], []))
    with pytest.raises(ExportError, match="must not be the source"):
        quantize_model(source, source, calib)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        quantize_model(source, tmp_path / "exists", calib)
    with pytest.raises(OutputError, match="not a folder written by llmdrop-rt"):
        quantize_model(source, tmp_path / "exists", calib, overwrite=True)
    quantized = tmp_path / "already"
    quantized.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (quantized / name).write_bytes((source / name).read_bytes())
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_model(quantized, tmp_path / "b", calib)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "a failed request left a staging folder"


def test_quantized_dropped_qwen2_round_trip(tmp_path, monkeypatch):
    """Qwen2 (q/k/v biases, tied embeddings) through GPTQModel: the other families' stand-ins are checked without
    quantizing, below."""
    from transformers import Qwen2Config

    monkeypatch.chdir(tmp_path)
    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    source = make_checkpoint(tmp_path / "qwen2", cfg, seed=12)
    plan = DropPlan.create(3, [1], [2])
    out = quantize_model(source, tmp_path / "q", calibration(source, 4, 32), "gptq", plan, group_size=32)
    names = tensor_names(out)
    assert not [n for n in names if n.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm",
                                                  "model.layers.2.mlp", "model.layers.2.post_attention"))]
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.qweight"} <= names
    tokens = calibration(source, n_samples=2, seq_len=32).tokens
    check = compare_with_gptqmodel(out, tokens)
    assert check["max_abs_diff"] <= 1e-2 * check["max_abs_logit"], check
    assert check["top1_agreement"] >= 0.97, check
    ours = llmdrop_rt.load(out, dtype="float32").logits(tokens)
    dropped = hf_model(source, [1], [2])(tokens).logits
    full = hf_model(source)(tokens).logits
    error = (ours - dropped).norm() / dropped.norm()
    assert error <= 0.35 and error <= 0.5 * (ours - full).norm() / full.norm()


def test_gemma2_standins_replace_the_whole_unit(family_checkpoints):
    """Gemma2's post-norms belong to their units: the quantizer's stand-ins leave no weights in a dropped unit and
    compute the dropped model."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmdrop_rt.quant.gptqmodel import apply_drop_plan

    folder = family_checkpoints["gemma2"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    apply_drop_plan(model, DropPlan.create(5, [1], [3]))
    attn_unit, mlp_unit = model.model.layers[1], model.model.layers[3]
    for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
        assert not any(p.numel() for p in getattr(attn_unit, part).parameters()), part
    for part in ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert not any(p.numel() for p in getattr(mlp_unit, part).parameters()), part
    assert any(p.numel() for p in attn_unit.pre_feedforward_layernorm.parameters())  # the MLP unit stays whole
    tokens = torch.randint(2, 300, (1, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, llmdrop_rt.load(folder, drop_attn=[1], drop_mlp=[3])
                                   .logits(tokens), atol=1e-4, rtol=0)

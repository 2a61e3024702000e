"""The `decilm` export: NVIDIA's DeciLM / nemotron-nas checkpoint format. The folder runs in stock transformers through
the modeling file it carries (trust_remote_code, passed by these tests only) with our logits, loads back in
llmdrop-rt with the plan it came from, and its block_configs read as vLLM's and llama.cpp's readers read them."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_checkpoint

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.config import ConfigError, DropPlan, ModelConfig
from llmdrop_rt.io.checkpoint import CheckpointReader
from llmdrop_rt.io.export import ExportError, decilm_ffn_mult, export_model, is_dropped_tensor

# (drop_attn, drop_mlp) on 4 layers: attention only, MLP only, and mixed with a whole block (layer 3) dropped
PLANS = {"attn": ([1, 3], []), "mlp": ([], [0, 2]), "mixed": ([2, 3], [1, 3])}


def decilm_ready_configs():
    """Tiny Llamas whose FFN width DeciLM can express (a multiple of 256): GQA with biases; tied with llama3 rope."""
    from transformers import LlamaConfig

    common = dict(vocab_size=300, num_hidden_layers=4, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1)
    return {
        "gqa": LlamaConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                           attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **common),
        "tied": LlamaConfig(hidden_size=96, intermediate_size=512, num_attention_heads=6, num_key_value_heads=6,
                            tie_word_embeddings=True, **common,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32}),
    }


@pytest.fixture(scope="session")
def decilm_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decilm-sources")
    return {name: make_checkpoint(root / name, config, seed=seed)
            for seed, (name, config) in enumerate(decilm_ready_configs().items())}


def tokens(seed, length=16, vocab=300):
    return torch.randint(2, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def load_in_transformers(folder: Path):
    """Our exported modeling file in stock transformers (the one place trust_remote_code is passed)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert type(model).__name__ == "DeciLMForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing randomly initialised
    return model.eval()


def check_matches_ours(source: Path, out: Path, plan: DropPlan, token_ids: torch.Tensor, atol: float = 1e-4):
    """transformers runs the export in float64 (exact for fp32 weights); our fp32 logits stay within `atol` of it,
    the rounding of fp32 arithmetic. (Against transformers in fp32 a tighter bound held only while both called the
    same GEMM, with the same rounding.)"""
    ours = llmdrop_rt.load(source, drop_attn=plan.drop_attn, drop_mlp=plan.drop_mlp, device="cpu")
    expected = ours.logits(token_ids)
    with torch.no_grad():
        theirs = load_in_transformers(out).double()(token_ids).logits
    torch.testing.assert_close(expected.double(), theirs, rtol=0, atol=atol)
    back = llmdrop_rt.load(out, device="cpu")  # the plan comes from block_configs
    assert back.plan == ours.plan
    assert torch.equal(back.logits(token_ids), expected)


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model_name", ["gqa", "tied"])
def test_decilm_export_runs_in_transformers_and_loads_back(decilm_sources, tmp_path, model_name, plan_name):
    source = decilm_sources[model_name]
    plan = DropPlan.create(4, *PLANS[plan_name])
    out = export_model(source, tmp_path / "decilm", plan, "decilm")
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                                  "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert "drop_attn_list" not in config and "drop_mlp_list" not in config
    for key in ("rope_parameters", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "hidden_size"):
        assert config[key] == source_config[key]
    # the older spellings too: SGLang's DeciLM reads getattr(config, "rope_theta", 10000) and rope_scaling
    theta = source_config["rope_parameters"]["rope_theta"]
    assert config["rope_theta"] == theta and config["torch_dtype"] == config["dtype"] == "float32"
    assert config.get("rope_scaling", {}).get("rope_type") == ("llama3" if model_name == "tied" else None)
    assert (out / "configuration_decilm.py").is_file() and (out / "modeling_decilm.py").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    names = CheckpointReader(out).names()
    assert not any(is_dropped_tensor(n, plan) for n in names)
    assert len(names) == len([n for n in CheckpointReader(source).names() if not is_dropped_tensor(n, plan)])
    check_matches_ours(source, out, plan, tokens(1))


def test_decilm_generation_in_transformers_uses_its_cache(decilm_sources, tmp_path):
    """Greedy decoding through transformers' KV cache, in which the layers without attention hold no entries."""
    source = decilm_sources["gqa"]
    plan = DropPlan.create(4, *PLANS["mixed"])
    out = export_model(source, tmp_path / "decilm", plan, "decilm")
    prompt = tokens(4, length=9)[:1]
    generated = load_in_transformers(out).generate(prompt, max_new_tokens=8, do_sample=False)
    ours = llmdrop_rt.load(source, drop_attn=plan.drop_attn, drop_mlp=plan.drop_mlp, device="cpu")
    assert generated[0, 9:].tolist() == ours.generate_ids([prompt[0].tolist()], max_new_tokens=8)[0]


def test_decilm_export_of_smollm2(smollm2_dir, tmp_path):
    plan = DropPlan.create(30, [5, *range(20, 28)], [10, 27])
    out = export_model(smollm2_dir, tmp_path / "smollm2-decilm", plan, "decilm")
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    assert {b["ffn"]["ffn_mult"] for b in blocks if not b["ffn"]["no_op"]} == {4.0}
    assert {b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"]} == {3}
    # 30 layers: fp32 rounding reaches up to ~7e-4 of the float64 logits on some inputs (RMS-norm eps x 2: 5e-2)
    check_matches_ours(smollm2_dir, out, plan, tokens(2, vocab=49152)[:1], atol=1e-3)


def test_without_trust_remote_code_transformers_refuses(decilm_sources, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_model(decilm_sources["gqa"], tmp_path / "decilm", DropPlan.create(4, [1], []), "decilm")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    with pytest.raises(ValueError, match="custom code"):  # no prompt can be answered under pytest
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(("hidden", "intermediate", "expected"),
                         [(576, 1536, 4.0), (4096, 11008, 4.03125), (4096, 14336, 5.25), (64, 256, 6.0),
                          (2048, 8192, 6.0), (5120, 13824, 4.05)])
def test_ffn_mult_reproduces_the_width(hidden, intermediate, expected):
    from llmdrop_rt.config import ffn_mult_to_intermediate_size

    mult = decilm_ffn_mult(intermediate, hidden)
    assert isinstance(mult, float) and mult == expected
    assert ffn_mult_to_intermediate_size(mult, hidden) == intermediate


def test_decilm_export_refusals(decilm_sources, tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError, match="layer 0's attention"):
        export_model(decilm_sources["gqa"], tmp_path / "x", DropPlan.create(4, [0, 2], []), "decilm")
    with pytest.raises(ExportError, match="intermediate_size=80 .* multiples of 256"):
        export_model(tiny_checkpoints["llama2"], tmp_path / "x", DropPlan.create(4, [1], []), "decilm")
    with pytest.raises(ExportError, match="sliding_window=7"):
        export_model(tiny_checkpoints["mistral"], tmp_path / "x", DropPlan.create(4, [1], []), "decilm")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def decilm_config_dict(decilm_sources, tmp_path) -> dict:
    out = export_model(decilm_sources["gqa"], tmp_path / "decilm", DropPlan.create(4, [1], [2]), "decilm")
    return json.loads((out / "config.json").read_text())


def test_block_configs_read_as_the_drop_plan(decilm_config_dict):
    cfg = ModelConfig.from_dict(decilm_config_dict)
    assert (cfg.num_kv_heads, cfg.intermediate_size) == (2, 256)
    plan = DropPlan.from_config(cfg)
    assert plan.drop_attn == {1} and plan.drop_mlp == {2}
    assert DropPlan.from_config(cfg, drop_attn=[3]).drop_attn == {3}  # explicit lists still override
    # llama.cpp's spelling of an attention-free layer: n_heads_in_group null, no_op false
    decilm_config_dict["block_configs"][3]["attention"].update(no_op=False, n_heads_in_group=None)
    assert DropPlan.from_config(ModelConfig.from_dict(decilm_config_dict)).drop_attn == {1, 3}
    # a newer config's width as ffn.intermediate_size in place of ffn_mult (vLLM's fallback)
    del decilm_config_dict["block_configs"][0]["ffn"]["ffn_mult"]
    decilm_config_dict["block_configs"][0]["ffn"]["intermediate_size"] = 256
    assert ModelConfig.from_dict(decilm_config_dict).intermediate_size == 256
    # NVIDIA's configs leave num_key_value_heads / intermediate_size null: block_configs give them
    decilm_config_dict.update(num_key_value_heads=None, intermediate_size=None)
    cfg = ModelConfig.from_dict(decilm_config_dict)
    assert (cfg.num_kv_heads, cfg.intermediate_size) == (2, 256)


@pytest.mark.parametrize(("layer", "part", "change", "message"), [
    (2, "attention", {"replace_with_linear": True}, r"block_configs\[2\]\.attention\.replace_with_linear"),
    (3, "ffn", {"replace_with_linear": True}, r"block_configs\[3\]\.ffn\.replace_with_linear"),
    (3, "attention", {"n_heads_in_group": 1}, r"block_configs\[3\]\.attention\.n_heads_in_group = 1 gives 4 KV"),
    (3, "attention", {"n_heads_in_group": 3}, r"block_configs\[3\]\.attention\.n_heads_in_group = 3: expected"),
    (1, "ffn", {"ffn_mult": 8.0}, r"block_configs\[1\]\.ffn\.ffn_mult = 8.0 gives FFN width 512"),
    (1, "ffn", {"ffn_mult": None}, r"block_configs\[1\]\.ffn\.ffn_mult = None: expected a positive number"),
    (1, "ffn", {"hidden_act": "gelu"}, r"block_configs\[1\]\.ffn\.hidden_act = 'gelu'"),
    (0, "attention", {"window_length": 128}, r"block_configs\[0\]\.attention\.window_length"),
])
def test_block_configs_refusals(decilm_config_dict, layer, part, change, message):
    decilm_config_dict["block_configs"][layer][part].update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(decilm_config_dict)


def test_block_configs_refusals_of_the_whole_list(decilm_config_dict, tmp_path):
    short = dict(decilm_config_dict, block_configs=decilm_config_dict["block_configs"][:3])
    with pytest.raises(ConfigError, match="one entry per layer .*got 3 entries"):
        ModelConfig.from_dict(short)
    with pytest.raises(ConfigError, match="block_configs and drop_attn_list"):
        ModelConfig.from_dict(dict(decilm_config_dict, drop_attn_list=[1]))
    # through load(): a folder whose ffn widths differ per layer (and whose .py files are never imported)
    folder = tmp_path / "per-layer"
    folder.mkdir()
    decilm_config_dict["block_configs"][3]["ffn"]["ffn_mult"] = 12.0
    (folder / "config.json").write_text(json.dumps(decilm_config_dict))
    (folder / "modeling_decilm.py").write_text("raise SystemExit('imported')\n")
    (folder / "configuration_decilm.py").write_text("raise SystemExit('imported')\n")
    with pytest.raises(ConfigError, match=r"block_configs\[3\]\.ffn\.ffn_mult = 12.0 gives FFN width 512"):
        llmdrop_rt.load(folder, device="cpu")


# --- The readers' view of block_configs -------------------------------------------------------------------------

def as_attributes(value):
    """JSON as the attribute-access objects vLLM's config holds (its readers use block.attention.no_op, ...)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: as_attributes(v) for k, v in value.items()})
    if isinstance(value, list):
        return [as_attributes(v) for v in value]
    return value


def vllm_layer_tensors(config) -> tuple[set[str], dict[int, int], dict[int, int]]:
    """The tensors vLLM's DeciLM builds, and its per-layer KV heads and FFN widths, read as
    vllm/model_executor/models/nemotron_nas.py (vllm-project/vllm) does in DeciLMDecoderLayer.__init__ with
    `_ffn_mult_to_intermediate_size`; its load_weights looks every checkpoint tensor up in these parameters."""
    def find_multiple(n, k):
        return n if n % k == 0 else n + k - (n % k)

    names, kv_heads, widths = set(), {}, {}
    for layer, block in enumerate(config.block_configs):
        prefix = f"model.layers.{layer}"
        if not block.attention.no_op:
            kv_heads[layer] = config.num_attention_heads // block.attention.n_heads_in_group
            names |= {f"{prefix}.input_layernorm.weight"}
            names |= {f"{prefix}.self_attn.{p}_proj.weight" for p in "qkvo"}
        if not block.ffn.no_op:
            if hasattr(block.ffn, "ffn_mult"):
                widths[layer] = find_multiple(int(2 * block.ffn.ffn_mult * config.hidden_size / 3), 256)
            else:
                widths[layer] = block.ffn.intermediate_size
            names |= {f"{prefix}.post_attention_layernorm.weight"}
            names |= {f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names, kv_heads, widths


def llama_cpp_layer_shapes(config: dict) -> tuple[list[int], list[int]]:
    """Per-layer KV heads and FFN widths as llama.cpp's converter computes them from the JSON (DeciModel.__init__
    in conversion/deci.py of the llama.cpp vendored by llama-cpp-python 0.3.36): n_heads_in_group null without
    replace_with_linear is no attention, ffn_mult null no FFN; `no_op` is not read."""
    kv_heads, widths = [], []
    for block in config["block_configs"]:
        group = block["attention"]["n_heads_in_group"]
        assert block["attention"]["replace_with_linear"] is False
        kv_heads.append(0 if group is None else config["num_attention_heads"] // group)
        mult = block["ffn"]["ffn_mult"]
        assert mult is None or type(mult) is float  # the converter asserts a float multiplier
        widths.append(0 if mult is None else -(-int(2 * mult * config["hidden_size"] / 3) // 256) * 256)
    return kv_heads, widths


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_block_configs_as_vllm_and_llama_cpp_read_them(decilm_sources, tmp_path, plan_name):
    from transformers import AutoConfig

    plan = DropPlan.create(4, *PLANS[plan_name])
    out = export_model(decilm_sources["gqa"], tmp_path / "decilm", plan, "decilm")
    config = json.loads((out / "config.json").read_text())
    exported = {n for n in CheckpointReader(out).names() if n.startswith("model.layers.") and n.endswith("weight")}
    expected_kv = {i: 2 for i in range(4) if plan.has_attn(i)}
    expected_widths = {i: 256 for i in range(4) if plan.has_mlp(i)}
    # the JSON as attributes, and our own configuration class (what trust_remote_code gives vLLM)
    our_config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(our_config).__name__ == "DeciLMConfig" and our_config.rope_theta == config["rope_theta"]
    for reader_config in (as_attributes(config), our_config):
        names, kv_heads, widths = vllm_layer_tensors(reader_config)
        assert names == exported and kv_heads == expected_kv and widths == expected_widths
    kv_heads, widths = llama_cpp_layer_shapes(config)
    assert kv_heads == [expected_kv.get(i, 0) for i in range(4)]
    assert widths == [expected_widths.get(i, 0) for i in range(4)]


# --- Command line and round trips --------------------------------------------------------------------------------

def test_cli_export_and_drop_export_decilm(decilm_sources, tmp_path, capsys):
    source = decilm_sources["gqa"]
    out = tmp_path / "cli-decilm"
    main(["export", "--model", str(source), "--drop-attn", "1,3", "--drop-mlp", "2", "--format", "decilm",
          "--out", str(out)])
    assert "(decilm) ->" in capsys.readouterr().out
    assert llmdrop_rt.load(out, device="cpu").plan == DropPlan.create(4, [1, 3], [2])
    with pytest.raises(SystemExit):
        main(["export", "--model", str(source), "--drop-attn", "1", "--format", "decilm", "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    main(["export", "--model", str(source), "--drop-attn", "1", "--format", "decilm", "--out", str(out), "--force"])
    assert llmdrop_rt.load(out, device="cpu").plan == DropPlan.create(4, [1], [])
    with pytest.raises(SystemExit):
        main(["export", "--model", str(source), "--drop-attn", "0", "--format", "decilm", "--out", str(tmp_path / "y")])
    assert "layer 0's attention" in capsys.readouterr().err

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37} and more text" for i in range(200)))
    dropped = tmp_path / "drop-decilm"
    main(["drop", "--model", str(source), "--calib", str(calib), "--n-samples", "2", "--seq-len", "16",
          "--granularity", "attn", "-k", "1", "--protect-first", "1", "--no-progress", "--export", str(dropped),
          "--export-format", "decilm"])
    config = json.loads((dropped / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]].count(True) == 1


def test_decilm_source_exports_to_the_llama_formats(decilm_sources, tmp_path):
    source = decilm_sources["gqa"]
    plan = DropPlan.create(4, [1], [2])
    decilm = export_model(source, tmp_path / "decilm", plan, "decilm")
    stripped = export_model(decilm, tmp_path / "strip", llmdrop_rt.load(decilm, device="cpu").plan, "strip")
    config = json.loads((stripped / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "block_configs" not in config
    token_ids = tokens(3)
    assert torch.equal(llmdrop_rt.load(stripped, device="cpu").logits(token_ids),
                       llmdrop_rt.load(source, drop_attn=[1], drop_mlp=[2], device="cpu").logits(token_ids))

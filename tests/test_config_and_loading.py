"""Drop plans are applied physically (no weights, no reads, no KV slot) and bad inputs fail clearly."""
import json
import shutil

import pytest
import torch

import llmdrop_rt
from llmdrop_rt import ConfigError, DropPlan, ModelConfig
from llmdrop_rt.io.checkpoint import CheckpointError, CheckpointReader
from llmdrop_rt.model import KVCache


def layer_bytes(folder, layer, kind):
    """Bytes on disk of one layer's attention (with its input norm) or MLP (with its norm)."""
    reader = CheckpointReader(folder)
    prefixes = {"attn": (f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.input_layernorm."),
                "mlp": (f"model.layers.{layer}.mlp.", f"model.layers.{layer}.post_attention_layernorm.")}[kind]
    return sum(reader.get(n).nbytes for n in reader.names() if n.startswith(prefixes))


@pytest.mark.parametrize("drop_attn, drop_mlp", [([0, 2], []), ([], [1]), ([1, 3], [1, 3])])
def test_param_bytes_shrink_by_exactly_the_dropped_modules(tiny, drop_attn, drop_mlp):
    full = llmdrop_rt.load(tiny)
    dropped = llmdrop_rt.load(tiny, drop_attn=drop_attn, drop_mlp=drop_mlp)
    removed = sum(layer_bytes(tiny, i, "attn") for i in drop_attn) + sum(layer_bytes(tiny, i, "mlp") for i in drop_mlp)
    assert full.param_bytes() - dropped.param_bytes() == removed > 0


def test_kv_cache_bytes_scale_with_kept_attention_layers(tiny_checkpoints):
    folder = tiny_checkpoints["llama3"]  # 6 layers
    full = llmdrop_rt.load(folder)
    half = llmdrop_rt.load(folder, drop_attn=[1, 3, 5])
    assert half.kv_cache_bytes(8, 128) * 2 == full.kv_cache_bytes(8, 128)
    cfg = full.cfg
    assert full.kv_cache_bytes(8, 128) == 2 * 6 * 8 * cfg.num_kv_heads * 128 * cfg.head_dim * 4
    # The engine's real allocation has exactly one slot per kept attention layer.
    from llmdrop_rt.model.cache import KVCache

    cache = KVCache(half.cfg, half.plan, 2, 16, torch.float32, "cpu")
    assert cache.k.shape[0] == 3 and sorted(cache.slot_of) == [0, 2, 4]
    assert cache.nbytes() == half.kv_cache_bytes(2, 16)


def test_dropped_modules_are_absent_and_never_read(tiny_checkpoints, monkeypatch):
    folder = tiny_checkpoints["llama2"]
    read = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get",
                        lambda self, name, shape=None: read.append(name) or original(self, name, shape))
    llm = llmdrop_rt.load(folder, drop_attn=[1], drop_mlp=[2])
    layers = llm.model.layers
    assert layers[1].attn is None and layers[1].attn_norm is None and layers[1].mlp is not None
    assert layers[2].mlp is None and layers[2].mlp_norm is None and layers[2].attn is not None
    assert not any(n.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm")) for n in read)
    assert not any(n.startswith(("model.layers.2.mlp", "model.layers.2.post_attention_layernorm")) for n in read)
    assert any(n.startswith("model.layers.2.self_attn") for n in read)


def test_drop_lists_from_config_json_and_override(tiny_checkpoints, tmp_path):
    folder = tmp_path / "dropped"
    shutil.copytree(tiny_checkpoints["llama2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["drop_attn_list"] = [False, True, False, True]  # LLM-Drop's boolean-mask form
    cfg["drop_mlp_list"] = [2]
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = llmdrop_rt.load(folder)
    assert llm.plan.drop_attn == {1, 3} and llm.plan.drop_mlp == {2}
    overridden = llmdrop_rt.load(folder, drop_attn=[0], drop_mlp=[])
    assert overridden.plan.drop_attn == {0} and overridden.plan.drop_mlp == set()


def test_plan_slots_and_lists():
    plan = DropPlan.create(6, [1, 4], [4])
    assert plan.kept_attn_layers == [0, 2, 3, 5]
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                                 "intermediate_size": 8, "num_hidden_layers": 6, "num_attention_heads": 2})
    cache = KVCache(cfg, plan, 1, 4, torch.float32, "meta")
    assert [cache.slot_of[i] for i in plan.kept_attn_layers] == [0, 1, 2, 3]
    assert plan.to_config_lists() == {"drop_attn_list": [1, 4], "drop_mlp_list": [4]}
    with pytest.raises(KeyError):
        cache.layer(1)


@pytest.mark.parametrize("attn, mlp, message", [
    ([4], None, r"drop_attn_list\[0\] = 4: out of range for 4 layers"),
    ([-1], None, r"drop_attn_list\[0\] = -1: out of range"),
    ([1, 1], None, r"drop_attn_list\[1\] = 1: duplicate"),
    (["2"], None, r"drop_attn_list\[0\] = '2': expected an integer"),
    ([1.0], None, r"expected an integer"),
    ("0,1", None, "must be a list"),
    ([True, False], None, "boolean mask has length 2, expected num_hidden_layers=4"),
    (None, [0, 9], r"drop_mlp_list\[1\] = 9"),
    ([0, 1, 2, 3], [0, 1, 2, 3], "every one of the 4 layers is dropped"),
])
def test_bad_drop_lists_name_the_entry(attn, mlp, message):
    with pytest.raises(ConfigError, match=message):
        DropPlan.create(4, attn, mlp)


def test_bad_checkpoints_give_clear_errors(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama2"]
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        llmdrop_rt.load(tmp_path)

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    arch = copy("arch")
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        llmdrop_rt.load(arch)

    rope = copy("rope")
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (rope / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        llmdrop_rt.load(rope)

    broken_json = copy("broken_json")
    (broken_json / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        llmdrop_rt.load(broken_json)

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    (missing / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only safetensors are read, never pickle"):
        llmdrop_rt.load(missing)

    corrupt = copy("corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        llmdrop_rt.load(corrupt)

    shape = copy("shape")
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 81
    (shape / "config.json").write_text(json.dumps(cfg))
    expected = r"'model.layers.0.mlp.gate_proj.weight' has shape \(80, 48\), expected \(81, 48\)"
    with pytest.raises(CheckpointError, match=expected):
        llmdrop_rt.load(shape)


def test_missing_tensor_and_missing_shard(tiny_checkpoints, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["sharded"], sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which is missing"):
        llmdrop_rt.load(sharded)
    with pytest.raises(CheckpointError, match="tensor 'nope' is missing"):
        CheckpointReader(tiny_checkpoints["llama2"]).get("nope")

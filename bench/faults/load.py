"""Load-side fault cases: mutated config fields, tensors, index files, GGUF headers and tokenizer/template files of
a tiny random Llama checkpoint, each run through `python -m llmdrop_rt ppl` (or `generate`).

A case whose mutation leaves the model the same (an integer where a number belongs, a chat template in
chat_template.jinja, a checkpoint without tokenizer files asked for token-free work...) must give the pristine
model's result; every other case must end in one clear error line naming what was broken.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .case import Case

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 300
HEAD_DIM = HIDDEN // HEADS
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; 12345 sphinx of black quartz, judge my vow.\n") * 2
PROJECTIONS = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
               "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
               "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
NORMS = ("input_layernorm", "post_attention_layernorm")
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# -- the tiny checkpoint -----------------------------------------------------------------------------------------
def tiny_tensors(seed: int = 0, layers: int = LAYERS, biases: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(shape, generator=gen) * (scale if scale is not None else shape[-1] ** -0.5)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=1.0),
               "model.norm.weight": 1 + rand(HIDDEN, scale=0.2), "lm_head.weight": rand(VOCAB, HIDDEN)}
    for i in range(layers):
        for norm in NORMS:
            tensors[f"model.layers.{i}.{norm}.weight"] = 1 + rand(HIDDEN, scale=0.2)
        for name, shape in PROJECTIONS.items():
            tensors[f"model.layers.{i}.{name}.weight"] = rand(*shape)
            if biases and name.startswith("self_attn"):
                tensors[f"model.layers.{i}.{name}.bias"] = rand(shape[0], scale=0.1)
    return tensors


def base_config(**changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 0,
              "eos_token_id": 1, "torch_dtype": "float32"}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not DELETE}


DELETE = object()  # a config change that removes the field


def tokenizer_vocabulary() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<s>", "</s>", *sorted(ByteLevel.alphabet())]
    return tokens + [f"<unused{i}>" for i in range(len(tokens), VOCAB)]


def write_tokenizer(folder: Path, chat_template: str | None = "{% for m in messages %}<{{ m['role'] }}>"
                    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(tokenizer_vocabulary())}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_folder(folder: Path, config: dict | None = None, tensors: dict | None = None, shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    tensors = tiny_tensors() if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(base_config() if config is None else config))
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: tensors[k].contiguous() for k in part}, str(folder / shard))
            weight_map.update({k: shard for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return folder


# -- a GGUF of the same weights ----------------------------------------------------------------------------------
def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's per-head interleave of q/k rows (the inverse of the importer's un-permutation)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_METADATA = {  # key -> (GGUFWriter adder, value)
    "llama.block_count": ("add_uint32", LAYERS), "llama.context_length": ("add_uint32", 256),
    "llama.embedding_length": ("add_uint32", HIDDEN), "llama.feed_forward_length": ("add_uint32", INTER),
    "llama.attention.head_count": ("add_uint32", HEADS), "llama.attention.head_count_kv": ("add_uint32", KV_HEADS),
    "llama.rope.dimension_count": ("add_uint32", HEAD_DIM), "llama.rope.freq_base": ("add_float32", 10000.0),
    "llama.attention.layer_norm_rms_epsilon": ("add_float32", 1e-5), "llama.vocab_size": ("add_uint32", VOCAB),
    "tokenizer.ggml.bos_token_id": ("add_uint32", 0), "tokenizer.ggml.eos_token_id": ("add_uint32", 1),
    "tokenizer.ggml.add_bos_token": ("add_bool", True),
}


def write_gguf(path: Path, metadata_changes: dict | None = None, tensors: dict | None = None) -> Path:
    """The tiny checkpoint as a float32 llama GGUF; `metadata_changes` maps a key to (adder, value) or None
    (left out)."""
    import gguf

    tensors = tiny_tensors() if tensors is None else tensors
    metadata = {**GGUF_METADATA, **(metadata_changes or {})}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, entry in metadata.items():
        if entry is not None:
            getattr(writer, entry[0])(key, entry[1])
    tokens = tokenizer_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges([])
    for name, tensor in tensors.items():
        values = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES.get(module, module)}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj") and kind == "weight":
                values = _llama_cpp_rows(values, HEADS if module.endswith("q_proj") else KV_HEADS)
        writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch_bytes(path: Path, offset: int, fmt: str, value) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def array_length_offset(path: Path, key: str) -> int:
    """Where the item count of the metadata array `key` sits in the file."""
    import gguf

    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key.encode()) + 4 + 4


# -- running the CLI ---------------------------------------------------------------------------------------------
def cli_stdout(argv: list[str]) -> str:
    """What `python -m llmdrop_rt argv` prints (for the pristine references)."""
    from llmdrop_rt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    return out.getvalue()


def ppl_argv(model: Path, text: Path) -> list[str]:
    return ["ppl", "--model", str(model), "--text", str(text), "--seq-len", "32", "--no-progress",
            "--device", "cpu", "--dtype", "float32"]


def generate_argv(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "Hello there", "--max-new-tokens", "6",
            "--device", "cpu", "--dtype", "float32", *extra]


def same_as(reference_argv: list[str]):
    """A check: the case's stdout equals the pristine model's on `reference_argv` (computed once, lazily)."""
    reference = functools.cache(lambda: cli_stdout(reference_argv))
    return lambda stdout: stdout == reference()


# -- the cases ---------------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, workdir: Path):
        self.root = workdir
        self.text = workdir / "text.txt"
        self.text.write_text(TEXT)
        self.pristine = write_folder(workdir / "pristine")
        self.cases: list[Case] = []
        self.same_ppl = same_as(ppl_argv(self.pristine, self.text))

    def folder(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.pristine, target)
        return target

    def add(self, name: str, model: Path, expect: str, mentions=(), argv=None, check=None):
        argv = argv or ppl_argv(model, self.text)
        if expect == "ok" and check is None:
            check = self.same_ppl
        self.cases.append(Case(name, argv, expect, tuple(mentions), check))

    def config_case(self, name: str, expect: str, mentions=(), **changes):
        folder = self.folder(name)
        (folder / "config.json").write_text(json.dumps(base_config(**changes)))
        self.add(name, folder, expect, mentions)

    def tensor_case(self, name: str, tensors: dict, expect: str, mentions=(), config: dict | None = None,
                    shards: int = 1):
        folder = write_folder(self.root / name, config, tensors, shards)
        self.add(name, folder, expect, mentions)


# bad values per kind of field; every one must be refused naming the field
BAD_POSITIVE_INT = {"string": "4", "float": 4.7, "integral_float": 4.0, "bool": True, "zero": 0, "negative": -1,
                    "list": [4], "object": {"n": 4}, "null": None}
BAD_BOOL = {"string_false": "false", "string_true": "true", "int_0": 0, "int_1": 1, "null": None, "list": [False]}
BAD_NUMBER = {"string": "1e-5", "zero": 0, "negative": -1e-5, "bool": True, "list": [1e-5], "null": None,
              "huge_exponent": float("inf")}


def _config_field_cases(b: _Builder) -> None:
    int_fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"]
    for field in int_fields:
        for label, value in BAD_POSITIVE_INT.items():
            b.config_case(f"config-{field}-{label}", "error", (field,), **{field: value})
    for field in ("num_key_value_heads", "head_dim", "sliding_window"):  # null is allowed for these
        for label, value in BAD_POSITIVE_INT.items():
            if label != "null":
                b.config_case(f"config-{field}-{label}", "error", (field,), **{field: value})
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        for label, value in BAD_BOOL.items():
            b.config_case(f"config-{field}-{label}", "error", (field,), **{field: value})
    for field in ("rms_norm_eps", "rope_theta"):
        for label, value in BAD_NUMBER.items():
            b.config_case(f"config-{field}-{label}", "error", (field,), **{field: value})
    for field, values in {"bos_token_id": [-1, "0", 1.0, VOCAB, True], "eos_token_id": [-1, "1", [1, "x"], [], VOCAB],
                          "hidden_act": ["gelu", 3, None], "architectures": ["LlamaForCausalLM", [3]],
                          "model_type": [7], "pretraining_tp": [2, "1"], "partial_rotary_factor": [0.5, "1"],
                          "torch_dtype": [32]}.items():
        for index, value in enumerate(values):
            b.config_case(f"config-{field}-bad{index}", "error", (field,), **{field: value})
    # relations between fields
    b.config_case("config-heads-not-dividing-hidden", "error", ("num_attention_heads", "hidden_size"),
                  num_attention_heads=5, num_key_value_heads=5, head_dim=DELETE)
    b.config_case("config-kv-heads-not-dividing-heads", "error", ("num_key_value_heads",), num_key_value_heads=3)
    b.config_case("config-odd-head-dim", "error", ("head_dim",), head_dim=7)
    b.config_case("config-fewer-layers-than-checkpoint", "error", ("num_hidden_layers", "layers"),
                  num_hidden_layers=1)
    b.config_case("config-more-layers-than-checkpoint", "error", ("model.layers.2",), num_hidden_layers=3)
    b.config_case("config-attention-bias-without-biases", "error", ("bias",), attention_bias=True)
    b.config_case("config-tied-but-distinct-head", "error", ("lm_head.weight", "tie_word_embeddings"),
                  tie_word_embeddings=True)
    b.config_case("config-unsupported-architecture", "error", ("architecture",), architectures=["GPT2LMHeadModel"],
                  model_type="gpt2")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        b.config_case(f"config-{field}-missing", "error", (field,), **{field: DELETE})
    b.config_case("config-vocab-smaller", "error", ("model.embed_tokens.weight",), vocab_size=VOCAB - 1,
                  eos_token_id=1)
    b.config_case("config-hidden-larger", "error", ("model.layers.0.self_attn.q_proj.weight", "(32, 32)"),
                  hidden_size=64, head_dim=DELETE)
    b.config_case("config-intermediate-other", "error", ("mlp.gate_proj",), intermediate_size=INTER * 2)
    for field, value in {"num_hidden_layers": 10**9, "vocab_size": 10**12, "hidden_size": 10**10,
                         "intermediate_size": 10**11, "head_dim": 10**9, "num_attention_heads": 2**20}.items():
        b.config_case(f"config-{field}-absurd", "error", ("model.",), **{field: value, "num_key_value_heads": None}
                      if field == "num_attention_heads" else {field: value})
    for label, value in {"list": [], "string": "gptq", "bits-8": {"quant_method": "gptq", "bits": 8},
                         "method-unknown": {"quant_method": "fp8"}}.items():
        b.config_case(f"config-quantization-{label}", "error", ("quantization_config",), quantization_config=value)
    # valid but unusual: the same model
    b.config_case("config-rope-theta-integer", "ok", rope_theta=10000)
    b.config_case("config-eps-spelled-differently", "ok", rms_norm_eps=0.00001)
    b.config_case("config-eos-as-list", "ok", eos_token_id=[1])
    b.config_case("config-kv-heads-null-means-heads", "error", ("k_proj",), num_key_value_heads=None)
    b.config_case("config-head-dim-null", "ok", head_dim=None)
    b.config_case("config-head-dim-absent", "ok", head_dim=DELETE)
    b.config_case("config-architectures-null", "ok", architectures=None)
    b.config_case("config-unknown-extra-field", "ok", some_future_field={"x": 1})
    b.config_case("config-sliding-window-null", "ok", sliding_window=None)
    b.config_case("config-rope-scaling-null", "ok", rope_scaling=None)
    b.config_case("config-dtype-bfloat16-note", "ok", torch_dtype="bfloat16")
    b.config_case("config-pretraining-tp-1", "ok", pretraining_tp=1)
    b.config_case("config-max-positions-large", "ok", max_position_embeddings=131072)
    b.config_case("config-max-positions-absurd", "ok", max_position_embeddings=10**15)


def _rope_cases(b: _Builder) -> None:
    bad = {
        "factor-zero": {"rope_type": "linear", "factor": 0}, "factor-negative": {"rope_type": "linear", "factor": -2},
        "factor-string": {"rope_type": "linear", "factor": "2"}, "factor-missing": {"rope_type": "linear"},
        "type-unknown": {"rope_type": "yarn", "factor": 2.0}, "type-not-string": {"rope_type": 3},
        "llama3-low-ge-high": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
        "llama3-orig-float": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32.5},
        "llama3-low-zero": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0},
        "theta-zero": {"rope_type": "default", "rope_theta": 0}, "theta-string": {"rope_type": "default",
                                                                                  "rope_theta": "1e4"},
    }
    mention = {"factor-missing": "factor", "type-unknown": "yarn", "type-not-string": "rope_type",
               "llama3-low-ge-high": "high_freq_factor", "llama3-orig-float": "original_max_position_embeddings",
               "llama3-low-zero": "low_freq_factor", "theta-zero": "rope_theta", "theta-string": "rope_theta"}
    for label, params in bad.items():
        for spelling in ("rope_scaling", "rope_parameters"):
            b.config_case(f"rope-{spelling}-{label}", "error", (mention.get(label, "factor"),), **{spelling: params})
    b.config_case("rope-scaling-list", "error", ("rope_scaling",), rope_scaling=[{"type": "linear"}])
    b.config_case("rope-parameters-string", "error", ("rope_parameters",), rope_parameters="linear")
    b.config_case("rope-default-type-spelled", "ok", rope_scaling={"type": "default"})
    b.config_case("rope-parameters-theta-inside", "ok", rope_theta=DELETE,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _decilm_config(**block_changes) -> dict:
    attention = {"n_heads_in_group": HEADS // KV_HEADS, "no_op": False, "replace_with_linear": False}
    ffn = {"intermediate_size": INTER, "no_op": False, "replace_with_linear": False}
    attention.update(block_changes.get("attention", {}))
    ffn.update(block_changes.get("ffn", {}))
    config = base_config(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
                         num_key_value_heads=DELETE, intermediate_size=DELETE)
    config["block_configs"] = [{"attention": dict(attention), "ffn": dict(ffn)} for _ in range(LAYERS)]
    return config


def _decilm_cases(b: _Builder) -> None:
    tensors = tiny_tensors()
    b.tensor_case("decilm-pristine", tensors, "ok", config=_decilm_config())
    bad = {"attn-no-op-string": ({"attention": {"no_op": "false"}}, "no_op"),
           "attn-group-zero": ({"attention": {"n_heads_in_group": 0}}, "n_heads_in_group"),
           "attn-group-not-dividing": ({"attention": {"n_heads_in_group": 3}}, "n_heads_in_group"),
           "attn-group-string": ({"attention": {"n_heads_in_group": "2"}}, "n_heads_in_group"),
           "attn-linear-string": ({"attention": {"replace_with_linear": "false"}}, "replace_with_linear"),
           "attn-linear": ({"attention": {"replace_with_linear": True}}, "replace_with_linear"),
           "ffn-width-float": ({"ffn": {"intermediate_size": 64.5}}, "intermediate_size"),
           "ffn-width-zero": ({"ffn": {"intermediate_size": 0}}, "intermediate_size"),
           "ffn-mult-negative": ({"ffn": {"intermediate_size": DELETE, "ffn_mult": -1.0}}, "ffn_mult"),
           "ffn-no-op-int": ({"ffn": {"no_op": 1}}, "no_op"),
           "ffn-act": ({"ffn": {"hidden_act": "relu"}}, "hidden_act")}
    for label, (changes, mention) in bad.items():
        config = _decilm_config(**changes)
        for block in config["block_configs"]:
            for part in block.values():
                for key in [k for k, v in part.items() if v is DELETE]:
                    del part[key]
        b.tensor_case(f"decilm-{label}", tensors, "error", (mention,), config=config)
    short = _decilm_config()
    short["block_configs"] = short["block_configs"][:1]
    b.tensor_case("decilm-too-few-blocks", tensors, "error", ("block_configs",), config=short)
    not_object = _decilm_config()
    not_object["block_configs"][1] = "block"
    b.tensor_case("decilm-block-not-object", tensors, "error", ("block_configs[1]",), config=not_object)
    # a no-op block's tensors are accounted for (dropped), a real one's missing tensors are named
    noop = _decilm_config()
    noop["block_configs"][1]["attention"] = {"no_op": True}
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.self_attn")}
    b.tensor_case("decilm-noop-without-its-tensors", kept, "ok", config=noop)
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (),
                       lambda out: out.startswith("perplexity ") and "attn=[1]" in out)


def _tensor_cases(b: _Builder) -> None:
    tensors = tiny_tensors()
    for name in tensors:
        short = name.replace("model.layers.", "L").replace(".weight", "")
        b.tensor_case(f"tensor-missing-{short}", {k: v for k, v in tensors.items() if k != name}, "error", (name,))
        shape = tensors[name].shape
        reshaped = tensors[name].flatten()[:-1] if len(shape) == 1 else tensors[name][:-1]
        b.tensor_case(f"tensor-shape-{short}", {**tensors, name: reshaped}, "error", (name,))
        if len(shape) == 2 and shape[0] != shape[1]:
            b.tensor_case(f"tensor-transposed-{short}", {**tensors, name: tensors[name].T.contiguous()}, "error",
                          (name,))
        renamed = {(k.replace("weight", "weights") if k == name else k): v for k, v in tensors.items()}
        b.tensor_case(f"tensor-renamed-{short}", renamed, "error", (name,))
        as_int = {**tensors, name: (tensors[name] * 100).to(torch.int32)}
        b.tensor_case(f"tensor-int-dtype-{short}", as_int, "error", (name,))
    extra = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(HEADS * HEAD_DIM),
             "model.layers.0.mlp.up_proj.bias": torch.zeros(INTER), "model.extra.weight": torch.zeros(3),
             "model.layers.0.self_attn.q_norm.weight": torch.ones(HEAD_DIM), "lm_head.bias": torch.zeros(VOCAB)}
    for name, tensor in extra.items():
        b.tensor_case(f"tensor-extra-{name}", {**tensors, name: tensor}, "error", (name,))
    more_layers = tiny_tensors(layers=4)
    b.tensor_case("tensor-checkpoint-has-more-layers", more_layers, "error", ("model.layers.2", "layers 0-3"))
    biased = tiny_tensors(biases=True)
    b.tensor_case("tensor-biases-but-no-attention-bias", biased, "error", ("q_proj.bias", "attention_bias"))
    b.tensor_case("tensor-biases-with-attention-bias", biased, "ok", config=base_config(attention_bias=True))
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (),
                       same_as(ppl_argv(b.root / "tensor-biases-with-attention-bias", b.text)))
    derived = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(HEAD_DIM // 2)}
    b.tensor_case("tensor-old-inv-freq-buffer", derived, "ok")
    tied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    b.tensor_case("tensor-tied-without-head", tied, "ok", config=base_config(tie_word_embeddings=True))
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (), lambda out: out.startswith("perplexity "))
    b.tensor_case("tensor-tied-with-identical-head", {**tied, "lm_head.weight": tied["model.embed_tokens.weight"]
                                                     .clone()}, "ok", config=base_config(tie_word_embeddings=True))
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (),
                       same_as(ppl_argv(b.root / "tensor-tied-without-head", b.text)))
    b.tensor_case("tensor-untied-without-head", tied, "error", ("lm_head.weight",))
    half = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    b.tensor_case("tensor-bf16-storage", half, "ok")
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (), lambda out: out.startswith("perplexity "))
    folder = b.folder("tensor-dropped-layer-weights-absent")
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.startswith("model.layers.1.mlp")},
              str(folder / "model.safetensors"))
    b.add("tensor-dropped-layer-weights-absent", folder, "ok",
          argv=ppl_argv(folder, b.text) + ["--drop-mlp", "1"],
          check=lambda out: out.startswith("perplexity ") and "mlp=[1]" in out)
    b.add("tensor-dropped-layer-weights-present", b.pristine, "ok",
          argv=ppl_argv(b.pristine, b.text) + ["--drop-attn", "0"],
          check=lambda out: out.startswith("perplexity ") and "attn=[0]" in out)


def _index_cases(b: _Builder) -> None:
    tensors = tiny_tensors()
    b.tensor_case("index-pristine", tensors, "ok", shards=3)
    index_name = "model.safetensors.index.json"

    def index_case(name, change, expect="error", mentions=(index_name,)):
        folder = write_folder(b.root / name, None, tensors, shards=3)
        index = json.loads((folder / index_name).read_text())
        result = change(folder, index)
        (folder / index_name).write_text(result if isinstance(result, str) else json.dumps(result))
        b.add(name, folder, expect, mentions)

    index_case("index-is-list", lambda f, i: [i])
    index_case("index-not-json", lambda f, i: "{weight_map:")
    index_case("index-no-weight-map", lambda f, i: {"metadata": {}})
    index_case("index-weight-map-list", lambda f, i: {"weight_map": list(i["weight_map"].items())})
    index_case("index-shard-not-string", lambda f, i: {"weight_map": {**i["weight_map"], "lm_head.weight": 3}})
    index_case("index-shard-path-escape", lambda f, i: {"weight_map": {**i["weight_map"],
                                                                        "lm_head.weight": "../pristine/x"}})
    index_case("index-missing-shard", lambda f, i: {"weight_map": {**i["weight_map"],
                                                                    "lm_head.weight": "model-9.safetensors"}})
    first = next(iter(sorted(tensors)))
    index_case("index-omits-a-tensor", lambda f, i: {"weight_map": {k: v for k, v in i["weight_map"].items()
                                                                    if k != first}}, mentions=(first,))

    def wrong_shard(f, i):
        names = sorted(tensors)
        return {"weight_map": {**i["weight_map"], names[0]: i["weight_map"][names[1]]}}

    index_case("index-names-wrong-shard", wrong_shard, mentions=(sorted(tensors)[0],))

    def lists_absent(f, i):
        return {"weight_map": {**i["weight_map"], "model.layers.0.mlp.up_proj.bias": i["weight_map"][first]}}

    index_case("index-lists-absent-tensor", lists_absent, mentions=("model.layers.0.mlp.up_proj.bias",))

    both = write_folder(b.root / "index-and-single-file", None, tensors, shards=3)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(both / "model.safetensors"))
    b.add("index-and-single-file", both, "error", ("model.safetensors", index_name))


def _json_cases(b: _Builder) -> None:
    for file in ("config.json", "generation_config.json", "tokenizer_config.json"):
        for label, text in {"list": "[{}]", "string": '"x"', "number": "3", "invalid": "{", "empty": "",
                            "null": "null", "binary": "\udcff"}.items():
            folder = b.folder(f"json-{file}-{label}")
            (folder / file).write_bytes(text.encode("utf-8", "surrogateescape"))
            b.add(f"json-{file}-{label}", folder, "error", (file,))
    folder = b.folder("json-config-missing")
    (folder / "config.json").unlink()
    b.add("json-config-missing", folder, "error", ("config.json",))
    folder = b.folder("json-config-is-directory")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    b.add("json-config-is-directory", folder, "error", ("config.json",))
    for label, value in {"string": "1", "float": 1.5, "negative": -1, "empty-list": []}.items():
        folder = b.folder(f"json-generation-eos-{label}")
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        b.add(f"json-generation-eos-{label}", folder, "error", ("generation_config.json", "eos_token_id"))
    folder = b.folder("json-generation-eos-outside-vocab")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, VOCAB]}))
    b.add("json-generation-eos-outside-vocab", folder, "error", ("generation_config.json", "eos_token_id"))
    folder = b.folder("json-generation-extra-eos")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "do_sample": False}))
    b.add("json-generation-extra-eos", folder, "ok")
    for label, value in {"int": 5, "list": ["<s>"], "dict-without-content": {"text": "<s>"}}.items():
        folder = b.folder(f"json-tokenizer-bos-{label}")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": value}))
        b.add(f"json-tokenizer-bos-{label}", folder, "error", ("tokenizer_config.json", "bos_token"))
    folder = b.folder("json-tokenizer-added-token-dict")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "</s>"}}))
    b.add("json-tokenizer-added-token-dict", folder, "ok")


def _tokenizer_cases(b: _Builder) -> None:
    folder = b.folder("tokenizer-json-missing")
    (folder / "tokenizer.json").unlink()
    b.add("tokenizer-json-missing-text-needed", folder, "error", ("tokenizer.json", str(folder)))
    b.add("tokenizer-json-missing-generate", folder, "error", ("tokenizer.json",), argv=generate_argv(folder))
    for label, text in {"garbage": "not json", "wrong-shape": "[1, 2]", "empty-object": "{}"}.items():
        folder = b.folder(f"tokenizer-json-{label}")
        (folder / "tokenizer.json").write_text(text)
        b.add(f"tokenizer-json-{label}", folder, "error", ("tokenizer.json",))
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat_reference = same_as(generate_argv(b.pristine, "--chat"))

    def chat_case(name, expect, mentions=(), jinja=None, config_template=DELETE, check=None):
        folder = b.folder(name)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if config_template is DELETE:
            config.pop("chat_template")
        else:
            config["chat_template"] = config_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        if jinja is not None:
            (folder / "chat_template.jinja").write_text(jinja)
        b.add(name, folder, expect, mentions, argv=generate_argv(folder, "--chat"),
              check=check or (chat_reference if expect == "ok" else None))

    chat_case("template-in-jinja-file", "ok", jinja=template)
    chat_case("template-jinja-file-wins", "ok", jinja=template, config_template="{{ raise_exception('old') }}")
    chat_case("template-named-list-default", "ok", config_template=[{"name": "tool_use", "template": "x"},
                                                                    {"name": "default", "template": template}])
    chat_case("template-named-list-no-default", "error", ("chat_template", "default"),
              config_template=[{"name": "tool_use", "template": template}])
    chat_case("template-wrong-type", "error", ("chat_template",), config_template=5)
    chat_case("template-raise-exception", "error", ("roles must alternate",),
              config_template="{{ raise_exception('roles must alternate') }}")
    chat_case("template-strftime-now", "ok", config_template="{{ strftime_now('%Y') and '' }}" + template)
    chat_case("template-huge-loop", "error", ("chat template",),
              config_template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    chat_case("template-huge-string", "error", ("chat template",), config_template="{{ 'x' * 10**10 }}")
    chat_case("template-doubling", "error", ("chat template",),
              config_template="{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                              "{% endfor %}")
    chat_case("template-syntax-error", "error", ("chat template", "syntax"), config_template="{% for %}")
    chat_case("template-sandbox-escape", "error", ("chat template",),
              config_template="{{ ().__class__.__base__.__subclasses__() }}")
    chat_case("template-missing", "error", ("chat template",))
    chat_case("template-undefined-call", "error", ("chat template",), config_template="{{ no_such_function() }}")
    chat_case("template-recursion", "error", ("chat template",),
              config_template="{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
    chat_case("template-loop-controls", "ok", config_template="{% for i in range(3) %}{% break %}{% endfor %}"
                                                              + template)
    chat_case("template-generation-block", "ok", config_template=template.replace(
        "{{ m['content'] }}", "{% generation %}{{ m['content'] }}{% endgeneration %}"))
    chat_case("template-jinja-not-utf8", "error", ("chat_template.jinja",), jinja="x")
    (b.root / "template-jinja-not-utf8" / "chat_template.jinja").write_bytes(b"\xff\xfe{{")


def _gguf_cases(b: _Builder) -> None:
    import gguf

    pristine = write_gguf(b.root / "pristine.gguf")
    reference = same_as(ppl_argv(pristine, b.text))
    b.add("gguf-pristine-same-as-folder", pristine, "ok")  # the folder's reference: same weights, same tokens

    def gguf_case(name, expect, mentions, metadata=None, tensors=None, patch=None):
        path = write_gguf(b.root / f"{name}.gguf", metadata, tensors)
        if patch is not None:
            patch(path)
        b.add(name, path, expect, mentions, check=reference if expect == "ok" else None)

    head_count = "llama.attention.head_count"
    values = {
        "heads-zero": ({head_count: ("add_uint32", 0)}, head_count),
        "heads-not-dividing": ({head_count: ("add_uint32", 5), "llama.attention.head_count_kv": ("add_uint32", 5)},
                               head_count),
        "kv-heads-not-dividing": ({"llama.attention.head_count_kv": ("add_uint32", 3)}, "3"),
        "kv-heads-zero": ({"llama.attention.head_count_kv": ("add_uint32", 0)}, "head_count_kv"),
        "heads-as-string": ({head_count: ("add_string", "4")}, head_count),
        "heads-as-float": ({head_count: ("add_float32", 4.0)}, head_count),
        "heads-as-bool": ({head_count: ("add_bool", True)}, head_count),
        "blocks-absurd": ({"llama.block_count": ("add_uint64", 2**40)}, "llama.block_count"),
        "blocks-zero": ({"llama.block_count": ("add_uint32", 0)}, "llama.block_count"),
        "blocks-fewer": ({"llama.block_count": ("add_uint32", 1)}, "llama.block_count"),
        "blocks-more": ({"llama.block_count": ("add_uint32", 3)}, "llama.block_count"),
        "blocks-missing": ({"llama.block_count": None}, "llama.block_count"),
        "eps-negative": ({"llama.attention.layer_norm_rms_epsilon": ("add_float32", -1e-5)}, "epsilon"),
        "eps-zero": ({"llama.attention.layer_norm_rms_epsilon": ("add_float32", 0.0)}, "epsilon"),
        "eps-nan": ({"llama.attention.layer_norm_rms_epsilon": ("add_float32", float("nan"))}, "epsilon"),
        "freq-base-zero": ({"llama.rope.freq_base": ("add_float32", 0.0)}, "freq_base"),
        "freq-base-string": ({"llama.rope.freq_base": ("add_string", "10000")}, "freq_base"),
        "hidden-zero": ({"llama.embedding_length": ("add_uint32", 0)}, "embedding_length"),
        "hidden-wrong": ({"llama.embedding_length": ("add_uint32", 64)}, "embedding_length"),
        "ffn-wrong": ({"llama.feed_forward_length": ("add_uint32", 96)}, "ffn_gate"),
        "context-zero": ({"llama.context_length": ("add_uint32", 0)}, "context_length"),
        "context-negative": ({"llama.context_length": ("add_int32", -5)}, "context_length"),
        "vocab-mismatch": ({"llama.vocab_size": ("add_uint32", VOCAB + 1)}, "vocab"),
        "rope-dim-odd": ({"llama.rope.dimension_count": ("add_uint32", 7)}, "rotary"),
        "key-length-odd": ({"llama.attention.key_length": ("add_uint32", 7),
                            "llama.attention.value_length": ("add_uint32", 7),
                            "llama.rope.dimension_count": ("add_uint32", 7)}, "7"),
        "bos-outside-vocab": ({"tokenizer.ggml.bos_token_id": ("add_uint32", 10**6)}, "bos"),
        "bos-as-string": ({"tokenizer.ggml.bos_token_id": ("add_string", "0")}, "bos_token_id"),
        "add-bos-as-int": ({"tokenizer.ggml.add_bos_token": ("add_uint8", 1)}, "add_bos_token"),
    }
    for label, (metadata, mention) in values.items():
        gguf_case(f"gguf-{label}", "error", (mention,), metadata=metadata)
    tensors = tiny_tensors()
    gguf_case("gguf-tensor-missing", "error", ("blk.1.ffn_down.weight",),
              tensors={k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"})
    gguf_case("gguf-tensor-extra", "error", ("blk.0.attn_q.bias",),
              tensors={**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(HIDDEN)})
    gguf_case("gguf-tensor-wrong-shape", "error", ("blk.0.attn_v.weight",),
              tensors={**tensors, "model.layers.0.self_attn.v_proj.weight": torch.zeros(KV_HEADS * HEAD_DIM, 16)})
    gguf_case("gguf-tied-no-output", "ok", (), tensors={k: v for k, v in tensors.items() if k != "lm_head.weight"})
    b.cases[-1] = Case(b.cases[-1].name, b.cases[-1].argv, "ok", (), lambda out: out.startswith("perplexity "))

    def header(offset, fmt, value):
        return lambda path: patch_bytes(path, offset, fmt, value)

    for label, (patch, mention) in {
        "magic": (header(0, "<4s", b"GGUX"), "GGUF"),
        "version": (header(4, "<I", 99), "version"),
        "tensor-count-absurd": (header(8, "<Q", 2**62), "tensor_count"),
        "tensor-count-one-more": (header(8, "<Q", 3 + 9 * LAYERS + 1), "tensor_count"),
        "kv-count-absurd": (header(16, "<Q", 2**62), "kv_count"),
        "kv-count-one-more": (header(16, "<Q", len(GGUF_METADATA) + 6), "kv_count"),
        "kv-count-zero": (header(16, "<Q", 0), "general.architecture"),
    }.items():
        gguf_case(f"gguf-header-{label}", "error", (mention,), patch=patch)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        for label, count in {"absurd": 2**60, "one-more": VOCAB + 1, "fewer": VOCAB - 1}.items():
            gguf_case(f"gguf-array-{key.rsplit('.', 1)[1]}-{label}", "error", (key.rsplit(".", 1)[0],),
                      patch=lambda path, key=key, count=count: patch_bytes(path, array_length_offset(path, key),
                                                                          "<Q", count))
    for fraction in (0.001, 0.01, 0.2, 0.5, 0.9, 0.999):
        def truncate(path, fraction=fraction):
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * fraction)])
        gguf_case(f"gguf-truncated-{fraction}", "error", (".gguf",), patch=truncate)
    garbage = b.root / "gguf-garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    b.add("gguf-garbage", garbage, "error", ("gguf-garbage.gguf",))
    del gguf  # (imported only to fail early when the gguf package is absent)


def cases(workdir: Path) -> list[Case]:
    b = _Builder(Path(workdir))
    b.add("pristine-folder", b.pristine, "ok")
    b.add("pristine-generate", b.pristine, "ok", argv=generate_argv(b.pristine),
          check=lambda out: len(out.strip()) > 0)
    _config_field_cases(b)
    _rope_cases(b)
    _decilm_cases(b)
    _tensor_cases(b)
    _index_cases(b)
    _json_cases(b)
    _tokenizer_cases(b)
    _gguf_cases(b)
    return b.cases

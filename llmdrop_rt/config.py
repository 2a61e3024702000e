"""Model configuration and the drop plan: the two small values everything else is built from.

`ModelConfig` is parsed from a Hugging Face `config.json` (the families of `llmdrop_rt.families`: Llama, Mistral,
Qwen2, Qwen3, Gemma2). Every field we do not support is refused with a message naming it, so an unsupported
checkpoint never loads as a silently wrong model.

`DropPlan` says which attention and MLP modules exist. It is the only carrier of drop flags: the loader, the
model builder, the KV cache, the exporter and the scorer all take it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .families import FAMILIES, Family, family_of
from .validation import (
    BOOLEAN,
    OBJECT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    STRINGS,
    TOKEN_ID,
    TOKEN_IDS,
    FieldError,
    check_fields,
    check_in_vocabulary,
    expect_object,
)

SUPPORTED_ARCHITECTURES = {a: family.name for family in FAMILIES.values() for a in family.architectures}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# NVIDIA's DeciLM / nemotron-nas: a Llama stack whose config.json describes each layer in `block_configs`.
DECILM_ARCHITECTURE = "DeciLMForCausalLM"
DECILM_MODEL_TYPE = "nemotron-nas"
# DeciLM's FFN widths are multiples of this (vLLM's and llama.cpp's `_find_multiple(..., 256)`).
DECILM_FFN_MULTIPLE = 256


class ConfigError(FieldError):
    """A config.json (or a drop list) that we cannot honour."""


# What every config.json field we read may hold (see llmdrop_rt.validation); checked before anything is derived.
CONFIG_FIELDS = {
    "architectures": STRINGS.or_null(),
    "model_type": STRING.or_null(),
    "hidden_act": STRING.or_null(),  # (checked against the family: Family.activation_names)
    "hidden_activation": STRING.or_null(),  # Gemma2's spelling
    "pretraining_tp": POSITIVE_INT.or_null(),
    "vocab_size": POSITIVE_INT,
    "hidden_size": POSITIVE_INT,
    "intermediate_size": POSITIVE_INT.or_null(),  # null only in a DeciLM config, whose blocks give the width
    "num_hidden_layers": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_key_value_heads": POSITIVE_INT.or_null(),  # null: as many as attention heads
    "head_dim": POSITIVE_INT.or_null(),  # null: hidden_size / num_attention_heads
    "rms_norm_eps": POSITIVE_NUMBER,
    "max_position_embeddings": POSITIVE_INT,
    "rope_theta": POSITIVE_NUMBER,
    "rope_scaling": OBJECT.or_null(),
    "rope_parameters": OBJECT.or_null(),
    "partial_rotary_factor": POSITIVE_NUMBER.or_null(),
    "tie_word_embeddings": BOOLEAN,
    "attention_bias": BOOLEAN,
    "mlp_bias": BOOLEAN,
    "sliding_window": POSITIVE_INT.or_null(),
    "bos_token_id": TOKEN_ID.or_null(),
    "eos_token_id": TOKEN_IDS.or_null(),
    "torch_dtype": STRING.or_null(),
    "dtype": STRING.or_null(),
}
# rope_parameters (transformers>=5) / rope_scaling (older): the fields of the rope types we support.
ROPE_FIELDS = {
    "rope_theta": POSITIVE_NUMBER,
    "rope_type": STRING,
    "type": STRING,
    "factor": POSITIVE_NUMBER,
    "low_freq_factor": POSITIVE_NUMBER,
    "high_freq_factor": POSITIVE_NUMBER,
    "original_max_position_embeddings": POSITIVE_INT,
}
# DeciLM block_configs[i].attention / .ffn
BLOCK_FIELDS = {
    "attention": {"no_op": BOOLEAN, "replace_with_linear": BOOLEAN, "n_heads_in_group": POSITIVE_INT.or_null()},
    "ffn": {"no_op": BOOLEAN, "replace_with_linear": BOOLEAN, "ffn_mult": POSITIVE_NUMBER.or_null(),  # null: no-op
            "intermediate_size": POSITIVE_INT.or_null(), "hidden_act": STRING},
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inverse_frequencies(self, head_dim: int):
        """Per-pair rotation frequencies, computed in fp32 exactly as transformers' Llama does (so long-position
        angles agree to the last bit)."""
        import torch

        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a key of llmdrop_rt.families.FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    # DeciLM block_configs' no-op modules: (attention layers, MLP layers); None for a config without block_configs
    block_drops: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # Read by the family (Family.read_fields). sliding_layers: the layers sliding_window applies to, None for all.
    o_proj_bias: bool = False
    sliding_layers: tuple[int, ...] | None = None
    attention_scale: float | None = None  # the softmax scale; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        expect_object(cfg, source, ConfigError)
        check_fields(cfg, CONFIG_FIELDS, source, ConfigError)
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        is_decilm = DECILM_ARCHITECTURE in archs or (model_type == DECILM_MODEL_TYPE and not archs)
        family = family_of(archs, model_type)
        if family is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get(family.activation_field, family.activation_names[0])
        if act not in family.activation_names:
            raise ConfigError(f"{source}: {family.activation_field}={act!r} is not supported for {family.name} "
                              f"(only {' or '.join(map(repr, family.activation_names))})")
        try:
            family_fields = family.read_fields(cfg, int(need("num_hidden_layers")))
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)")

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        layers = need("num_hidden_layers")
        vocab = need("vocab_size")
        block_drops = None
        if is_decilm:
            kv_heads, intermediate, block_drops = _parse_block_configs(cfg, hidden, heads, source)
        else:
            kv_heads = cfg.get("num_key_value_heads") or heads
            intermediate = need("intermediate_size")
            POSITIVE_INT.check(intermediate, f"{source}: intermediate_size", ConfigError)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = cfg.get("head_dim") or family.default_head_dim
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: num_attention_heads={heads} does not divide hidden_size={hidden} "
                                  "(expected a divisor, or an explicit head_dim)")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")
        if cfg.get("partial_rotary_factor", 1.0) not in (1, None):
            raise ConfigError(f"{source}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported "
                              "(only 1.0)")

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        for name, ids in (("bos_token_id", [cfg.get("bos_token_id")]), ("eos_token_id", eos_ids)):
            check_in_vocabulary(ids, vocab, f"{source}: {name}", ConfigError)
        # Mistral's window covers every layer; the other families' fields name their sliding layers.
        sliding = cfg.get("sliding_window") if family.name == "mistral" else family_fields.pop("sliding_window", None)
        attention_bias = cfg.get("attention_bias", False) if family.qkv_bias is None else family.qkv_bias
        return cls(
            architecture=family.name,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope=_parse_rope(cfg, source),
            tie_word_embeddings=cfg.get("tie_word_embeddings", family.default_tied),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias if family.o_proj_bias is None else family.o_proj_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            block_drops=block_drops,
            **family_fields,
            raw=cfg,
        )

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention, None for full attention."""
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        return cls.from_dict(read_json(path), source=str(path))


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's FFN width for `ffn_mult` (vLLM's `_ffn_mult_to_intermediate_size`, llama.cpp's converter)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // DECILM_FFN_MULTIPLE) * DECILM_FFN_MULTIPLE


def _parse_block_configs(cfg: dict, hidden: int, heads: int, source: str):
    """(num_kv_heads, intermediate_size, (no-op attention layers, no-op MLP layers)) of a DeciLM config.

    Our model has one attention and one MLP shape for all layers, so every kept layer must agree on
    `n_heads_in_group` and on the FFN width its `ffn_mult` gives (and with num_key_value_heads / intermediate_size
    when those are set). A layer without attention is `no_op: true` (vLLM) or `n_heads_in_group: null` (llama.cpp's
    converter); either one drops it. Linear replacements are another kind of module, refused."""
    blocks = cfg.get("block_configs")
    layers = cfg.get("num_hidden_layers")
    if not isinstance(blocks, list) or len(blocks) != layers:
        got = f"{len(blocks)} entries" if isinstance(blocks, list) else repr(blocks)
        raise ConfigError(f"{source}: block_configs must be a list of one entry per layer "
                          f"(num_hidden_layers={layers}), got {got}")
    if "drop_attn_list" in cfg or "drop_mlp_list" in cfg:
        raise ConfigError(f"{source}: block_configs and drop_attn_list/drop_mlp_list both say what is dropped; "
                          "expected only one of them")
    kv_heads = cfg.get("num_key_value_heads")
    intermediate = cfg.get("intermediate_size")
    heads_source = "num_key_value_heads"
    width_source = "intermediate_size"
    no_attn, no_mlp = [], []
    for layer, block in enumerate(blocks):
        where = f"{source}: block_configs[{layer}]"
        attention, ffn = _block_part(block, "attention", where), _block_part(block, "ffn", where)
        for part_name, part in (("attention", attention), ("ffn", ffn)):
            if part.get("replace_with_linear"):
                raise ConfigError(f"{where}.{part_name}.replace_with_linear is true: linear replacements are not "
                                  "supported (expected false)")
        for windowed in ("window_length", "num_sink_tokens"):
            if attention.get(windowed) is not None:
                raise ConfigError(f"{where}.attention.{windowed} = {attention[windowed]!r}: windowed attention is "
                                  "not supported (expected null)")
        group = attention.get("n_heads_in_group")
        if attention.get("no_op") or group is None:
            no_attn.append(layer)
        else:
            if not isinstance(group, int) or isinstance(group, bool) or group < 1 or heads % group:
                raise ConfigError(f"{where}.attention.n_heads_in_group = {group!r}: expected a positive divisor of "
                                  f"num_attention_heads={heads}")
            if kv_heads is not None and heads // group != kv_heads:
                raise ConfigError(f"{where}.attention.n_heads_in_group = {group} gives {heads // group} KV heads, "
                                  f"{heads_source} gives {kv_heads}: per-layer attention shapes are not supported")
            kv_heads, heads_source = heads // group, f"block_configs[{layer}]"
        if ffn.get("no_op"):
            no_mlp.append(layer)
            continue
        if ffn.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}.ffn.hidden_act = {ffn['hidden_act']!r} is not supported (only 'silu')")
        # vLLM reads ffn_mult, else (newer configs) the width itself as ffn.intermediate_size
        if "ffn_mult" not in ffn and "intermediate_size" in ffn:
            field_name, width = "intermediate_size", ffn["intermediate_size"]
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ConfigError(f"{where}.ffn.intermediate_size = {width!r}: expected a positive integer")
        else:
            field_name, mult = "ffn_mult", ffn.get("ffn_mult")
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
                raise ConfigError(f"{where}.ffn.ffn_mult = {mult!r}: expected a positive number")
            width = ffn_mult_to_intermediate_size(mult, hidden)
        if intermediate is not None and width != intermediate:
            raise ConfigError(f"{where}.ffn.{field_name} = {ffn[field_name]} gives FFN width {width}, {width_source} "
                              f"gives {intermediate}: per-layer FFN widths are not supported")
        intermediate, width_source = width, f"block_configs[{layer}]"
    if intermediate is None:
        raise ConfigError(f"{source}: every block's ffn is a no-op and intermediate_size is missing")
    return int(kv_heads or heads), int(intermediate), (tuple(no_attn), tuple(no_mlp))


def _block_part(block, name: str, where: str) -> dict:
    part = block.get(name) if isinstance(block, dict) else None
    if not isinstance(part, dict):
        raise ConfigError(f"{where}.{name}: expected an object, got {part!r}")
    check_fields(part, BLOCK_FIELDS[name], f"{where}.{name}", ConfigError)
    return part


def _parse_rope(cfg: dict, source: str) -> RopeConfig:
    """Both spellings: transformers<5 `rope_theta` + `rope_scaling`, transformers>=5 `rope_parameters`."""
    spelling = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(spelling) or {}
    check_fields(params, ROPE_FIELDS, f"{source}: {spelling}", ConfigError)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise ConfigError(f"{source}: {spelling}: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(params["factor"]))
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    if high <= low:
        raise ConfigError(f"{source}: {spelling}: high_freq_factor = {high} must be greater than "
                          f"low_freq_factor = {low}")
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(low),
        high_freq_factor=float(high),
        original_max_position_embeddings=params.get("original_max_position_embeddings",
                                                    cfg.get("max_position_embeddings", 8192)),
    )


def read_json(path: Path) -> dict:
    """A JSON file that must hold one object (config.json, generation_config.json, tokenizer_config.json, ...)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return expect_object(value, str(path), ConfigError)


@dataclass(frozen=True)
class DropPlan:
    """Which attention and MLP modules are dropped (physically absent). Block drop = same index in both."""

    num_layers: int
    drop_attn: frozenset[int] = frozenset()
    drop_mlp: frozenset[int] = frozenset()

    @classmethod
    def create(cls, num_layers: int, drop_attn: Iterable | None = None, drop_mlp: Iterable | None = None,
               names: tuple[str, str] = ("drop_attn_list", "drop_mlp_list")) -> "DropPlan":
        """`names`: what errors call the two lists (config.json's fields, or the arguments that gave them)."""
        plan = cls(
            num_layers,
            frozenset(_parse_drop_list(drop_attn, num_layers, names[0])),
            frozenset(_parse_drop_list(drop_mlp, num_layers, names[1])),
        )
        if len(plan.drop_attn & plan.drop_mlp) == num_layers:
            raise ConfigError(f"every one of the {num_layers} layers is dropped (attention and MLP): "
                              "nothing would remain")
        return plan

    @classmethod
    def from_config(cls, cfg: ModelConfig, drop_attn=None, drop_mlp=None) -> "DropPlan":
        """The config's lists (LLM-Drop's `drop_attn_list`/`drop_mlp_list`, or DeciLM's no-op blocks), each
        overridden when given."""
        if cfg.block_drops is not None:
            attn, mlp = cfg.block_drops
        else:
            attn, mlp = cfg.raw.get("drop_attn_list"), cfg.raw.get("drop_mlp_list")
        return cls.create(cfg.num_layers, attn if drop_attn is None else drop_attn,
                          mlp if drop_mlp is None else drop_mlp,
                          ("drop_attn_list" if drop_attn is None else "drop_attn",
                           "drop_mlp_list" if drop_mlp is None else "drop_mlp"))

    def has_attn(self, layer: int) -> bool:
        return layer not in self.drop_attn

    def has_mlp(self, layer: int) -> bool:
        return layer not in self.drop_mlp

    @property
    def kept_attn_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.has_attn(i)]

    def to_config_lists(self) -> dict[str, list[int]]:
        return {"drop_attn_list": sorted(self.drop_attn), "drop_mlp_list": sorted(self.drop_mlp)}

    def __str__(self) -> str:
        return f"DropPlan(attn={sorted(self.drop_attn)}, mlp={sorted(self.drop_mlp)} of {self.num_layers} layers)"


def _parse_drop_list(value, num_layers: int, name: str) -> list[int]:
    """Indices, or LLM-Drop's boolean mask of length num_layers; anything else is refused by entry."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list of layer indices or a boolean mask, got {value!r}")
    items = list(value)
    if items and all(isinstance(v, bool) for v in items):
        if len(items) != num_layers:
            raise ConfigError(f"{name}: boolean mask has length {len(items)}, expected num_hidden_layers={num_layers}")
        return [i for i, dropped in enumerate(items) if dropped]
    seen = set()
    for pos, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name}[{pos}] = {v!r}: expected an integer layer index")
        if not 0 <= v < num_layers:
            raise ConfigError(f"{name}[{pos}] = {v}: out of range for {num_layers} layers (0..{num_layers - 1})")
        if v in seen:
            raise ConfigError(f"{name}[{pos}] = {v}: duplicate layer index")
        seen.add(v)
    return items

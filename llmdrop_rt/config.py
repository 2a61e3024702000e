"""Model configuration and the drop plan: the two small values everything else is built from.

`ModelConfig` is parsed from a Hugging Face `config.json` (Llama and Mistral families). Every field we do not
support is refused with a message naming it, so an unsupported checkpoint never loads as a silently wrong model.

`DropPlan` says which attention and MLP modules exist. It is the only carrier of drop flags: the loader, the
model builder, the KV cache, the exporter and the scorer all take it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json (or a drop list) that we cannot honour."""


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
    architecture: str  # "llama" or "mistral"
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
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            if model_type in ("llama", "mistral") and not archs:
                arch = model_type
            else:
                raise ConfigError(
                    f"{source}: unsupported architecture {archs or model_type!r}; "
                    f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
                )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = cfg.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = cfg.get("sliding_window") if arch == "mistral" else None
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=_parse_rope(cfg, source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=cfg,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        return cls.from_dict(read_json(path), source=str(path))


def _parse_rope(cfg: dict, source: str) -> RopeConfig:
    """Both spellings: transformers<5 `rope_theta` + `rope_scaling`, transformers>=5 `rope_parameters`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object, got {params!r}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        ),
    )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class DropPlan:
    """Which attention and MLP modules are dropped (physically absent). Block drop = same index in both."""

    num_layers: int
    drop_attn: frozenset[int] = frozenset()
    drop_mlp: frozenset[int] = frozenset()

    @classmethod
    def create(cls, num_layers: int, drop_attn: Iterable | None = None, drop_mlp: Iterable | None = None) -> "DropPlan":
        plan = cls(
            num_layers,
            frozenset(_parse_drop_list(drop_attn, num_layers, "drop_attn_list")),
            frozenset(_parse_drop_list(drop_mlp, num_layers, "drop_mlp_list")),
        )
        if len(plan.drop_attn & plan.drop_mlp) == num_layers:
            raise ConfigError(f"every one of the {num_layers} layers is dropped (attention and MLP): "
                              "nothing would remain")
        return plan

    @classmethod
    def from_config(cls, cfg: ModelConfig, drop_attn=None, drop_mlp=None) -> "DropPlan":
        """The config's lists (LLM-Drop's `drop_attn_list`/`drop_mlp_list`), each overridden when given."""
        return cls.create(
            cfg.num_layers,
            cfg.raw.get("drop_attn_list") if drop_attn is None else drop_attn,
            cfg.raw.get("drop_mlp_list") if drop_mlp is None else drop_mlp,
        )

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


def parse_layer_list(text: str | None) -> list[int] | None:
    """'1,3,5-7' -> [1, 3, 5, 6, 7]; None keeps config.json's list; '' means drop nothing."""
    if text is None:
        return None
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = part.split("-")
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise ConfigError(f"bad layer list entry {part!r}: expected N or N-M") from None
    return layers

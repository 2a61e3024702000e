"""The decoder families we build, each described once: tensor names, norms, activation, biases, embedding scale,
and the config.json fields only that family has.

Every family is a pre-norm decoder stack of the Llama kind (RoPE attention with GQA, a gated MLP, RMSNorm); what
differs is listed in its `Family`. The model builder, the exporters, the quantizer and the scorer read these
descriptions instead of testing the family by name. `ModelConfig.from_dict` picks the family from config.json's
`architectures` (or `model_type`) and lets it read its own fields (`Family.read_fields`), which come back as the
few `ModelConfig` attributes the model code uses (`sliding_layers`, `attention_scale`, soft-capping).

A layer's *attention unit* is its attention norm(s) + self_attn, its *MLP unit* the MLP norm(s) + mlp: dropping a
unit drops all of its parts (for Gemma2 the pre- and the post-norm around the module).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.architecture
    architectures: tuple[str, ...]  # config.json `architectures` entries
    model_types: tuple[str, ...]  # config.json `model_type` values (used when `architectures` is absent)
    # Norm tensors of a layer (relative to its prefix, without ".weight"): before and after each unit's module.
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE: self_attn.q_norm / self_attn.k_norm
    norm_offset: bool = False  # RMSNorm scales by (1 + w), computed in fp32 (Gemma)
    activation: str = "silu"  # the MLP is down(act(gate) * up); "silu" or "gelu_tanh"
    activation_field: str = "hidden_act"
    activation_names: tuple[str, ...] = ("silu",)  # config.json spellings of `activation`
    scales_embedding: bool = False  # embeddings times sqrt(hidden_size), in the model dtype
    qkv_bias: bool | None = None  # None: config.json's attention_bias (for o_proj too)
    o_proj_bias: bool | None = None
    default_head_dim: int | None = None  # None: hidden_size / num_attention_heads
    default_tied: bool = False  # tie_word_embeddings when config.json does not say
    # config.json -> extra ModelConfig fields; raises ValueError naming the field
    read_fields: Callable[[dict, int], dict] = field(default=lambda cfg, layers: {}, compare=False, repr=False)

    @property
    def unit_parts(self) -> dict[str, tuple[str, ...]]:
        """Layer-relative name prefixes of each unit's tensors."""
        attn = (self.attn_norm, self.attn_post_norm, "self_attn")
        mlp = (self.mlp_norm, self.mlp_post_norm, "mlp")
        return {"attn": tuple(p + "." for p in attn if p), "mlp": tuple(p + "." for p in mlp if p)}

    @property
    def llama_shaped(self) -> bool:
        """A plain Llama layer (one norm per unit, SwiGLU, no q/k norm): what the CPU decode kernel, the DeciLM
        format and the llama GGUF architecture express."""
        return (self.attn_post_norm is None and self.mlp_post_norm is None and not self.qk_norm and
                not self.norm_offset and self.activation == "silu" and not self.scales_embedding)


def _positive(cfg: dict, key: str, default=None, number=(int, float)):
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
        kind = "a positive integer" if number is int else "a positive number"
        raise ValueError(f"{key} = {value!r}: expected {kind} or null")
    return value


def _layer_types(cfg: dict, num_layers: int, default: list[str]) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"layer_types = {types!r}: expected a list of {num_layers} entries, each "
                         f"{FULL!r} or {SLIDING!r}")
    return types


def _sliding_fields(types: list[str], window) -> dict:
    sliding = tuple(i for i, t in enumerate(types) if t == SLIDING)
    if sliding and window is None:
        raise ValueError("layer_types has sliding layers but sliding_window is null: expected a window size")
    return {"sliding_window": window if sliding else None, "sliding_layers": sliding}


def _qwen_fields(cfg: dict, num_layers: int) -> dict:
    """Qwen2/Qwen3: `sliding_window` applies only with `use_sliding_window`, to the layers `layer_types` marks
    (without it, to layers from `max_window_layers` on, transformers' rule)."""
    use = cfg.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise ValueError(f"use_sliding_window = {use!r}: expected true or false")
    if not use:
        if SLIDING in (cfg.get("layer_types") or []):
            raise ValueError("layer_types has sliding layers but use_sliding_window is false")
        return {"sliding_window": None, "sliding_layers": ()}
    window = _positive(cfg, "sliding_window", number=int)
    first = _positive(cfg, "max_window_layers", 28, number=int)
    default = [SLIDING if i >= first else FULL for i in range(num_layers)]
    return _sliding_fields(_layer_types(cfg, num_layers, default), window)


def _gemma2_fields(cfg: dict, num_layers: int) -> dict:
    """Gemma2: attention scale from `query_pre_attn_scalar`, soft-capping of attention and final logits, and
    sliding-window layers (by default every even layer, transformers' rule)."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention = {cfg['use_bidirectional_attention']!r}: not supported "
                         "(expected false or null)")
    window = _positive(cfg, "sliding_window", 4096, number=int)
    default = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    return {**_sliding_fields(_layer_types(cfg, num_layers, default), window),
            "attention_scale": _positive(cfg, "query_pre_attn_scalar", 256) ** -0.5,
            "attn_logit_softcapping": _positive(cfg, "attn_logit_softcapping", 50.0),
            "final_logit_softcapping": _positive(cfg, "final_logit_softcapping", 30.0)}


LLAMA = Family("llama", ("LlamaForCausalLM", "DeciLMForCausalLM"), ("llama", "nemotron-nas"))
MISTRAL = Family("mistral", ("MistralForCausalLM",), ("mistral",))
QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), qkv_bias=True, o_proj_bias=False,
               read_fields=_qwen_fields)
QWEN3 = Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True, default_head_dim=128,
               read_fields=_qwen_fields)
GEMMA2 = Family("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), attn_post_norm="post_attention_layernorm",
                mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm", norm_offset=True,
                activation="gelu_tanh", activation_field="hidden_activation",
                activation_names=("gelu_pytorch_tanh",), scales_embedding=True, default_head_dim=256,
                default_tied=True, read_fields=_gemma2_fields)

FAMILIES = {family.name: family for family in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2)}


def family_of(architectures: list[str], model_type: str | None) -> Family | None:
    """The family of a config.json's `architectures` (or, without them, its `model_type`); None if unknown."""
    for family in FAMILIES.values():
        if any(a in family.architectures for a in architectures):
            return family
    if not architectures:
        return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    return None

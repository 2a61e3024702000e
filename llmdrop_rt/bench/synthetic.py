"""SYNTHETIC-weight models: random tensors of a real model's shapes, for speed and memory at any size.

Speed does not depend on weight values, so a Llama-2-13B-shaped model with random weights times like the real
one; its outputs are meaningless. Everything built here is labelled synthetic (`LLM.folder` is
`<synthetic NAME>`, `LLM.synthetic` is True) and has no tokenizer: use token ids.

    from llmdrop_rt.bench.synthetic import load_synthetic
    llm = load_synthetic("llama-2-13b", drop_attn=range(20, 40), dtype="bfloat16", device="cuda")
    llm.generate_ids([[1] * 2048], max_new_tokens=2048)

`CONFIGS` holds the shapes (config.json fields) of the models LLM-Drop reports, from their public config files.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import DropPlan, ModelConfig
from ..devices import resolve_device, resolve_dtype
from ..model.cache import resolve_kv_dtype
from ..model.standins import skip_attention

_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS: dict[str, dict] = {
    "mistral-7b": {**_LLAMA, "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                   "rope_theta": 10000.0, "sliding_window": 4096},
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                   "eos_token_id": 128001},
    "llama-3-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                    "eos_token_id": 128001},
    # The embedded default model's shape, so CPU runs can compare synthetic and real weights.
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2},
}


def model_config(name_or_dict: str | dict) -> ModelConfig:
    """A ModelConfig from a CONFIGS name or a config.json-style dict."""
    if isinstance(name_or_dict, dict):
        return ModelConfig.from_dict(name_or_dict, source="synthetic config")
    if name_or_dict not in CONFIGS:
        raise KeyError(f"no synthetic config named {name_or_dict!r}; known: {sorted(CONFIGS)}")
    return ModelConfig.from_dict(CONFIGS[name_or_dict], source=f"synthetic config {name_or_dict!r}")


class SyntheticReader:
    """Stands in for CheckpointReader: any weight name gets a fresh random tensor of the asked shape, made
    directly on the target device in the target dtype (no host copy). Norm weights are ~1, matrices ~N(0, 1/in),
    so activations keep a realistic scale (no overflow or denormals distorting timings)."""

    def __init__(self, dtype: torch.dtype, device, seed: int = 0):
        self.dtype, self.device = dtype, torch.device(device)
        # On the meta device (shapes only, e.g. to count parameters of a 70B model) nothing is drawn.
        self.generator = None if self.device.type == "meta" else torch.Generator(device=self.device).manual_seed(seed)
        self.bytes_read = 0  # nothing is read from disk; kept for interface parity

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if shape is None:
            raise ValueError(f"synthetic weight '{name}' needs an explicit shape")
        tensor = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.generator is None:
            return tensor
        if len(shape) == 1:
            return tensor.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=self.generator)
        return tensor.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=self.generator)


class NoTokenizer:
    """A synthetic model has no vocabulary text: only token ids go in and out."""

    eos_token_id = pad_token_id = bos_token = eos_token = pad_token = chat_template = None

    def token_id(self, token):
        return None

    def encode(self, text, add_special_tokens=True):
        raise ValueError("a synthetic-weight model has no tokenizer: pass token ids")

    def decode(self, ids, skip_special_tokens=True):
        raise ValueError("a synthetic-weight model has no tokenizer: its outputs are token ids")


def load_synthetic(name_or_config: str | dict, drop_attn=None, drop_mlp=None, dtype=None, device=None,
                   attn_backend: str | None = None, kernels: str | None = None, decode: str = "auto", seed: int = 0,
                   kv_cache: str = "auto"):
    """An `LLM` of the named shape with SYNTHETIC random weights (see module docstring); arguments as `load`."""
    from ..model import ModelBuilder, select_ops
    from ..model.attention import default_backend
    from ..runtime import LLM

    cfg = model_config(name_or_config)
    plan = DropPlan.from_config(cfg, drop_attn, drop_mlp)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = ModelBuilder(cfg, plan, SyntheticReader(torch_dtype, device, seed), torch_dtype, device,
                         select_ops(kernels, device)).build()
    model.kv_dtype = resolve_kv_dtype(kv_cache, torch_dtype)
    label = name_or_config if isinstance(name_or_config, str) else "custom"
    llm = LLM(Path(f"<synthetic {label}>"), cfg, plan, model, NoTokenizer(), attn_backend or default_backend(device),
              decode)
    llm.synthetic = True
    return llm


def transformers_synthetic(name_or_config: str | dict, skip_attn=(), dtype=torch.bfloat16, device="cpu",
                           seed: int = 0):
    """transformers' model of the same shape with SYNTHETIC random weights, built on the device, for the
    LLM-Drop-style baseline (attention of `skip_attn` layers skipped in the forward but still allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    model_type = "mistral" if "MistralForCausalLM" in raw.get("architectures", []) else "llama"
    config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in pname else 0.0, 0.02, generator=generator)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=generator)
    for i in skip_attn:
        skip_attention(model.model.layers[i])
    return model


"""Shared fixtures: tiny random checkpoints written by transformers itself (our independent reference).

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when a
kernel is decorated, so it is set here, before anything imports `kernels`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 300  # byte-level alphabet (256) + a few merges-free extras + specials


def write_tiny_tokenizer(folder: Path, vocab_size: int = VOCAB):
    """A byte-level BPE with no merges (every byte is a token) plus <s>, </s>; padded with unused tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
    }))


def randomize_(model, seed: int):
    """Weights of realistic scale (transformers' init gives near-zero logits, which would make tests weak)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def make_checkpoint(folder: Path, config, seed: int = 0, max_shard_size=None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tiny_tokenizer(folder)
    return folder


def llama2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                       bos_token_id=0, eos_token_id=1)


def llama3_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32})


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         sliding_window=7, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1)


def sharded_config():
    """Explicit head_dim != hidden/heads, linear rope scaling (rewritten below in the older spelling)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                       rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})


TINY_MODELS = {"llama2": llama2_config, "llama3": llama3_config, "mistral": mistral_config, "sharded": sharded_config}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for seed, (name, make_config) in enumerate(TINY_MODELS.items()):
        folder = make_checkpoint(root / name, make_config(), seed=seed,
                                 max_shard_size="20KB" if name == "sharded" else None)
        folders[name] = folder
    # The sharded model also exercises the pre-transformers-5 spelling: rope_theta + rope_scaling{type}.
    cfg_path = folders["sharded"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": params["factor"]}
    cfg_path.write_text(json.dumps(cfg))
    return folders


@pytest.fixture(params=list(TINY_MODELS))
def tiny(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


def hf_model(folder: Path, drop_attn=(), drop_mlp=()):
    """transformers' own model on the same folder, with dropped modules replaced by zero deltas in the residual
    stream (identity sub-blocks): an independent reference for our physically-dropped model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

    class ZeroAttention(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states), None

    class ZeroMLP(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    for i in drop_attn:
        model.model.layers[i].self_attn = ZeroAttention()
    for i in drop_mlp:
        model.model.layers[i].mlp = ZeroMLP()
    return model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted once into the user cache (as `make bench` does)."""
    from llmdrop_rt.gguf_import import default_model_path

    return default_model_path()

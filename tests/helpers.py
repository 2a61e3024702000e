"""Helpers the tests share: tiny random checkpoints written by transformers itself (our independent reference) and
transformers' model of a folder with modules dropped."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"  # committed texts (see data/README.md)
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
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
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


def qwen2_config():
    """Qwen2.5's small-model shape: q/k/v biases (no o_proj bias), tied embeddings, MQA."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=4,
                       num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def qwen2_sliding_config():
    """use_sliding_window: layers from max_window_layers on attend within a window of 5."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=36, intermediate_size=44, num_hidden_layers=4,
                       num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
                       max_window_layers=2, bos_token_id=0, eos_token_id=1)


def qwen3_config():
    """Per-head q/k RMSNorm, explicit head_dim != hidden / heads."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, hidden_size=44, intermediate_size=68, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=14, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def gemma2_config():
    """Small soft-caps and window so that every Gemma2 feature changes the output."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=VOCAB, hidden_size=44, intermediate_size=60, num_hidden_layers=5,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20,
                        max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6,
                        attn_logit_softcapping=3.0, final_logit_softcapping=4.0, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)


# The other families (llmdrop_rt.families), as separate fixtures: tests that hold for every family use them.
FAMILY_MODELS = {"qwen2": qwen2_config, "qwen2_sliding": qwen2_sliding_config, "qwen3": qwen3_config,
                 "gemma2": gemma2_config}


def hf_model(folder: Path, drop_attn=(), drop_mlp=()):
    """transformers' own model on the same folder, with dropped modules replaced by zero deltas in the residual
    stream (identity sub-blocks): an independent reference for our physically-dropped model."""
    from transformers import AutoModelForCausalLM

    from llmdrop_rt.model.standins import drop_in_transformers

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    drop_in_transformers(model.model, drop_attn, drop_mlp, replace_norms=False)
    return model


def hf_greedy(model, batch, new_tokens):
    """transformers' own batched greedy generate with left padding."""
    longest = max(len(p) for p in batch)
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in batch])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
    out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=1, eos_token_id=None)
    return out[:, longest:].tolist()


def folder_digest(folder: Path) -> str:
    """One hash of every file below a folder (names and bytes): equal before and after = nothing was written."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def step_logits(llm, prompts, new_tokens):
    """Greedy generation's ids and the logits of each of its forward steps, [steps, B, V]: step 0 is prefill's last
    position, then one per decode step (rows padded on the left), through the engine's own loop."""
    seen, original = [], llm.model.forward

    def recording_forward(*args, **kwargs):
        logits = original(*args, **kwargs)
        seen.append(logits[:, -1].clone())
        return logits

    llm.model.forward = recording_forward
    try:
        ids = llm.generate_ids(prompts, new_tokens)
    finally:
        del llm.model.forward  # the class's method again
    return ids, torch.stack(seen)

"""CPU weight formats (`load(weights=...)`) against transformers' own model holding the very same rounded weights,
and the embedded GGUF's blocks loading as stored."""
import pytest
import torch
from helpers import hf_model

import llmdrop_rt
from llmdrop_rt.model.builder import WEIGHT_FORMATS
from llmdrop_rt.quant import cpu_linear

# Relative error of the logits vs the reference on the same weights: the block kernels round activations per block
# (see csrc/cpu_gemv.h: to int16 for int8 weights, to int8 for int4 ones, as llama.cpp does for Q4_0, which moves
# each matrix product by ~0.5 % and the logits by 2-3 %), the 16-bit ones accumulate in another order than torch.
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 1e-5, "int8": 1e-2, "int4": 5e-2}


def rounded_reference(folder, weights: str, drop_attn=(), drop_mlp=()):
    """transformers' model with every matrix replaced by its value in our stored format (exact in float64)."""
    model = hf_model(folder, drop_attn, drop_mlp)
    projection_fmt, table_fmt = WEIGHT_FORMATS[weights]
    rounded = set()  # a tied table is one parameter: round it once
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and id(module.weight) not in rounded:
                rounded.add(id(module.weight))
                fmt = table_fmt if name in ("model.embed_tokens", "lm_head") else projection_fmt
                stored = cpu_linear.quantize(module.weight, fmt)
                module.weight.copy_(cpu_linear.dequantize(stored, fmt).float())
    return model


@pytest.mark.parametrize("weights", sorted(WEIGHT_FORMATS))
@pytest.mark.parametrize("drop_attn, drop_mlp", [((), ()), ((1, 4), (2,))])
def test_logits_equal_transformers_on_the_same_rounded_weights(tiny_checkpoints, weights, drop_attn, drop_mlp):
    folder = tiny_checkpoints["llama3"]  # widths that are multiples of the 32-column blocks
    tokens = torch.randint(2, 300, (2, 11), generator=torch.Generator().manual_seed(hash(weights) % 1000))
    llm = llmdrop_rt.load(folder, drop_attn=list(drop_attn), drop_mlp=list(drop_mlp), weights=weights)
    assert all(isinstance(m, cpu_linear.CpuLinear) for m in (llm.model.lm_head, llm.model.layers[0].mlp.down))
    with torch.inference_mode():
        reference = rounded_reference(folder, weights, drop_attn, drop_mlp)(tokens).logits
        ours = llm.logits(tokens)
    error = ((ours - reference).norm() / reference.norm()).item()
    assert error < TOLERANCE[weights], error
    # Decoding through the cache (one GEMV row per step) agrees with the batched prefill pass.
    prompt = tokens[0, :5].tolist()
    generated = llm.generate_ids([prompt], 4)[0]
    step_by_step = llm.logits([prompt + generated[:-1]])[0, len(prompt) - 1:].argmax(-1).tolist()
    assert generated == step_by_step


def test_formats_store_fewer_bytes_and_tied_tables_once(tiny_checkpoints):
    folder = tiny_checkpoints["llama3"]
    sizes = {w: llmdrop_rt.load(folder, weights=w).param_bytes() for w in ("fp32", "fp16", "int8", "int4")}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    llm = llmdrop_rt.load(folder, weights="int8")
    assert llm.model.lm_head.weight is llm.model.embed.weight  # tied: one stored table


def test_refusals_name_the_argument(tiny_checkpoints):
    with pytest.raises(ValueError, match="weights='int3'"):
        llmdrop_rt.load(tiny_checkpoints["llama3"], weights="int3")
    with pytest.raises(ValueError, match="dtype"):
        llmdrop_rt.load(tiny_checkpoints["llama3"], weights="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="in % 32"):  # hidden 48: not a whole number of blocks
        llmdrop_rt.load(tiny_checkpoints["llama2"], weights="int4")


def test_embedded_gguf_loads_its_blocks_as_stored(smollm2_dir):
    int4 = llmdrop_rt.load(weights="int4")
    qkv = int4.model.layers[0].attn.qkv
    assert qkv.fmt == "q4_1" and int4.model.embed.fmt == "q8_0"  # the shipped types, not requantized
    fp32 = llmdrop_rt.load(smollm2_dir)  # the same weights, dequantized once by the GGUF conversion
    dense_q = fp32.model.layers[0].attn.qkv.weight
    assert torch.equal(cpu_linear.dequantize(qkv.stored(), "q4_1", torch.float32), dense_q)
    tokens = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(3))
    ours, reference = int4.logits(tokens), fp32.logits(tokens)
    assert ((ours - reference).norm() / reference.norm()).item() < TOLERANCE["int4"]

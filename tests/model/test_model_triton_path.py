"""The whole model with the Triton kernels on (interpreter on CPU, compiled on CUDA) equals the plain path."""
import pytest
import torch

import llmdrop_rt
from llmdrop_rt import kernels

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("name, drop_attn, drop_mlp",
                         [("llama3", [], []), ("mistral", [1], [2]), ("llama3", [0, 5], [5])])
def test_triton_model_matches_torch_path(tiny_checkpoints, name, drop_attn, drop_mlp):
    folder = tiny_checkpoints[name]
    tokens = torch.randint(2, 300, (2, 13), generator=torch.Generator().manual_seed(5))
    fused = llmdrop_rt.load(folder, drop_attn=drop_attn, drop_mlp=drop_mlp, kernels="triton")
    assert all(l.mlp.folded is not None for l in fused.model.layers if l.mlp is not None)
    fused_logits = fused.logits(tokens)
    plain = llmdrop_rt.load(folder, drop_attn=drop_attn, drop_mlp=drop_mlp, kernels="torch")
    assert all(l.mlp.folded is None for l in plain.model.layers if l.mlp is not None)
    torch.testing.assert_close(fused_logits, plain.logits(tokens), atol=1e-4, rtol=1e-4)
    # Incremental decode through the cache also runs on the kernels and agrees.
    prompt = tokens[0, :6].tolist()
    assert fused.generate_ids([prompt], 5) == plain.generate_ids([prompt], 5)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_triton_path_runs_the_other_families(family_checkpoints, name):
    """Qwen3 (q/k norms before the Triton RoPE) folds its SwiGLU norms; Gemma2 keeps its (1 + w) norms and GeGLU
    in torch, unfolded."""
    folder = family_checkpoints[name]
    tokens = torch.randint(2, 300, (2, 13), generator=torch.Generator().manual_seed(6))
    fused = llmdrop_rt.load(folder, drop_attn=[1], drop_mlp=[2], kernels="triton")
    plain = llmdrop_rt.load(folder, drop_attn=[1], drop_mlp=[2], kernels="torch")
    folded = [l.mlp.folded is not None for l in fused.model.layers if l.mlp is not None]
    assert all(folded) if name == "qwen3" else not any(folded)
    torch.testing.assert_close(fused.logits(tokens), plain.logits(tokens), atol=1e-4, rtol=1e-4)
    prompt = tokens[0, :6].tolist()
    assert fused.generate_ids([prompt], 5) == plain.generate_ids([prompt], 5)

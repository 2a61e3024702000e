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

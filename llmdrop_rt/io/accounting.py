"""Strict tensor accounting: every tensor of a checkpoint is used by the built model or belongs to a dropped module.

A config that describes fewer layers than the weights hold, or leaves out biases the checkpoint has, would
otherwise build a different model than the one stored, without a word. After a build, `check_all_used` compares
what the reader handed out with what the checkpoint holds and refuses the rest in one line, with the reason
(`load(..., strict=False)` skips the check).
"""
from __future__ import annotations

from ..config import DropPlan, ModelConfig
from ..model import hf_names
from .checkpoint import INDEX_FILE, CheckpointError

# Buffers some older checkpoints saved; the model computes them from the config.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
SHOWN = 3  # unexpected tensor names quoted in the error


def check_all_used(reader, cfg: ModelConfig, plan: DropPlan) -> None:
    """Raise CheckpointError when the checkpoint behind `reader` (after a build) holds a tensor that the model did
    not read and that is neither a dropped module's nor a derived buffer."""
    unread = [name for name in reader.names() if name not in reader.used and not _accounted_for(name, plan, cfg)]
    if hf_names.LM_HEAD in unread and cfg.tie_word_embeddings and _same_as_embedding(reader):
        unread.remove(hf_names.LM_HEAD)  # a tied checkpoint that also stores the (identical) head
    unindexed = {name: shard for name, shard in (reader.unindexed() if hasattr(reader, "unindexed") else {}).items()
                 if not _accounted_for(name, plan, cfg)}
    if not unread and not unindexed:
        return
    source = getattr(reader, "folder", None) or getattr(reader, "path", "checkpoint")
    if unindexed:
        names = sorted(unindexed)
        reason = f"stored in {unindexed[names[0]]} but not listed there by {INDEX_FILE}"
    else:
        names = sorted(unread, key=_layer_order)
        reason = _reason(names, reader, cfg)
    shown = ", ".join(f"'{n}'" for n in names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN
                                                           else "")
    raise CheckpointError(f"{source}: {len(names)} checkpoint tensor(s) not used by the model: {shown} ({reason}); "
                          "load(..., strict=False) ignores them")


def _accounted_for(name: str, plan: DropPlan, cfg: ModelConfig) -> bool:
    if name.endswith(DERIVED_SUFFIXES):
        return True
    in_layer = hf_names.split_layer_name(name)
    if in_layer is None:
        return False
    layer, rest = in_layer
    if layer >= plan.num_layers:
        return False
    unit = hf_names.unit_of(rest, cfg.family)
    return (unit == "attn" and not plan.has_attn(layer)) or (unit == "mlp" and not plan.has_mlp(layer))


def _same_as_embedding(reader) -> bool:
    import torch

    head, embedding = reader.get(hf_names.LM_HEAD), reader.get(hf_names.EMBEDDING)
    return head.shape == embedding.shape and bool(torch.equal(head, embedding))


def _layer_order(name: str):
    in_layer = hf_names.split_layer_name(name)
    return (1, in_layer[0], in_layer[1]) if in_layer else (0, 0, name)


def _reason(names: list[str], reader, cfg: ModelConfig) -> str:
    """Why the first unexpected tensor is there, in the config's words."""
    layers = [split[0] for split in map(hf_names.split_layer_name, reader.names()) if split]
    first = names[0]
    in_layer = hf_names.split_layer_name(first)
    if first == hf_names.LM_HEAD and cfg.tie_word_embeddings:
        return (f"{hf_names.LM_HEAD} differs from {hf_names.EMBEDDING} but tie_word_embeddings is true; "
                "expected no lm_head, or tie_word_embeddings: false")
    if in_layer is None:
        return f"not a tensor of a {cfg.architecture} model"
    layer, rest = in_layer
    if layer >= cfg.num_layers:
        return (f"config has {cfg.num_layers} layers (num_hidden_layers) but the checkpoint has layers "
                f"0-{max(layers)}")
    unit = hf_names.unit_of(rest, cfg.family)
    if rest.endswith(".bias") and unit == "attn" and not cfg.attention_bias:
        return f"{rest.split('.')[-2]}.bias present but attention_bias is false"
    if rest.endswith(".bias") and unit == "mlp" and not cfg.mlp_bias:
        return f"{rest.split('.')[-2]}.bias present but mlp_bias is false"
    return f"not a tensor of a {cfg.architecture} decoder layer"

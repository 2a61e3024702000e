"""4-bit AWQ / GPTQ checkpoints: config parsing, exact unpacking and the pure-torch dequantizing reference.

Formats:

* AWQ "gemm" (AutoAWQ, GPTQModel's AWQ): ``qweight`` int32 [in, out/8] packed along the OUTPUT dim;
  nibble ``i`` (bits 4i..4i+3) of word ``c`` holds output column ``8c + AWQ_PACK_ORDER[i]``.
  ``qzeros`` int32 [in/g, out/8] packed the same way, ``scales`` fp16 [in/g, out]. Input column ``i``
  belongs to group ``i // g``.
* GPTQ: ``qweight`` int32 [in/8, out] packed along the INPUT dim, low nibble first; ``qzeros`` int32
  [ceil(in/g), out/8] packed along the output dim, low nibble first; ``scales`` [ceil(in/g), out];
  ``g_idx`` int32 [in], the group of each input column (not monotone with desc_act). The "gptq" (v1)
  checkpoint format stores zero - 1 in each nibble, "gptq_v2" the true zero.

Every format dequantizes as ``W[o, i] = (q[o, i] - zero[g_idx[i], o]) * scale[g_idx[i], o]``, so unpacking
produces one canonical `Int4Weights` and `dequantize_reference` is the single oracle every kernel is
tested against. `QuantLinear` (quant/linear.py) runs them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

# Nibble i of an AWQ word holds output column 8c + AWQ_PACK_ORDER[i]; AWQ_UNPACK_ORDER is its inverse
# (column 8c + j lives in nibble AWQ_UNPACK_ORDER[j]), i.e. (0, 4, 1, 5, 2, 6, 3, 7).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = tuple(sorted(range(8), key=AWQ_PACK_ORDER.__getitem__))
NIBBLES_PER_WORD = 8



# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """What a 4-bit checkpoint's tensors mean.

    method: "awq" or "gptq". checkpoint_format: "awq_gemm", "gptq" (v1, stored zero = zero - 1) or
    "gptq_v2" (stored zero = zero). group_size: input columns per scale/zero group, -1 = one group.
    zero_point: asymmetric (AWQ zero_point / GPTQ not sym); an AWQ checkpoint without zero points has
    no qzeros and is read with zero 8 (GPTQ always stores qzeros). desc_act: GPTQ act-order (g_idx not
    monotone). excluded: GPTQModel's negative ``dynamic`` rules ("-:REGEX"), matched from the start of a
    module name: those modules are not quantized (kept in float, or dropped: `quantize` writes one rule
    per dropped module).
    """

    method: str
    checkpoint_format: str
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    desc_act: bool = False
    excluded: tuple[str, ...] = ()

    def quantizes(self, module_name: str) -> bool:
        """False for a module a negative ``dynamic`` rule keeps out of quantization."""
        return not any(re.match(pattern, module_name) for pattern in self.excluded)

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer (-1 means the whole input dimension)."""
        return in_features if self.group_size == -1 else self.group_size

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero nibble to get the true zero."""
        return 1 if self.checkpoint_format == "gptq" else 0


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def parse_quant_config(config_dict: Mapping, folder: str | os.PathLike | None = None) -> QuantConfig | None:
    """Read the quantization settings of a checkpoint, or None when it is not quantized.

    Sources: ``config_dict["quantization_config"]`` (config.json) and ``folder/quantize_config.json``
    (AutoGPTQ / GPTQModel). When both exist, config.json wins and the two must agree on the keys
    that change the meaning of the tensors. Only 4-bit AWQ "gemm" and 4-bit GPTQ (v1 / v2) are
    accepted; anything else raises ValueError naming the field and value.
    """
    from_config = config_dict.get("quantization_config") if config_dict else None
    if from_config is not None and not isinstance(from_config, Mapping):
        raise ValueError(f"config.json quantization_config: expected an object, got {type(from_config).__name__}")
    side_path = Path(folder) / "quantize_config.json" if folder is not None else None
    from_side = _read_json(side_path) if side_path is not None and side_path.is_file() else None
    if from_config is None and from_side is None:
        return None

    merged: dict = {}
    if from_side is not None:
        merged.update(from_side)
        merged.setdefault("quant_method", "gptq")  # AutoGPTQ's quantize_config.json has no quant_method
    if from_config is not None:
        if from_side is not None:
            for key in ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "zero_point"):
                if key in from_config and key in from_side and from_config[key] != from_side[key]:
                    raise ValueError(
                        f"quantization settings disagree on {key!r}: config.json has {from_config[key]!r}, "
                        f"quantize_config.json has {from_side[key]!r}"
                    )
        merged.update(from_config)

    method = str(merged.get("quant_method", "")).lower()
    if method == "awq":
        return _parse_awq(merged)
    if method == "gptq":
        return _parse_gptq(merged)
    raise ValueError(
        f"quantization_config.quant_method={merged.get('quant_method')!r} is not supported "
        "(supported: 'awq' with version 'gemm', 'gptq')"
    )


def _require_bits(cfg: Mapping, *names: str) -> int:
    for name in names:
        if name in cfg:
            if cfg[name] != 4:
                raise ValueError(f"quantization_config.{name}={cfg[name]!r} is not supported (only 4-bit)")
            return 4
    raise ValueError(f"quantization_config has no bit width (expected one of {names})")


def _parse_group_size(cfg: Mapping, *names: str) -> int:
    for name in names:
        if name in cfg:
            value = cfg[name]
            if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value > 0):
                raise ValueError(f"quantization_config.{name}={value!r}: expected a positive integer or -1")
            if value != -1 and value % NIBBLES_PER_WORD != 0:
                raise ValueError(f"quantization_config.{name}={value!r}: must be a multiple of 8 or -1")
            return value
    raise ValueError(f"quantization_config has no group size (expected one of {names})")


def _parse_awq(cfg: Mapping) -> QuantConfig:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(
            f"quantization_config.version={cfg.get('version')!r} is not supported for AWQ (only 'gemm'; "
            "'gemv', 'gemv_fast', 'exllama', 'marlin', 'ipex' use other packings)"
        )
    bits = _require_bits(cfg, "bits", "w_bit")
    group_size = _parse_group_size(cfg, "group_size", "q_group_size")
    zero_point = cfg.get("zero_point", True)
    if not isinstance(zero_point, bool):
        raise ValueError(f"quantization_config.zero_point={zero_point!r}: expected true or false")
    return QuantConfig("awq", "awq_gemm", bits, group_size, zero_point, desc_act=False,
                       excluded=_parse_exclusions(cfg))


def _parse_gptq(cfg: Mapping) -> QuantConfig:
    if cfg.get("is_marlin_format"):
        raise ValueError("quantization_config.is_marlin_format=True is not supported (Marlin repacked weights)")
    fmt_key = "checkpoint_format" if "checkpoint_format" in cfg else "format"
    fmt = str(cfg.get(fmt_key, "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"quantization_config.{fmt_key}={cfg.get(fmt_key)!r} is not supported (only 'gptq' and 'gptq_v2')"
        )
    pack_dtype = str(cfg.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise ValueError(f"quantization_config.pack_dtype={cfg.get('pack_dtype')!r} is not supported (only int32)")
    bits = _require_bits(cfg, "bits")
    group_size = _parse_group_size(cfg, "group_size")
    sym = cfg.get("sym", True)
    desc_act = cfg.get("desc_act", False)
    for name, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise ValueError(f"quantization_config.{name}={value!r}: expected true or false")
    return QuantConfig("gptq", fmt, bits, group_size, zero_point=not sym, desc_act=desc_act,
                       excluded=_parse_exclusions(cfg))


def _parse_exclusions(cfg: Mapping) -> tuple[str, ...]:
    """GPTQModel's ``dynamic``: only its negative rules ("-:REGEX": do not quantize) are supported; a positive
    rule changes bits/group size per module, which would be read with the wrong settings."""
    dynamic = cfg.get("dynamic") or {}
    if not isinstance(dynamic, Mapping):
        raise ValueError(f"quantization_config.dynamic: expected an object, got {type(dynamic).__name__}")
    excluded = []
    for rule in dynamic:
        if not rule.startswith("-:"):
            raise ValueError(f"quantization_config.dynamic rule {rule!r} is not supported: only exclusions "
                             "('-:REGEX', module not quantized) are, not per-module overrides")
        try:
            re.compile(rule[2:])
        except re.error as e:
            raise ValueError(f"quantization_config.dynamic rule {rule!r}: bad regular expression ({e})") from None
        excluded.append(rule[2:])
    return tuple(excluded)


# --------------------------------------------------------------------------------------------------
# Unpacking: packed checkpoint tensors -> canonical Int4Weights
# --------------------------------------------------------------------------------------------------
@dataclass
class Int4Weights:
    """Unpacked 4-bit weights in one canonical form, whatever the checkpoint format.

    qvalues: uint8 [out, in], each in 0..15. zeros: int16 [groups, out], true zeros (a v1 GPTQ
    nibble of 15 means 16). scales: [groups, out] in the checkpoint dtype. g_idx: int64 [in], the
    group of each input column.
    """

    qvalues: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.qvalues.shape[0]

    @property
    def in_features(self) -> int:
        return self.qvalues.shape[1]


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into 8 nibbles, low bits first, laid out consecutively along `dim` (uint8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [..., 8] (>> is arithmetic; & fixes it)
    nibbles = nibbles.to(torch.uint8)
    dim = dim % packed.dim()
    # Put the 8 nibbles right after `dim` and merge them into it.
    nibbles = nibbles.movedim(-1, dim + 1)
    shape = list(packed.shape)
    shape[dim] *= NIBBLES_PER_WORD
    return nibbles.reshape(shape)


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `unpack_nibbles`: 8 consecutive values along `dim` (0..15) -> one int32, low bits first."""
    dim = dim % values.dim()
    if values.shape[dim] % NIBBLES_PER_WORD:
        raise ValueError(f"pack_nibbles: size {values.shape[dim]} along dim {dim} is not a multiple of 8")
    shape = list(values.shape)
    shape[dim] //= NIBBLES_PER_WORD
    shape.insert(dim + 1, NIBBLES_PER_WORD)
    grouped = values.to(torch.int64).reshape(shape).movedim(dim + 1, -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    words = (grouped << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_unorder(unpacked: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's interleave along the last dim: column 8c + j is nibble AWQ_UNPACK_ORDER[j] of word c."""
    cols = unpacked.shape[-1]
    order = torch.tensor(AWQ_UNPACK_ORDER, device=unpacked.device)
    index = (torch.arange(0, cols, NIBBLES_PER_WORD, device=unpacked.device).unsqueeze(1) + order).reshape(-1)
    return unpacked[..., index]


def unpack_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
                    group_size: int) -> Int4Weights:
    """AWQ "gemm" tensors -> Int4Weights. qzeros None means symmetric (zero 8). Shapes are not re-checked here."""
    in_features = qweight.shape[0]
    q_in_out = _awq_unorder(unpack_nibbles(qweight, dim=1))  # [in, out]
    if qzeros is None:
        zeros = torch.full(scales.shape, 8, dtype=torch.int16, device=scales.device)
    else:
        zeros = _awq_unorder(unpack_nibbles(qzeros, dim=1)).to(torch.int16)
    g = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features, device=qweight.device) // g
    return Int4Weights(q_in_out.t().contiguous(), zeros, scales, g_idx)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                group_size: int, zero_offset: int) -> Int4Weights:
    """GPTQ tensors -> Int4Weights. zero_offset is 1 for the v1 "gptq" format, 0 for "gptq_v2".

    Without g_idx, input column i belongs to group i // group_size.
    """
    in_features = qweight.shape[0] * NIBBLES_PER_WORD
    q_in_out = unpack_nibbles(qweight, dim=0)  # [in, out]
    zeros = unpack_nibbles(qzeros, dim=1).to(torch.int16) + zero_offset
    if g_idx is None:
        g = in_features if group_size == -1 else group_size
        g_idx = torch.arange(in_features, device=qweight.device) // g
    return Int4Weights(q_in_out.t().contiguous(), zeros, scales, g_idx.to(torch.int64))


def dequantize_reference(weights: Int4Weights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [out, in] = (q - zero[g_idx]) * scale[g_idx], computed in float32 (exact for fp16 scales), then cast."""
    zeros = weights.zeros.t()[:, weights.g_idx].to(torch.float32)  # [out, in]
    scales = weights.scales.t()[:, weights.g_idx].to(torch.float32)
    return ((weights.qvalues.to(torch.float32) - zeros) * scales).to(dtype)

"""4-bit GPTQ and AWQ-gemm checkpoints of a (dropped) model, made by GPTQModel: `python -m llmdrop_rt quantize`.

GPTQModel (the maintained successor of AutoGPTQ; our optional extra `quantize`) quantizes transformers' model of the
checkpoint. Before it calibrates, every module the drop plan removes is swapped for a weightless stand-in
(`model.standins`: ZeroAttention / ZeroMLP, their norms Identity): the quantizer sees the dropped model as it
computes -- each kept layer is calibrated on the activations the dropped model really produces -- and finds nothing
to quantize where a module was dropped. The output keeps `drop_attn_list` / `drop_mlp_list`, and carries one
`dynamic` exclusion rule per dropped module ("-:model\\.layers\\.3\\.self_attn\\.") so that GPTQModel, reloading
it, does not look for quantized tensors that were never written (our loader reads the same rules, see
`QuantConfig.excluded`).

Reading the result: `llmdrop_rt.load(folder)`, or `load_in_gptqmodel(folder)` (GPTQModel's own model with the same
stand-ins: stock transformers cannot express a dropped module, so they are put back after loading).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import DropPlan, ModelConfig
from ..devices import DTYPES, resolve_device
from ..drop.calibration import CalibrationSet
from ..io.code_free import code_free_view
from ..io.export import SIDE_FILES, check_destination
from ..io.publish import staged_output
from ..model import hf_names
from ..model.standins import drop_in_transformers
from .formats import parse_quant_config

METHODS = ("gptq", "awq")
# GPTQModel's AWQ and torch kernels accept half precision only.
HALF_DTYPES = ("float16", "bfloat16")
INSTALL_HINT = ("GPTQModel is not installed. It declares torch>=2.14.1; beside another torch install its "
                "requirements with torch pinned, then the package without dependencies (see README, "
                "'Quantizing a model')")


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out as asked."""


def apply_drop_plan(hf_model: nn.Module, plan: DropPlan) -> nn.Module:
    """Replace, in place, the modules `plan` drops in a transformers model (any of our families) by weightless
    stand-ins."""
    if len(hf_model.model.layers) != plan.num_layers:
        raise QuantizeError(f"the drop plan is for {plan.num_layers} layers, "
                            f"the model has {len(hf_model.model.layers)}")
    drop_in_transformers(hf_model.model, sorted(plan.drop_attn), sorted(plan.drop_mlp))
    return hf_model


def exclusion_rules(plan: DropPlan) -> dict[str, dict]:
    """GPTQModel `dynamic` rules: do not quantize (nor expect tensors of) the dropped modules."""
    rules = {}
    for i in range(plan.num_layers):
        for unit, kept in (("attn", plan.has_attn(i)), ("mlp", plan.has_mlp(i))):
            if not kept:
                rules["-:" + hf_names.module_regex(i, unit)] = {}
    return rules


@contextlib.contextmanager
def working_directory(path):
    """contextlib.chdir, which needs Python 3.11."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def import_gptqmodel():
    # GPTQModel sizes its CPU worker pools from this; unset, it fails on 2-core machines (asks for 2 of 1 workers).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    try:
        import gptqmodel
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return gptqmodel


def quantize_config(method: str, group_size: int = 128, sym: bool | None = None, desc_act: bool = False,
                    plan: DropPlan | None = None):
    """GPTQModel's config for `method`: GPTQ (symmetric by default) or AWQ gemm (with zero points by default)."""
    from gptqmodel.quantization import AWQConfig, GPTQConfig

    dynamic = exclusion_rules(plan) if plan is not None else None
    if method == "gptq":
        return GPTQConfig(bits=4, group_size=group_size, desc_act=desc_act, sym=True if sym is None else sym,
                          dynamic=dynamic)
    return AWQConfig(bits=4, group_size=group_size, sym=False if sym is None else sym, dynamic=dynamic)


def quantize_model(source: str | Path, destination: str | Path, calibration: CalibrationSet, method: str = "gptq",
                   plan: DropPlan | None = None, group_size: int = 128, sym: bool | None = None,
                   desc_act: bool = False, dtype: str = "float16", device: str = "cpu", batch_size: int = 1,
                   overwrite: bool = False) -> Path:
    """Quantize the checkpoint at `source` with `plan` applied (default: its config's drop lists) into the new
    folder `destination`, calibrating on `calibration`'s token sequences. Written in a temporary sibling folder
    and renamed into place; the source is never written. Returns the destination."""
    source, destination = Path(source).resolve(), Path(destination).absolute()
    if method not in METHODS:
        raise QuantizeError(f"quantization method {method!r} is not one of {METHODS}")
    if method == "awq" and desc_act:
        raise QuantizeError("desc_act (act-order) is a GPTQ option; AWQ has none")
    if dtype not in HALF_DTYPES:
        raise QuantizeError(f"dtype {dtype!r}: GPTQModel quantizes in {list(HALF_DTYPES)} only")
    if group_size != -1 and (group_size < 8 or group_size % 8):
        raise QuantizeError(f"group_size={group_size}: expected -1 or a positive multiple of 8")
    resolve_device(device)  # an unknown device, or CUDA where there is none, is refused before any work
    cfg = ModelConfig.from_folder(source)
    if cfg.block_drops is not None:
        raise QuantizeError(f"{source} is a DeciLM folder: transformers builds its model only from the code shipped "
                            "in the folder, which we never run; quantize its source with --drop-attn/--drop-mlp")
    if parse_quant_config(cfg.raw, source) is not None:
        raise QuantizeError(f"{source} is already quantized (its config has a quantization_config)")
    if method == "awq" and group_size != -1:  # AWQ groups never straddle rows: each input width must divide
        widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_attention_heads * head_dim": cfg.num_heads * cfg.head_dim}
        for name, width in widths.items():
            if width % group_size:
                raise QuantizeError(f"AWQ group_size={group_size} does not divide {name}={width} of {source}; "
                                    "pick a divisor (e.g. 64 or 32) or use --method gptq")
    plan = plan if plan is not None else DropPlan.from_config(cfg)
    if plan.num_layers != cfg.num_layers:
        raise QuantizeError(f"the drop plan is for {plan.num_layers} layers, {source} has {cfg.num_layers}")
    check_destination(source, destination, overwrite)
    qconfig_args = dict(method=method, group_size=group_size, sym=sym, desc_act=desc_act)
    gptqmodel = import_gptqmodel()

    with staged_output(destination, overwrite, {"command": "quantize", "method": method}) as staging:
        # GPTQModel writes its logs to ./logs: keep them out of the user's working directory. It sees the source
        # through a view without the folder's code (see io.code_free).
        with (tempfile.TemporaryDirectory() as scratch, working_directory(scratch),
              code_free_view(source) as view):
            model = gptqmodel.GPTQModel.load(str(view), quantize_config(**qconfig_args, plan=plan),
                                             device=device, dtype=DTYPES[dtype])
            model.layer_modules_strict = False  # a dropped layer has no q/k/v/o (or gate/up/down) to find
            apply_drop_plan(model.model, plan)
            for key, value in plan.to_config_lists().items():  # saved with the model's config.json
                setattr(model.model.config, key, value)
            samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration.tokens]
            model.quantize(samples, batch_size=batch_size)
            model.save(str(staging))
        for name in SIDE_FILES:  # GPTQModel saves the tokenizer it loaded; anything else the source has, too
            if (source / name).is_file() and not (staging / name).exists():
                shutil.copyfile(source / name, staging / name)
    return destination


def load_in_gptqmodel(folder: str | Path, device: str = "cpu", dtype: str = "float16") -> nn.Module:
    """GPTQModel's model of a quantized (dropped) checkpoint, on its pure-torch kernels, with the config's dropped
    modules replaced by the same stand-ins as during quantization. Returns the transformers model."""
    gptqmodel = import_gptqmodel()
    folder = Path(folder)
    plan = DropPlan.from_config(ModelConfig.from_folder(folder))
    with code_free_view(folder) as view:
        model = gptqmodel.GPTQModel.load(str(view), device=device, backend=gptqmodel.BACKEND.TORCH,
                                         dtype=DTYPES[dtype])
    return apply_drop_plan(model.model, plan).eval()


@torch.no_grad()
def compare_with_gptqmodel(folder: str | Path, tokens: torch.Tensor) -> dict:
    """Logits of a quantized checkpoint from our runtime (fp32 activations) and from GPTQModel (fp16, its torch
    kernels) on the same token rows: max |difference|, the largest |logit| for scale, and how often the top-1
    token agrees."""
    from ..runtime import load

    ours = load(folder, dtype="float32", device="cpu").logits(tokens)
    theirs = load_in_gptqmodel(folder)(tokens).logits.float()
    return {
        "max_abs_diff": (ours - theirs).abs().max().item(),
        "max_abs_logit": theirs.abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "tokens": tokens.numel(),
    }

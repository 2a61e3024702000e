"""Argument helpers shared by the commands: layer lists, counts, the model and calibration options, and the
checks of input and output paths made before a command starts its work."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..arguments import ArgumentError, parse_layer_list
from ..drop.calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN
from ..model.builder import WEIGHT_FORMATS
from ..model.cache import KV_CACHE_DTYPES

# Attributes that name inputs of a command; no output may be one of them or lie inside one.
INPUT_ARGUMENTS = ("model", "calib", "text", "eval", "scores")


def layer_list(text: str) -> list[int]:
    """argparse type for '20,22,24-26' (see arguments.parse_layer_list)."""
    try:
        return parse_layer_list(text, "layer list")
    except ArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def add_model_arguments(parser: argparse.ArgumentParser, runtime: bool = True):
    """--model and the drop lists; with `runtime`, also our runtime's --dtype and --device."""
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drop-attn", type=layer_list, default=None, metavar="LAYERS",
                        help="attention layers to drop, e.g. '20,22,24-26' (default: config.json's drop_attn_list)")
    parser.add_argument("--drop-mlp", type=layer_list, default=None, metavar="LAYERS",
                        help="MLP layers to drop (default: config.json's drop_mlp_list)")
    if runtime:
        parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
        parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
        parser.add_argument("--weights", choices=["auto", *sorted(WEIGHT_FORMATS)], default="auto",
                            help="CPU weight format: our kernels on fp32/fp16/bf16 weights, int8 (q8_0 blocks) or int4 "
                                 "(q4_0; a GGUF's q4_0/q4_1 as stored) (default: fp32 kernels for an fp32 model on "
                                 "the CPU, torch modules in --dtype elsewhere)")
        parser.add_argument("--kv-cache", choices=["auto", *KV_CACHE_DTYPES], default="auto",
                            help="dtype of the KV cache (default: auto, the activations' dtype; fp16 halves what "
                                 "each decode step reads from it, as llama.cpp's default cache does)")
        parser.add_argument("--no-strict", dest="strict", action="store_false",
                            help="load even when the checkpoint holds tensors the config does not account for "
                                 "(default: refuse them, naming them)")


def load_from_args(args):
    from ..runtime import load

    return load(args.model, drop_attn=args.drop_attn, drop_mlp=args.drop_mlp, dtype=args.dtype, device=args.device,
                weights=args.weights, kv_cache=args.kv_cache, strict=args.strict)


def model_folder(args) -> Path:
    if args.model:
        return Path(args.model)
    from ..io.gguf_import import default_model_path

    return Path(default_model_path())


def start_plan(args, cfg):
    from ..config import DropPlan

    return DropPlan.from_config(cfg, args.drop_attn, args.drop_mlp)


def add_calibration_arguments(parser: argparse.ArgumentParser, required: bool = True,
                              n_samples: int = DEFAULT_N_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                              defaults_from: str = "LLM-Drop"):
    """The calibration-set options (`score`, `drop`, `sweep`, `quantize`); returns the argument group."""
    group = parser.add_argument_group("calibration data")
    group.add_argument("--calib", required=required, metavar="SOURCE",
                       help="a .txt file (one text), a .jsonl file (a 'text' field per line), a .parquet file, or a "
                            "Hugging Face dataset name (needs the optional `datasets` package and hub access)")
    group.add_argument("--calib-split", default="validation",
                       help="dataset split, for a dataset name (default: validation, as LLM-Drop's C4)")
    group.add_argument("--calib-config", help="dataset configuration name, e.g. 'en' for allenai/c4")
    group.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    group.add_argument("--n-samples", type=positive_int, default=n_samples,
                       help=f"calibration sequences (default: {n_samples}, as {defaults_from})")
    group.add_argument("--seq-len", type=positive_int, default=seq_len,
                       help=f"tokens per calibration sequence (default: {seq_len}, as {defaults_from})")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed choosing which sequences are used (default: 0); see --in-order")
    group.add_argument("--in-order", action="store_true",
                       help="take the first --n-samples sequences in text order (LLM-Drop's no-shuffle) instead")
    return group


def add_scoring_pass_arguments(group):
    group.add_argument("--batch-size", type=positive_int, default=8,
                       help="calibration sequences run together through a layer (default: 8)")
    group.add_argument("--in-memory", action="store_true",
                       help="build the whole model in memory instead of streaming one layer at a time from "
                            "safetensors (same scores, more memory)")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def make_source(args):
    from ..devices import resolve_device, resolve_dtype
    from ..drop.sources import InMemorySource, StreamingSource

    folder = model_folder(args)
    device = resolve_device(args.device or "cpu")
    dtype = resolve_dtype(args.dtype, device)
    cls = InMemorySource.from_folder if args.in_memory else StreamingSource
    return cls(folder, dtype, device)


def make_calibration(args, source):
    return calibration_from_args(args, source.folder, source.cfg)


def calibration_from_args(args, folder, cfg):
    from ..drop.calibration import load_calibration
    from ..io.tokenizer import Tokenizer

    return load_calibration(Tokenizer(folder), args.calib, args.n_samples, args.seq_len,
                            None if args.in_order else args.seed, cfg.max_position_embeddings,
                            args.calib_split, args.text_field, args.calib_config)


def add_selection_arguments(parser):
    group = parser.add_argument_group("selection")
    group.add_argument("--protect-first", type=non_negative_int, default=0, metavar="N",
                       help="never drop modules of the first N layers (default: 0)")
    group.add_argument("--protect-last", type=non_negative_int, default=0, metavar="N",
                       help="never drop modules of the last N layers (default: 0)")


def flag(attribute: str) -> str:
    return "--" + attribute.replace("_", "-")


def check_paths(args) -> None:
    """Before any work: every output the command will write (`args.outputs`: attribute -> "file" or "folder")
    can be written there, and none is an input or inside an input folder."""
    inputs = {name: Path(getattr(args, name)) for name in INPUT_ARGUMENTS
              if getattr(args, name, None) and Path(getattr(args, name)).exists()}
    for name, kind in getattr(args, "outputs", {}).items():
        if getattr(args, name, None):
            check_output_path(flag(name), Path(getattr(args, name)), kind, inputs)


def check_output_path(option: str, path: Path, kind: str, inputs: dict[str, Path]) -> None:
    resolved = path.resolve()
    for name, given in inputs.items():
        source = given.resolve()
        if resolved == source or (source.is_dir() and source in resolved.parents):
            where = "is" if resolved == source else "is inside"
            raise ArgumentError(f"{option} {path} {where} the input {flag(name)} {given}; refusing to write there")
    if kind == "file" and path.is_dir():
        raise ArgumentError(f"{option} {path} is a folder; give a file name")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArgumentError(f"{option} {path}: {ancestor} is a file, so nothing can be written under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArgumentError(f"{option} {path}: the folder {ancestor} is not writable")

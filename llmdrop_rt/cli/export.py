"""The `export` command: write a checkpoint with modules dropped as a new folder in one of the export formats, or
as a GGUF file for llama.cpp."""
from __future__ import annotations

from ..config import ModelConfig
from ..io.export import FORMAT_HELP, FORMATS, export_model
from .args import add_model_arguments, model_folder, start_plan

GGUF_HELP = "gguf: one GGUF file for llama.cpp (architecture llama, or deci for attention/MLP drops)"


def add_format_arguments(parser, flag: str):
    """--format/--export-format (folder formats and gguf) and --gguf-type, shared by `export` and `drop`."""
    parser.add_argument(flag, choices=[*FORMATS, "gguf"], default="auto",
                        help=f"{FORMAT_HELP}; {GGUF_HELP} (default: auto)")
    parser.add_argument("--gguf-type", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                        help="with the gguf format: how its matrices are stored (default: f32)")


def write_export(folder, out, plan, fmt: str, gguf_type: str, overwrite: bool):
    """The dropped model written at `out`: a checkpoint folder, or with fmt "gguf" a GGUF file."""
    if fmt == "gguf":
        from ..io.gguf_export import export_gguf

        return export_gguf(folder, out, plan, gguf_type, overwrite)
    return export_model(folder, out, plan, fmt, overwrite)


def cmd_export(args):
    folder = model_folder(args)
    plan = start_plan(args, ModelConfig.from_folder(folder))
    path = write_export(folder, args.out, plan, args.format, args.gguf_type, args.force)
    print(f"exported {plan} ({args.format}) -> {path}")


def add_commands(commands):
    export = commands.add_parser(
        "export", help="write the model with the given modules dropped as a new checkpoint folder or GGUF file",
        description="Apply --drop-attn / --drop-mlp (default: the model's own drop lists) and write the result as a "
                    "new checkpoint folder (or, --format gguf, a GGUF file); the source is never written.")
    add_model_arguments(export, runtime=False)
    add_format_arguments(export, "--format")
    export.add_argument("--out", required=True, metavar="PATH", help="the new checkpoint folder (or .gguf file)")
    export.add_argument("--force", action="store_true",
                        help="replace --out if it is an earlier output of ours (a folder with llmdrop_rt_output.json, "
                             "or a GGUF file); anything else is refused")
    export.set_defaults(func=cmd_export, outputs={"out": "folder"})

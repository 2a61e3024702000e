"""The `export` command: write a checkpoint with modules dropped as a new folder in one of the export formats."""
from __future__ import annotations

from ..config import ModelConfig
from ..io.export import FORMAT_HELP, FORMATS, export_model
from .args import add_model_arguments, model_folder, start_plan


def cmd_export(args):
    folder = model_folder(args)
    plan = start_plan(args, ModelConfig.from_folder(folder))
    path = export_model(folder, args.out, plan, args.format, args.force)
    print(f"exported {plan} ({args.format}) -> {path}")


def add_commands(commands):
    export = commands.add_parser(
        "export", help="write the model with the given modules dropped as a new checkpoint folder",
        description="Apply --drop-attn / --drop-mlp (default: the model's own drop lists) and write the result as a "
                    "new checkpoint folder; the source is never written.")
    add_model_arguments(export, runtime=False)
    export.add_argument("--format", choices=FORMATS, default="auto", help=f"{FORMAT_HELP} (default: auto)")
    export.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint folder")
    export.add_argument("--force", action="store_true", help="replace --out DIR if it exists (never the source)")
    export.set_defaults(func=cmd_export)

"""The `quantize` command: 4-bit GPTQ / AWQ checkpoints of a (dropped) model through GPTQModel."""
from __future__ import annotations

from .args import add_calibration_arguments, add_model_arguments, calibration_from_args, model_folder, positive_int


def cmd_quantize(args):
    from ..config import DropPlan, ModelConfig
    from ..quant.gptqmodel import compare_with_gptqmodel, quantize_model

    folder = model_folder(args)
    cfg = ModelConfig.from_folder(folder)
    plan = DropPlan.from_config(cfg, args.drop_attn, args.drop_mlp)
    calib = calibration_from_args(args, folder, cfg)
    sym = None if args.zero_point is None else args.zero_point == "sym"
    out = quantize_model(folder, args.out, calib, args.method, plan, args.group_size, sym, args.desc_act,
                         args.dtype, args.device, args.batch_size, args.force)
    print(f"{args.method} 4-bit g{args.group_size} of {folder} ({plan}) -> {out}")
    if args.verify:
        check = compare_with_gptqmodel(out, calib.tokens[:1])
        print(f"our runtime vs GPTQModel on {check['tokens']} calibration tokens: max |logit diff| "
              f"{check['max_abs_diff']:.4g} (largest |logit| {check['max_abs_logit']:.4g}), "
              f"top-1 agreement {check['top1_agreement']:.1%}")


def add_commands(commands):
    quantize = commands.add_parser(
        "quantize", help="4-bit GPTQ or AWQ-gemm checkpoint of a (dropped) model, made by GPTQModel",
        description="Quantize a model, with its drop plan applied, through GPTQModel (optional; see README). The "
                    "quantizer calibrates on the dropped model (dropped modules absent, not zeroed); the output "
                    "keeps drop_attn_list/drop_mlp_list and loads in llmdrop-rt and in GPTQModel.")
    add_model_arguments(quantize, runtime=False)
    quantize.add_argument("--method", choices=["gptq", "awq"], default="gptq",
                          help="gptq: GPTQ v1 checkpoint; awq: AWQ 'gemm' checkpoint (default: gptq)")
    quantize.add_argument("--group-size", type=int, default=128,
                          help="input columns per scale/zero, a multiple of 8, or -1 for one group (default: 128)")
    quantize.add_argument("--zero-point", choices=["sym", "asym"],
                          help="sym: no zero points; asym: a zero point per group (default: sym for gptq, asym "
                               "for awq, as their libraries)")
    quantize.add_argument("--desc-act", action="store_true", help="GPTQ act-order (columns by Hessian diagonal)")
    quantize.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                          help="precision the quantizer runs in and of the scales (default: float16)")
    quantize.add_argument("--device", default="cpu", help="where GPTQModel quantizes: cpu | cuda (default: cpu)")
    add_calibration_arguments(quantize, n_samples=128, seq_len=512, defaults_from="AutoAWQ")
    quantize.add_argument("--batch-size", type=positive_int, default=1,
                          help="calibration sequences per forward in GPTQModel (default: 1)")
    quantize.add_argument("--out", required=True, help="new checkpoint folder to write")
    quantize.add_argument("--force", action="store_true",
                          help="replace --out if it is an earlier output of ours (a folder with "
                               "llmdrop_rt_output.json); anything else is refused")
    quantize.add_argument("--verify", action="store_true",
                          help="afterwards, compare our runtime's logits with GPTQModel's on one calibration "
                               "sequence and print the agreement")
    quantize.set_defaults(func=cmd_quantize, outputs={"out": "folder"})

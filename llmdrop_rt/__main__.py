"""Command line: `python -m llmdrop_rt <command> --help`."""
from __future__ import annotations

import argparse
import sys


def parse_layer_list(text: str | None) -> list[int] | None:
    """'1,3,5-7' -> [1, 3, 5, 6, 7]; None keeps config.json's list; '' means drop nothing."""
    if text is None:
        return None
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = part.split("-")
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list entry {part!r}: expected N or N-M") from None
    return layers


def add_model_arguments(parser: argparse.ArgumentParser, runtime: bool = True):
    """--model and the drop lists; with `runtime`, also our runtime's --dtype and --device."""
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drop-attn", type=parse_layer_list, default=None, metavar="LAYERS",
                        help="attention layers to drop, e.g. '20,22,24-26' (default: config.json's drop_attn_list)")
    parser.add_argument("--drop-mlp", type=parse_layer_list, default=None, metavar="LAYERS",
                        help="MLP layers to drop (default: config.json's drop_mlp_list)")
    if runtime:
        parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
        parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")


def load_from_args(args):
    import llmdrop_rt

    return llmdrop_rt.load(args.model, drop_attn=args.drop_attn, drop_mlp=args.drop_mlp, dtype=args.dtype,
                           device=args.device)


def cmd_generate(args):
    llm = load_from_args(args)
    prompt = llm.chat_prompt(args.prompt) if args.chat else args.prompt
    for piece in llm.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop):
        print(piece, end="", flush=True)
    print()


def cmd_eval(args):
    """lm-eval tasks on our engine; the bulk lives in llmdrop_rt.lm_eval_adapter."""
    import json
    import os
    from pathlib import Path

    if args.offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .lm_eval_adapter import LLMDropLM, format_summary, run_tasks

    lm = LLMDropLM(llm=load_from_args(args), batch_size=args.batch_size, max_length=args.max_length)
    tasks = [t for t in (t.strip() for t in args.tasks.split(",")) if t]
    report = run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed)
    report["model"] = {"folder": str(lm.llm.folder), **lm.llm.plan.to_config_lists(), "dtype": str(lm.llm.dtype)}
    print(format_summary(report["summary"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmdrop_rt",
                                     description="llmdrop-rt: run Llama/Mistral models with dropped modules.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt (streamed to stdout)",
                              description="Generate a continuation of a prompt, streamed as it is produced.")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
    gen.add_argument("--seed", type=int, help="random seed for sampling")
    gen.add_argument("--stop", action="append", help="stop string (repeatable); the output is cut before it")
    gen.set_defaults(func=cmd_generate)

    ev = commands.add_parser("eval", help="score lm-eval tasks on a (dropped) model, write results JSON",
                             description="Run lm-eval tasks on our engine (model 'llmdrop_rt'). Defaults follow "
                                         "LLM-Drop: boolq/rte/openbookqa/piqa 0-shot, mmlu/winogrande/gsm8k 5, "
                                         "hellaswag 10, arc_challenge 25. Standard tasks need the Hugging Face "
                                         "hub for their data; llmdrop_mc and llmdrop_tempest run offline.")
    add_model_arguments(ev)
    ev.add_argument("--tasks", default="boolq,rte,openbookqa,piqa,mmlu,winogrande,gsm8k,hellaswag,arc_challenge",
                    help="comma-separated lm-eval task names (default: LLM-Drop's nine tasks)")
    ev.add_argument("--num-fewshot", type=int, default=None,
                    help="few-shot examples for every task (default: LLM-Drop's count per task, else the task's)")
    ev.add_argument("--limit", type=float, default=None,
                    help="documents per task (an integer) or a fraction of them (< 1) (default: all)")
    ev.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default: 8)")
    ev.add_argument("--max-length", type=int, default=None,
                    help="context window for scoring (default: the model's max_position_embeddings)")
    ev.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling (default: 1234)")
    ev.add_argument("--offline", action="store_true",
                    help="set HF_DATASETS_OFFLINE/HF_HUB_OFFLINE (for machines without the hub)")
    ev.add_argument("--out", default="eval/results.json", help="results JSON (default: eval/results.json)")
    ev.set_defaults(func=cmd_eval)

    from .scoring_cli import add_quantize_command, add_scoring_commands

    add_scoring_commands(commands, add_model_arguments)
    add_quantize_command(commands, add_model_arguments)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:  # our errors name the problem
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

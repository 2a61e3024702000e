"""The `eval` command: lm-eval tasks on a (dropped) model, results as JSON."""
from __future__ import annotations

import sys

from .args import add_model_arguments, load_from_args, non_negative_int, positive_int, positive_number


def cmd_eval(args):
    """lm-eval tasks on our engine; the bulk lives in llmdrop_rt.eval.lm_eval_adapter."""
    import os

    if args.offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..eval.lm_eval_adapter import LLMDropLM, format_summary, run_tasks
    from ..io.publish import write_json

    lm = LLMDropLM(llm=load_from_args(args), batch_size=args.batch_size, max_length=args.max_length)
    tasks = [t for t in (t.strip() for t in args.tasks.split(",")) if t]
    report = run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed)
    report["model"] = {"folder": str(lm.llm.folder), **lm.llm.plan.to_config_lists(), "dtype": str(lm.llm.dtype)}
    print(format_summary(report["summary"]))
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


def add_commands(commands):
    ev = commands.add_parser("eval", help="score lm-eval tasks on a (dropped) model, write results JSON",
                             description="Run lm-eval tasks on our engine (model 'llmdrop_rt'). Defaults follow "
                                         "LLM-Drop: boolq/rte/openbookqa/piqa 0-shot, mmlu/winogrande/gsm8k 5, "
                                         "hellaswag 10, arc_challenge 25. Standard tasks need the Hugging Face "
                                         "hub for their data; llmdrop_mc and llmdrop_tempest run offline.")
    add_model_arguments(ev)
    ev.add_argument("--tasks", default="boolq,rte,openbookqa,piqa,mmlu,winogrande,gsm8k,hellaswag,arc_challenge",
                    help="comma-separated lm-eval task names (default: LLM-Drop's nine tasks)")
    ev.add_argument("--num-fewshot", type=non_negative_int, default=None,
                    help="few-shot examples for every task (default: LLM-Drop's count per task, else the task's)")
    ev.add_argument("--limit", type=positive_number, default=None,
                    help="documents per task (an integer) or a fraction of them (< 1) (default: all)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="requests per forward pass (default: 8)")
    ev.add_argument("--max-length", type=positive_int, default=None,
                    help="context window for scoring (default: the model's max_position_embeddings)")
    ev.add_argument("--seed", type=non_negative_int, default=1234, help="seed for few-shot sampling (default: 1234)")
    ev.add_argument("--offline", action="store_true",
                    help="set HF_DATASETS_OFFLINE/HF_HUB_OFFLINE (for machines without the hub)")
    ev.add_argument("--out", default="eval/results.json", help="results JSON (default: eval/results.json)")
    ev.set_defaults(func=cmd_eval, outputs={"out": "file"})

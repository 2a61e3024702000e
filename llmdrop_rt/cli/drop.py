"""The drop method's commands: `score`, `drop`, `ppl` and `sweep`."""
from __future__ import annotations

from pathlib import Path

from ..config import read_json
from ..drop.metrics import METRIC_SOURCES, METRICS
from ..drop.selection import GRANULARITIES, MODES
from .args import (
    add_calibration_arguments,
    add_model_arguments,
    add_scoring_pass_arguments,
    add_selection_arguments,
    int_list,
    load_from_args,
    make_calibration,
    make_source,
    positive_int,
    start_plan,
)
from .export import add_format_arguments, write_export

METRIC_HELP = "; ".join(f"{name}: {text}" for name, text in METRIC_SOURCES.items() if name in METRICS)


def cmd_score(args):
    from ..drop.metrics import score_pass, scores_to_dict
    from ..drop.selection import loss_table
    from ..io.publish import write_json

    source = make_source(args)
    plan = start_plan(args, source.cfg)
    calib = make_calibration(args, source)
    table = score_pass(source, calib, plan, args.batch_size, not args.no_progress)
    if args.loss:
        losses = loss_table(source, calib, plan, args.loss, 0, 0, args.batch_size, not args.no_progress)
        table.importance["loss"] = losses.importance["loss"]
    data = scores_to_dict(table, source, calib)
    write_json(args.out, data)
    print(f"scored {source.cfg.num_layers} layers on {table.tokens} tokens in {table.seconds:.1f} s -> {args.out}")
    if args.plot:
        from ..drop.plots import plot_importance

        plot_importance(table.importance[args.plot_metric], args.plot,
                        title=f"{args.plot_metric} importance per layer")
        print(f"plot -> {args.plot}")


def cmd_drop(args):
    from ..drop.metrics import scores_to_dict, table_from_dict
    from ..drop.selection import plan_drops, select, with_dropped
    from ..io.publish import write_json

    source = make_source(args)
    plan = start_plan(args, source.cfg)
    if args.scores:
        if args.mode != "one-shot":
            raise ValueError("--scores gives one fixed ranking: it works with --mode one-shot only")
        data = read_json(Path(args.scores))
        try:
            table = table_from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{args.scores}: not a scores file written by `score` ({type(e).__name__}: {e})") from None
        if table.num_layers != source.cfg.num_layers:
            raise ValueError(f"{args.scores} scores {table.num_layers} layers, the model has {source.cfg.num_layers}")
        order = select(table, args.metric, args.granularity, args.num_drop, plan, args.protect_first,
                       args.protect_last, not args.no_residual)
        result = {"metric": args.metric, "granularity": args.granularity, "mode": "one-shot", "k": len(order),
                  "order": [list(m) for m in order], **with_dropped(plan, order).to_config_lists(),
                  "scores_file": str(args.scores)}
        new_plan = with_dropped(plan, order)
    else:
        if not args.calib:
            raise ValueError("give --calib (calibration data to score on) or --scores (a scores file from `score`)")
        calib = make_calibration(args, source)
        decision = plan_drops(source, calib, args.metric, args.granularity, args.num_drop, args.mode, plan,
                              args.protect_first, args.protect_last, not args.no_residual, args.batch_size,
                              not args.no_progress)
        result = {**decision.to_dict(), "calibration": calib.settings.to_dict(),
                  "scores": [scores_to_dict(t, source, calib)["importance"] for t in decision.tables]}
        new_plan = decision.plan
    print(f"drop {args.granularity} by {args.metric} ({args.mode}): {new_plan}")
    if args.out:
        write_json(args.out, result)
        print(f"plan -> {args.out}")
    if args.export:
        path = write_export(source.folder, args.export, new_plan, args.export_format, args.gguf_type, args.force)
        print(f"exported ({args.export_format}) -> {path}")


def cmd_ppl(args):
    from ..drop.perplexity import evaluate_perplexity, load_eval_tokens

    llm = load_from_args(args)
    tokens = load_eval_tokens(llm.tokenizer, args.text, args.split, args.text_field, args.dataset_config,
                              args.max_tokens)
    result = evaluate_perplexity(llm.model, tokens, args.seq_len, args.stride, args.batch_size,
                                 not args.no_progress, llm.engine.attn_backend)
    print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens "
          f"({result.windows} windows of {result.seq_len}, stride {result.stride}) {llm.plan}")
    if args.out:
        from ..io.publish import write_json

        write_json(args.out, {**result.to_dict(), **llm.plan.to_config_lists(), "text": str(args.text)})


def cmd_sweep(args):
    from ..drop.calibration import CalibrationSet
    from ..drop.perplexity import load_eval_tokens
    from ..drop.quality_sweep import Method, run_sweep
    from ..io.publish import write_json
    from ..io.tokenizer import Tokenizer

    source = make_source(args)
    calib = make_calibration(args, source)
    eval_tokens = load_eval_tokens(Tokenizer(source.folder), args.eval, "test", args.text_field, None,
                                   args.max_eval_tokens)
    loss_calib = None
    if args.loss_n_samples or args.loss_seq_len:
        n = min(args.loss_n_samples or calib.n_samples, calib.n_samples)
        loss_calib = CalibrationSet(calib.tokens[:n, : args.loss_seq_len], calib.valid[:n, : args.loss_seq_len],
                                    calib.settings)
    methods = [Method.parse(m) for m in args.methods.split(",")]
    results = run_sweep(source.folder, calib, eval_tokens, methods, args.ks, args.eval_seq_len, None, loss_calib,
                        args.protect_first, args.protect_last, args.batch_size, source.dtype, not args.no_progress,
                        start_plan(args, source.cfg))
    results["calibration"] = calib.settings.to_dict()
    results["eval"] = {"source": str(args.eval), "tokens": len(eval_tokens)}
    write_json(args.out, results)
    print(f"baseline perplexity {results['baseline']['perplexity']:.3f}")
    for label, method in results["methods"].items():
        ppls = ", ".join(f"k={p['k']}: {p['perplexity']:.2f}" for p in method["points"])
        print(f"{label:28s} scoring {method['scoring_seconds']:7.1f} s | {ppls}")
    if args.plot:
        from ..drop.plots import plot_sweep

        curves = {label: [(p["k"], p["perplexity"]) for p in m["points"]] for label, m in results["methods"].items()}
        plot_sweep(curves, args.plot, results["baseline"]["perplexity"], title="perplexity vs modules dropped")
        print(f"plot -> {args.plot}")


def add_commands(commands):
    score = commands.add_parser(
        "score", help="score every attention/MLP/block with the cosine, bi and angular metrics (JSON)",
        description="One layer-streaming pass over calibration data computing, for every kept module, "
                    f"the importance metrics. {METRIC_HELP}.")
    add_model_arguments(score)
    add_scoring_pass_arguments(add_calibration_arguments(score))
    score.add_argument("--loss", choices=GRANULARITIES,
                       help="also compute the SLEB loss metric for candidates of this granularity "
                            "(one extra forward per candidate: slow)")
    score.add_argument("--out", required=True, help="scores JSON file to write")
    score.add_argument("--plot", metavar="PNG", help="also plot per-layer importance to this PNG (needs matplotlib)")
    score.add_argument("--plot-metric", default="cosine", choices=["cosine", "cosine_no_residual", "bi", "angular"],
                       help="metric shown in --plot (default: cosine)")
    score.set_defaults(func=cmd_score, outputs={"out": "file", "plot": "file"})

    drop = commands.add_parser(
        "drop", help="choose modules to drop (Block / Layer / Joint Layer Drop), optionally export the model",
        description="Choose --num-drop modules to drop by a metric, one-shot or iteratively, write the drop plan "
                    f"and optionally export the dropped model. {METRIC_HELP}.")
    add_model_arguments(drop)
    add_scoring_pass_arguments(add_calibration_arguments(drop, required=False))
    drop.add_argument("--metric", choices=METRICS, default="cosine", help="importance metric (default: cosine)")
    drop.add_argument("--granularity", choices=GRANULARITIES, default="attn",
                      help="block: whole layers; attn / mlp: Layer Drop of one module type; joint: attention and "
                           "MLP ranked together in one list (default: attn)")
    drop.add_argument("-k", "--num-drop", type=positive_int, required=True, help="number of modules to drop")
    drop.add_argument("--mode", choices=MODES, default="one-shot",
                      help="one-shot: rank once; iterative: drop one, re-score, repeat (default: one-shot)")
    drop.add_argument("--no-residual", action="store_true",
                      help="cosine only: LLM-Drop's 'without residual' ablation (norm output vs module output)")
    drop.add_argument("--scores", metavar="JSON", help="rank from this scores file (from `score`) instead of "
                                                         "scoring again (one-shot only)")
    add_selection_arguments(drop)
    drop.add_argument("--out", metavar="JSON", help="write the drop plan (and the scores behind it) here")
    drop.add_argument("--export", metavar="PATH", help="export the dropped model to this new folder (or .gguf file)")
    add_format_arguments(drop, "--export-format")
    drop.add_argument("--force", action="store_true",
                      help="replace --export if it is an earlier output of ours (a folder with "
                           "llmdrop_rt_output.json, or a GGUF file); anything else is refused")
    drop.set_defaults(func=cmd_drop, outputs={"out": "file", "export": "folder"})

    ppl = commands.add_parser(
        "ppl", help="perplexity of a (dropped) model on a text file or dataset",
        description="Perplexity by the WikiText-2 convention: texts joined with blank lines, non-overlapping "
                    "windows of --seq-len tokens (or overlapping with --stride), PPL = exp(sum NLL / tokens).")
    add_model_arguments(ppl)
    ppl.add_argument("--text", required=True, metavar="SOURCE",
                     help="a .txt/.jsonl/.parquet file or a Hugging Face dataset name (e.g. wikitext, with "
                          "--dataset-config wikitext-2-raw-v1; needs `datasets` and hub access)")
    ppl.add_argument("--split", default="test", help="dataset split (default: test)")
    ppl.add_argument("--dataset-config", help="dataset configuration name")
    ppl.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    ppl.add_argument("--seq-len", type=positive_int,
                     help="window length (default: 2048, or the model's context if smaller)")
    ppl.add_argument("--stride", type=positive_int, help="window step (default: --seq-len, non-overlapping)")
    ppl.add_argument("--batch-size", type=positive_int, default=1, help="windows run together (default: 1)")
    ppl.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens of the text")
    ppl.add_argument("--out", metavar="JSON", help="also write the result here")
    ppl.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ppl.set_defaults(func=cmd_ppl, outputs={"out": "file"})

    sweep = commands.add_parser(
        "sweep", help="perplexity after dropping k modules, for several metrics and granularities",
        description="For each method (metric:granularity[:mode]) and each k, choose k modules to drop and measure "
                    "the dropped model's perplexity; writes JSON and optionally a plot.")
    add_model_arguments(sweep)
    add_scoring_pass_arguments(add_calibration_arguments(sweep))
    add_selection_arguments(sweep)
    sweep.add_argument("--eval", required=True, metavar="SOURCE",
                       help="text for perplexity (a .txt/.jsonl/.parquet file); use a different text than --calib")
    sweep.add_argument("--methods", default="cosine:attn,cosine:mlp,cosine:block,cosine:joint",
                       help="comma-separated metric:granularity[:mode] (default: the four cosine granularities)")
    sweep.add_argument("--ks", type=int_list, default=[2, 4, 6, 8, 10],
                       help="numbers of modules to drop (default: 2,4,6,8,10)")
    sweep.add_argument("--eval-seq-len", type=positive_int,
                       help="perplexity window (default: 2048, or the model's context if smaller)")
    sweep.add_argument("--max-eval-tokens", type=positive_int, help="evaluate only the first N tokens of --eval")
    sweep.add_argument("--loss-n-samples", type=positive_int,
                       help="calibration sequences for the (slow) loss metric: the first N of the set "
                            "(default: all)")
    sweep.add_argument("--loss-seq-len", type=positive_int,
                       help="tokens per sequence for the loss metric: a prefix of each (default: all)")
    sweep.add_argument("--out", required=True, help="results JSON file to write")
    sweep.add_argument("--plot", metavar="PNG", help="plot perplexity vs modules dropped to this PNG")
    sweep.set_defaults(func=cmd_sweep, outputs={"out": "file", "plot": "file"})

"""The `heal` command: LoRA healing of a dropped model, merged and written as a new checkpoint."""
from __future__ import annotations

import sys

from .args import add_model_arguments, model_folder, positive_int, positive_number, start_plan


def cmd_heal(args):
    from ..config import ModelConfig
    from ..drop.calibration import load_calibration
    from ..drop.perplexity import load_eval_tokens
    from ..heal import HealSettings, heal_model
    from ..io.publish import write_json
    from ..io.tokenizer import Tokenizer

    folder = model_folder(args)
    cfg = ModelConfig.from_folder(folder)
    plan = start_plan(args, cfg)
    settings = HealSettings(args.objective, args.rank, args.alpha, args.steps, args.batch_size, args.lr, args.top_k,
                            args.seed)
    if args.objective == "lm" and args.teacher:
        raise ValueError("--teacher is for --objective distill (the lm objective trains on the text alone)")
    tokenizer = Tokenizer(folder)
    data = load_calibration(tokenizer, args.data, args.n_samples, args.seq_len, args.seed,
                            cfg.max_position_embeddings, args.data_split, args.text_field)
    eval_tokens = load_eval_tokens(tokenizer, args.eval, "test", args.text_field, None, args.max_eval_tokens) \
        if args.eval else None
    result = heal_model(folder, args.out, data, settings, plan, args.teacher, eval_tokens, args.eval_seq_len,
                        args.device, args.dtype, args.force, not args.no_progress)
    print(f"healed {plan} ({args.objective}, rank {args.rank}, {args.steps} steps in {result.train_seconds:.0f} s): "
          f"training loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
          f"{result.output_format} -> {result.destination}")
    if result.eval_before and result.eval_after:
        print(f"perplexity on {args.eval} ({result.eval_after.tokens_scored} tokens): "
              f"{result.eval_before.perplexity:.4f} -> {result.eval_after.perplexity:.4f}")
    if args.report:
        report = {**result.to_dict(), "model": str(folder), "data": data.settings.to_dict(),
                  "eval": str(args.eval) if args.eval else None}
        print(f"report -> {write_json(args.report, report)}", file=sys.stderr)


def add_commands(commands):
    heal = commands.add_parser(
        "heal", help="heal a dropped model: LoRA adapters trained on a text, merged, written as a new checkpoint",
        description="Train LoRA adapters (peft, optional extra 'heal') on the kept attention/MLP projections of a "
                    "dropped model -- transformers' model of it with the dropped modules as weightless stand-ins -- "
                    "by next-token loss on --data (lm) or by KL divergence from the undropped model's distributions "
                    "on the same tokens (distill), merge them into the weights and write a new checkpoint in the "
                    "input's format family with the same drop plan (DeciLM stays DeciLM, LLM-Drop drop lists are "
                    "written as 'strip', a plain checkpoint stays plain). The source is never written; the same "
                    "--seed gives the same weights.")
    add_model_arguments(heal, runtime=False)
    heal.add_argument("--data", required=True, metavar="SOURCE",
                      help="training text: a .txt file, a .jsonl file (a 'text' field per line), a .parquet file or a "
                           "Hugging Face dataset name; tokenized, joined with EOS and cut into --seq-len sequences")
    heal.add_argument("--data-split", default="train", help="dataset split, for a dataset name (default: train)")
    heal.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    heal.add_argument("--n-samples", type=positive_int, default=64,
                      help="training sequences taken from --data, a seeded choice (default: 64)")
    heal.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training sequence (default: 512)")
    heal.add_argument("--objective", choices=["lm", "distill"], default="lm",
                      help="lm: next-token loss on the text; distill: KL divergence from the undropped model's "
                           "next-token distributions (default: lm)")
    heal.add_argument("--teacher", metavar="FOLDER",
                      help="distill: the undropped model (default: --model itself with nothing dropped, which needs "
                           "every weight, as a 'reference' export or an undropped folder with --drop-attn/--drop-mlp "
                           "has; a strip, decilm or renumbered export lacks the dropped weights)")
    heal.add_argument("--top-k", type=positive_int, default=64,
                      help="distill: the teacher's largest log-probabilities kept per token, the rest of its mass "
                           "as one bucket (default: 64)")
    heal.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default: 8)")
    heal.add_argument("--alpha", type=positive_number, default=None,
                      help="LoRA alpha; the update is B·A·alpha/rank (default: 2 x rank)")
    heal.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default: 100)")
    heal.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step (default: 4)")
    heal.add_argument("--lr", type=positive_number, default=5e-4,
                      help="AdamW peak learning rate; linear warmup over the first tenth of the steps, then cosine "
                           "decay to zero (default: 5e-4)")
    heal.add_argument("--seed", type=int, default=0,
                      help="seed of the adapters' initial values, the choice and the order of the sequences "
                           "(default: 0)")
    heal.add_argument("--eval", metavar="SOURCE",
                      help="held-out text whose perplexity is reported before and after healing (a file or dataset "
                           "as for --data, its 'test' split)")
    heal.add_argument("--eval-seq-len", type=positive_int, default=None,
                      help="perplexity window (default: 2048, or the model's context if shorter)")
    heal.add_argument("--max-eval-tokens", type=positive_int, default=None,
                      help="score only the first N tokens of --eval (default: all)")
    heal.add_argument("--device", default="cpu", help="where the teacher, training and evaluation run (default: cpu)")
    heal.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="precision of the frozen weights during training (the adapters are float32, peft's "
                           "default; default: float32); the adapters are merged into the stored weights in float32 "
                           "and the output keeps the source's dtype")
    heal.add_argument("--out", required=True, help="new checkpoint folder to write")
    heal.add_argument("--force", action="store_true", help="replace --out if it exists (never the source)")
    heal.add_argument("--report", metavar="FILE", help="write the settings, per-step losses and perplexities as JSON")
    heal.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    heal.set_defaults(func=cmd_heal)

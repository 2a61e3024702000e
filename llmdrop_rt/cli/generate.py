"""The `generate` command: a (dropped) model's continuation of a prompt, streamed to stdout."""
from __future__ import annotations

from .args import add_model_arguments, load_from_args


def cmd_generate(args):
    llm = load_from_args(args)
    prompt = llm.chat_prompt(args.prompt) if args.chat else args.prompt
    for piece in llm.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop):
        print(piece, end="", flush=True)
    print()


def add_commands(commands):
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

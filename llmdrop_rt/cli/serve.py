"""The `serve` command: an OpenAI-compatible HTTP server with continuous batching."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .args import add_model_arguments, load_from_args, positive_int, positive_number


def cmd_serve(args):
    try:
        from ..serve.server import ServerSettings, serve
    except ImportError as e:
        raise ImportError(f"`serve` needs the optional server packages: pip install 'llmdrop-rt[serve]' ({e})") \
            from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    llm = load_from_args(args)
    name = args.model_name or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    settings = ServerSettings(name, args.max_batch, args.max_len, args.max_queue, args.timeout,
                              args.api_key or os.environ.get("LLMDROP_RT_API_KEY"))
    serve(llm, settings, args.host, args.port)


def tcp_port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {port}")
    return port


def add_commands(commands):
    cmd = commands.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over HTTP: POST /v1/completions and /v1/chat/completions (streaming as "
                    "server-sent events), GET /v1/models, /health and /metrics (Prometheus). Requests share one "
                    "continuously batched decode loop.")
    add_model_arguments(cmd)
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    cmd.add_argument("--port", type=tcp_port, default=8000, help="TCP port, 1-65535 (default: 8000)")
    cmd.add_argument("--model-name", help="the model's id in the API (default: the model folder's name)")
    cmd.add_argument("--max-batch", type=positive_int, default=8,
                     help="requests decoded together: rows of the KV pool (default: 8)")
    cmd.add_argument("--max-len", type=positive_int,
                     help="tokens per row, prompt + completion (default: the model's context, at most 2048)")
    cmd.add_argument("--max-queue", type=positive_int, default=64,
                     help="requests that may wait for a row; more are answered 503 (default: 64)")
    cmd.add_argument("--timeout", type=positive_number, default=600.0,
                     help="seconds a request may take in all, waiting included (default: 600)")
    cmd.add_argument("--threads", type=positive_int, help="CPU threads for the model (default: torch's, one per core)")
    cmd.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request "
                                       "(default: $LLMDROP_RT_API_KEY; none: no check)")
    cmd.set_defaults(func=cmd_serve)

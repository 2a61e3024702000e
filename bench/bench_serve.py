"""Serving throughput: aggregate tokens/s and time to first token at 1/4/16/32 concurrent clients, through the
OpenAI-compatible server, for the full model and the model with half its attention layers dropped.

Aggregate tok/s = completion tokens / wall time (prefills included); decode-step tok/s = the tokens the server's
decode steps made / the time it spent in them (its /metrics counters), the batch's decode throughput alone.

Each model is served by `python -m llmdrop_rt serve` in its own process (so the clients' threads do not compete
with the engine for this interpreter), both up at once and measured in alternation at each client count; every
client streams greedy completions of its own prompt, one after the other, with the real `openai` client.

    python bench/bench_serve.py [--clients 1,4,16,32] [--requests 2] [--prompt-len 64] [--max-tokens 64]
                                [--threads 1] [--kv-rows N] [--out bench/out/serve.json]   # embedded SmolLM2, fp32
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai

from llmdrop_rt.bench.baselines import attention_layers_to_drop
from llmdrop_rt.io.publish import write_json
from llmdrop_rt.io.tokenizer import Tokenizer

TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made it "
        "possible to reproduce books far faster than scribes could copy them by hand. Within decades, presses "
        "spread across Europe, and the cost of books fell so sharply that reading became common among merchants, "
        "artisans and students. Scholars argue about how much this changed the course of science and religion")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(drop_attn: list[int], max_batch: int, max_len: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "llmdrop_rt", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--max-len", str(max_len), "--model-name", "smollm2", "--threads", str(threads)]
    if drop_attn:
        command += ["--drop-attn", ",".join(map(str, drop_attn))]
    process = subprocess.Popen(command)
    for _ in range(1200):
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx2.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("the server did not start within 5 minutes")


def prompts(count: int, length: int) -> list[list[int]]:
    """Token-id prompts of exactly `length` tokens, a different window of the text for each client."""
    ids = Tokenizer(load_folder()).encode(TEXT * 4)
    return [ids[i * 7:i * 7 + length] for i in range(count)]


def load_folder():
    from llmdrop_rt.io.gguf_import import default_model_path

    return default_model_path()


def one_request(client, prompt, max_tokens) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": first, "tokens": tokens, "seconds": time.perf_counter() - start}


def server_counters(url: str) -> dict[str, float]:
    """The server's own counters (/metrics): time in decode steps and prefill, and the decode steps' tokens."""
    text = httpx2.get(url.removesuffix("/v1") + "/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(values[f"llmdrop_rt_{name}_total"])
            for name in ("decode_seconds", "decode_tokens", "prefill_seconds")}


def measure(url: str, clients: int, requests: int, prompt_list, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def run_client(index):
        return [one_request(client, prompt_list[index], max_tokens) for _ in range(requests)]

    one_request(client, prompt_list[0], 4)  # warm-up
    before = server_counters(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    server = {name: value - before[name] for name, value in server_counters(url).items()}
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    decode_rates = [(r["tokens"] - 1) / (r["seconds"] - r["ttft_s"]) for r in results
                    if r["ttft_s"] is not None and r["tokens"] > 1]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall,
            "decode_tok_s": server["decode_tokens"] / server["decode_seconds"],
            "prefill_share": server["prefill_seconds"] / wall, "ttft_median_s": statistics.median(ttfts),
            "ttft_max_s": max(ttfts), "per_stream_decode_tok_s": statistics.median(decode_rates)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default: 2)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads (default: 1)")
    parser.add_argument("--kv-rows", type=int, default=None,
                        help="size both KV pools by one memory budget: the full model gets this many rows, the "
                             "dropped one the rows the same bytes hold (default: as many rows as clients, both)")
    parser.add_argument("--out", default="bench/out/serve.json")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    num_layers = load_config_layers()
    configs = {"full": [], "attn-dropped": attention_layers_to_drop(num_layers, 0.5)}
    prompt_list = prompts(max(counts), args.prompt_len)
    pool_rows = {label: max(counts) if args.kv_rows is None else
                 args.kv_rows * num_layers // (num_layers - len(drop)) for label, drop in configs.items()}
    servers = {}
    try:
        for label, drop in configs.items():
            servers[label] = start_server(drop, pool_rows[label], args.prompt_len + args.max_tokens, args.threads)
        load_before, rows = os.getloadavg(), []
        for index, clients in enumerate(counts):
            # Both models at each client count, in alternating order, so the machine's drift hits both alike.
            for label in list(configs)[::1 if index % 2 == 0 else -1]:
                row = dict(measure(servers[label][1], clients, args.requests, prompt_list, args.max_tokens),
                           model=label)
                print(f"{label:13s} {clients:3d} clients: {row['aggregate_tok_s']:7.1f} tok/s, "
                      f"TTFT median {row['ttft_median_s'] * 1000:7.0f} ms", flush=True)
                rows.append(row)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    rows.sort(key=lambda r: (list(configs).index(r["model"]), r["clients"]))
    report = {"model": "SmolLM2-135M-Instruct (embedded), fp32 kernels, CPU", "drop_attn": configs["attn-dropped"],
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
              "server_threads": args.threads, "kv_pool_rows": pool_rows, "cpus": os.cpu_count(),
              "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
              "rows": rows, "summary": summary(rows, counts)}
    write_json(args.out, report)
    print(table(rows))
    for line in report["summary"]:
        print(line)


def load_config_layers() -> int:
    from llmdrop_rt.config import ModelConfig

    return ModelConfig.from_folder(load_folder()).num_layers


def summary(rows, counts) -> list[str]:
    def rate(label, clients, key):
        return next(r[key] for r in rows if r["model"] == label and r["clients"] == clients)

    lines = []
    for key in ("aggregate_tok_s", "decode_tok_s"):
        for label in ("full", "attn-dropped"):
            ratios = ", ".join(f"{clients}: {rate(label, clients, key) / rate(label, counts[0], key):.2f}x"
                               for clients in counts[1:])
            lines.append(f"{key} of {label}, clients vs {counts[0]}: {ratios}")
        ratios = ", ".join(f"{clients}: {rate('attn-dropped', clients, key) / rate('full', clients, key):.2f}x"
                           for clients in counts)
        lines.append(f"{key}, attention-dropped vs full, by clients: {ratios}")
    return lines


def table(rows) -> str:
    head = ["model", "clients", "requests", "tokens", "aggregate tok/s", "decode-step tok/s", "prefill share of wall",
            "per-stream decode tok/s", "TTFT median ms", "TTFT max ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['clients']} | {r['requests']} | {r['tokens']} | "
                     f"{r['aggregate_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['prefill_share']:.0%} | "
                     f"{r['per_stream_decode_tok_s']:.1f} | "
                     f"{r['ttft_median_s'] * 1000:.0f} | {r['ttft_max_s'] * 1000:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

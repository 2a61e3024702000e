"""The one worker protocol of the benches: each configuration is measured in a fresh process.

`run_in_subprocess(job)` runs `python -m llmdrop_rt.bench.worker JOB_JSON`, which loads the configuration with its
timer (bench.baselines), warms up, then for each batch size times `repeats` generations of `new_tokens` after a
`prompt_len` prompt and keeps the fastest; the process's peak memory is the configuration's own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from .baselines import make_timer, peak_memory, random_prompts


def measure(job: dict) -> dict:
    """{"weight_bytes", "peak_memory_bytes", "batches": {batch: timings of the fastest repeat and every repeat}}."""
    torch.set_num_threads(job["threads"])
    timer = make_timer(job)
    timer.time_generation(random_prompts(timer.vocab, 1, min(16, job["prompt_len"])), 3)  # warm-up
    batches = {}
    for batch in job["batch_sizes"]:
        prompts = random_prompts(timer.vocab, batch, job["prompt_len"])
        runs = []
        for _ in range(job["repeats"]):
            cpu0 = time.process_time()
            prefill_s, decode_s = timer.time_generation(prompts, job["new_tokens"])
            runs.append((prefill_s, decode_s, time.process_time() - cpu0))
        prefill_s, decode_s, cpu_s = min(runs, key=lambda run: run[0] + run[1])
        batches[str(batch)] = {
            "prefill_s": prefill_s, "decode_s": decode_s, "cpu_s": cpu_s, "runs": runs,
            "prefill_tok_s": batch * job["prompt_len"] / prefill_s,
            "decode_tok_s": batch * (job["new_tokens"] - 1) / decode_s,
            "kv_bytes": timer.kv_bytes(batch, job["prompt_len"] + job["new_tokens"])}
    return {"weight_bytes": timer.weight_bytes(), "peak_memory_bytes": peak_memory(timer.device), "batches": batches}


def run_in_subprocess(job: dict) -> dict:
    """`measure(job)` in a fresh process (same thread count as asked, its own peak memory); returns its result."""
    proc = subprocess.run([sys.executable, "-m", "llmdrop_rt.bench.worker", json.dumps(job)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {job['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

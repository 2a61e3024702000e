"""llama.cpp's speed on SmolLM2-135M-Instruct at each GGUF type, full and with attention layers dropped.

The files are written by llmdrop_rt.gguf_export from the default model folder (F32, F16, Q8_0, Q4_0; the
dropped model as `deci` at F32 and Q8_0), plus the shipped Q4_1 GGUF itself; llama-bench then measures prompt
processing (pp) and generation (tg) at each thread count. Needs `make peers`. Run it on an idle machine.

    python bench/bench_llama_cpp.py [--threads 1,2] [--repetitions 5] [--out bench/results/cpu-llama-cpp-smollm2.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from llmdrop_rt import DropPlan, llama_cpp_peer
from llmdrop_rt.__main__ import parse_layer_list
from llmdrop_rt.gguf_export import export_gguf
from llmdrop_rt.gguf_import import default_model_path, smollm2_gguf_path

FULL_TYPES = ("f32", "f16", "q8_0", "q4_0")
DROPPED_TYPES = ("f32", "q8_0")


def write_models(folder: Path, gguf_dir: Path, drop_attn: list[int]) -> dict[str, Path]:
    """label -> GGUF file; written once into gguf_dir, reused when already there."""
    num_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    wanted = {f"full-{t}": (DropPlan.create(num_layers), t) for t in FULL_TYPES}
    span = f"{min(drop_attn)}-{max(drop_attn)}"
    wanted |= {f"attn{span}-{t}": (DropPlan.create(num_layers, drop_attn=drop_attn), t) for t in DROPPED_TYPES}
    models = {}
    for label, (plan, gguf_type) in wanted.items():
        path = gguf_dir / f"smollm2-{label}.gguf"
        if not path.exists():
            print(f"writing {path}", flush=True)
            export_gguf(folder, path, plan, gguf_type)
        models[label] = path
    models["shipped-q4_1"] = smollm2_gguf_path()
    return models


def machine_description() -> dict:
    """The CPU, its vector extensions that matter to ggml's kernels, memory, and how busy the machine was."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    # The model name can be as vague as "AMD EPYC"; family and model tell the generation (26 = Zen 5).
    family, number = (next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(key)),
                           None) for key in ("cpu family", "model\t"))
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    extensions = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
    return {"cpu": model, "cpu_family": family, "cpu_model": number, "cpus": os.cpu_count(),
            "memory_gib": round(memory_kb / 2**20, 1), "extensions": [f for f in extensions if f in flags],
            "load_average_at_start": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default: 1,2)")
    parser.add_argument("--n-prompt", type=int, default=128, help="prompt tokens of the pp test (default: 128)")
    parser.add_argument("--n-gen", type=int, default=32, help="generated tokens of the tg test (default: 32)")
    parser.add_argument("--repetitions", type=int, default=5, help="llama-bench -r (default: 5)")
    parser.add_argument("--drop-attn", type=parse_layer_list, default=list(range(14, 29)), metavar="LAYERS",
                        help="attention layers dropped in the deci model (default: 14-28)")
    parser.add_argument("--gguf-dir", default="bench/out/gguf", help="where the GGUF files are written")
    parser.add_argument("--out", default="bench/results/cpu-llama-cpp-smollm2.json")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    machine = machine_description()

    gguf_dir = Path(args.gguf_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    models = write_models(default_model_path(), gguf_dir, args.drop_attn)
    runs = []
    for label, path in models.items():
        print(f"llama-bench {label}", flush=True)
        started = time.time()
        records = llama_cpp_peer.run_llama_bench(path, threads, args.n_prompt, args.n_gen, args.repetitions)
        runs.append({"label": label, "gguf": str(path), "seconds": round(time.time() - started, 1),
                     "records": records})
        for row in llama_cpp_peer.bench_summary(records):
            print(f"  {row['test']:>6} t{row['threads']}: {row['tok_s']:8.1f} ± {row['stddev']:.1f} tok/s", flush=True)

    result = {
        "command": f"llama-bench -m FILE -t {args.threads} -p {args.n_prompt} -n {args.n_gen} "
                   f"-r {args.repetitions} -o json",
        "llama_cpp": llama_cpp_peer.build_info(),
        "machine": machine,
        "drop_attn": args.drop_attn,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

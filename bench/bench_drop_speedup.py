"""The 50 % attention-drop speedup, ours vs transformers-skip, measured as robustly as a shared CPU allows.

One process holds four models -- ours full, ours with half the attention layers dropped, transformers full, and
transformers with the same layers skipped in the forward (LLM-Drop's approach) -- and times batch-1 greedy decode
(128-token prompt, 32 new tokens) of each in turn, round after round. Drop speedups are taken per round (dropped
over full, same round), so drift of the machine's speed between rounds cancels.

    python bench/bench_drop_speedup.py [ROUNDS] [OUT.json]     # embedded SmolLM2-135M-Instruct, fp32, 2 threads
"""
import json
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM

import llmdrop_rt
from llmdrop_rt.bench.baselines import attention_layers_to_drop, timed_generation, timed_transformers_generate
from llmdrop_rt.io.gguf_import import default_model_path
from llmdrop_rt.model.standins import skip_attention

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
out = sys.argv[2] if len(sys.argv) > 2 else "bench/out/drop_speedup.json"
new = 32
drop = attention_layers_to_drop(30, 0.5)
prompt = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()
ours = {"ours full": llmdrop_rt.load(), "ours drop15": llmdrop_rt.load(drop_attn=drop)}
hf_full = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
hf_skip = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
for i in drop:
    skip_attention(hf_skip.model.layers[i])

def run_ours(llm):
    return (new - 1) / timed_generation(llm, prompt, new, torch.device("cpu"))[1]

def run_hf(model):
    _, stamps, _ = timed_transformers_generate(model, prompt, new, torch.device("cpu"))
    return (new - 1) / (stamps[-1] - stamps[1])

runs = {"ours full": lambda: run_ours(ours["ours full"]), "ours drop15": lambda: run_ours(ours["ours drop15"]),
        "transformers full": lambda: run_hf(hf_full), "transformers skip15": lambda: run_hf(hf_skip)}
for warm_up in runs.values():
    warm_up()
res = {k: [] for k in runs}
for r in range(rounds):
    order = list(runs) if r % 2 == 0 else list(runs)[::-1]
    for k in order:
        res[k].append(runs[k]())
for k, v in res.items():
    print(f"{k:20s} median {statistics.median(v):5.1f} tok/s  rounds {[round(x, 1) for x in v]}")
ours_ratio = [b / a for a, b in zip(res["ours full"], res["ours drop15"])]
hf_ratio = [b / a for a, b in zip(res["transformers full"], res["transformers skip15"])]
vs = [a / b for a, b in zip(res["ours full"], res["transformers full"])]
print(f"drop-50% speedup, paired per round: ours median {statistics.median(ours_ratio):.3f} "
      f"{[round(x, 2) for x in ours_ratio]}")
print(f"                                   transformers-skip median {statistics.median(hf_ratio):.3f} "
      f"{[round(x, 2) for x in hf_ratio]}")
print(f"ours full / transformers full, paired: median {statistics.median(vs):.3f}")
json.dump({"rounds": res, "drop_attn": drop, "ours_drop_speedup": ours_ratio, "transformers_skip_speedup": hf_ratio,
           "ours_over_transformers": vs, "threads": 2, "torch": torch.__version__}, open(out, "w"), indent=1)

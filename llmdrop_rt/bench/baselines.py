"""What the benches time, one timer per implementation: our runtime, and transformers on the same weights (with
attention skipped in the forward but still allocated, LLM-Drop's approach, for the dropped rows).

Both time one greedy generation of exactly `new_tokens` per row: prefill = start to the first token, decode =
first to last token. Either can run on a real checkpoint or on SYNTHETIC random weights of a known shape.
"""
from __future__ import annotations

import resource
import time

import torch

from ..devices import resolve_dtype


def deepest_attention_layers(num_layers: int, count: int) -> list[int]:
    """The `count` deepest attention layers but the last (LLM-Drop finds deep attention the most redundant).
    Speed and bytes do not depend on which layers go; `python -m llmdrop_rt score` chooses them by importance."""
    return list(range(num_layers - 1 - count, num_layers - 1)) if count else []


def attention_layers_to_drop(num_layers: int, fraction: float) -> list[int]:
    return deepest_attention_layers(num_layers, round(num_layers * fraction))


def sync(device):
    """Wait for queued GPU work so wall-clock stamps mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> int:
    """GPU: max allocated; CPU: peak RSS of the process (which includes the Python/torch runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (batch, length), generator=gen).tolist()


def timed_generation(llm, prompts: list[list[int]], new_tokens: int, device) -> tuple[float, float]:
    """Our greedy generation of exactly `new_tokens` per row: (prefill seconds to the first token, decode seconds
    from the first to the last token)."""
    sync(device)
    t0 = time.perf_counter()
    first = None
    for _ in llm.engine.stream(prompts, new_tokens):  # no EOS set: exactly new_tokens steps
        if first is None:
            sync(device)
            first = time.perf_counter()
    sync(device)
    return first - t0, time.perf_counter() - first


def timed_transformers_generate(model, prompts: list[list[int]], new_tokens: int, device):
    """transformers' greedy generate of exactly `new_tokens` per row, with a clock on every streamed token.

    Returns (t0, stamps, output): t0 just before the call; stamps[0] when the prompt was streamed, stamps[1] the
    first generated token, stamps[-1] the last."""
    from transformers.generation.streamers import BaseStreamer

    stamps = []

    class Clock(BaseStreamer):
        def put(self, value):
            sync(device)
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=Clock(), pad_token_id=0,
                             return_dict_in_generate=True)
    sync(device)
    return t0, stamps, out


def transformers_cache_bytes(cache) -> int:
    """Bytes of K/V tensors a transformers Cache holds (layers never written hold none)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total


class OursTimer:
    def __init__(self, job: dict):
        from ..runtime import load
        from .synthetic import load_synthetic

        kwargs = dict(drop_attn=job["drop_attn"], drop_mlp=[], dtype=job["dtype"], device=job["device"],
                      kernels=job.get("kernels"), decode=job.get("decode", "auto"),
                      kv_cache=job.get("kv_cache", "auto"))
        if job.get("weights"):
            kwargs["weights"] = job["weights"]
        self.llm = load_synthetic(job["synthetic"], **kwargs) if job.get("synthetic") else load(job["model"], **kwargs)
        self.device, self.vocab = self.llm.device, self.llm.cfg.vocab_size

    def weight_bytes(self):
        return self.llm.param_bytes()

    def kv_bytes(self, batch, length):
        return self.llm.kv_cache_bytes(batch, length)

    def time_generation(self, prompts, new_tokens) -> tuple[float, float]:
        return timed_generation(self.llm, prompts, new_tokens, self.device)


class TransformersTimer:
    def __init__(self, job: dict):
        from ..model.standins import skip_attention
        from .synthetic import transformers_synthetic

        self.device = torch.device(job["device"])
        dtype = resolve_dtype(job["dtype"], self.device)
        if job.get("synthetic"):
            self.model = transformers_synthetic(job["synthetic"], job["drop_attn"], dtype, self.device)
        else:
            from transformers import AutoModelForCausalLM

            from ..io.code_free import code_free_view

            with code_free_view(job["model"]) as view:
                self.model = AutoModelForCausalLM.from_pretrained(view, dtype=dtype).to(self.device).eval()
            for i in job["drop_attn"]:
                skip_attention(self.model.model.layers[i])
        self.vocab = self.model.config.vocab_size
        self.cache_bytes = 0

    def weight_bytes(self):
        return sum(p.nbytes for p in self.model.parameters())

    def kv_bytes(self, batch, length):
        """What transformers' cache really held after the last timed generation: only layers that wrote to it
        (skipped attention never does), and prompt + new - 1 positions (the last token is never fed back)."""
        return self.cache_bytes

    def time_generation(self, prompts, new_tokens) -> tuple[float, float]:
        t0, stamps, out = timed_transformers_generate(self.model, prompts, new_tokens, self.device)
        self.cache_bytes = transformers_cache_bytes(out.past_key_values)
        return stamps[1] - t0, stamps[-1] - stamps[1]


def make_timer(job: dict):
    return OursTimer(job) if job["impl"] == "llmdrop_rt" else TransformersTimer(job)

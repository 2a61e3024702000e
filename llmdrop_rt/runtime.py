"""The public API: `load()` a checkpoint folder into an `LLM`, then generate, stream, score logits."""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterator

import torch

from .arguments import ArgumentError, stop_strings, token_ids
from .config import ConfigError, DropPlan, ModelConfig, read_json
from .devices import resolve_device, resolve_dtype
from .engine import Engine, Sampling
from .io.accounting import check_all_used
from .io.checkpoint import CheckpointReader
from .io.tokenizer import Tokenizer
from .model import KVCache, ModelBuilder, Transformer, select_ops
from .model.attention import BACKENDS, default_backend, flash_attn_with_kvcache
from .model.cache import resolve_kv_dtype
from .validation import TOKEN_IDS, check_in_vocabulary


class LLM:
    """A loaded (possibly dropped) model with its tokenizer."""

    def __init__(self, folder: Path, cfg: ModelConfig, plan: DropPlan, model: Transformer, tokenizer: Tokenizer,
                 attn_backend: str, decode: str = "auto"):
        self.folder, self.cfg, self.plan, self.model, self.tokenizer = folder, cfg, plan, model, tokenizer
        self.eos_ids = set(cfg.eos_token_ids) | _generation_eos(folder, cfg.vocab_size)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.engine = Engine(model, attn_backend, pad_token_id=pad, decode=decode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- text in, text out --------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict] | str) -> str:
        """Render a chat (a list of {role, content}, or one user message) with the model's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _encode_prompts(self, prompts) -> list[list[int]]:
        """A string, token ids, or a list of either -> token ids per prompt (checked against the vocabulary)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ArgumentError(f"prompts must be a string, token ids, or a non-empty list of either, got "
                                f"{type(prompts).__name__} {prompts!r}")
        encoded = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                encoded.append(self.tokenizer.encode(prompt))
            else:
                encoded.append(token_ids(prompt, self.cfg.vocab_size, f"prompts[{i}]"))
        return encoded

    def _stop_checker(self, stop: list[str]):
        if not stop:
            return None
        return lambda row, ids: any(s in self.tokenizer.decode(ids) for s in stop)

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> list[str]:
        """Continuations of each prompt (a string, token ids, or a list of either), cut before any stop string."""
        stop = stop_strings(stop)
        ids = self.generate_ids(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop)
        return [_cut_at_stop(self.tokenizer.decode(seq), stop) for seq in ids]

    def generate_ids(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> list[list[int]]:
        sampling = Sampling(temperature, top_k, top_p, seed)
        return self.engine.generate(self._encode_prompts(prompts), max_new_tokens, sampling, self.eos_ids,
                                    self._stop_checker(stop_strings(stop)))

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as tokens are generated."""
        sampling = Sampling(temperature, top_k, top_p, seed)
        stop = stop_strings(stop)
        ids: list[int] = []
        shown = ""
        for step in self.engine.stream(self._encode_prompts(prompt)[:1], max_new_tokens, sampling, self.eos_ids,
                                       self._stop_checker(stop)):
            if step.tokens[0] is None:
                break
            ids.append(step.tokens[0])
            text = _cut_at_stop(self.tokenizer.decode(ids), stop)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            yield text[len(shown):]
            shown = text

    # -- numbers ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, tokens) -> torch.Tensor:
        """fp32 logits [B, T, V] for token ids [B, T] (or [T]), one causal pass. With a KV cache narrower than the
        activations (`load(kv_cache=...)`) the pass attends over keys and values rounded to it, as generation does;
        otherwise no cache is involved."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ArgumentError(f"tokens must be integer token ids [B, T] or [T], got {tokens.dtype} of shape "
                                f"{list(tokens.shape)}")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.cfg.vocab_size:
            bad = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
            raise ArgumentError(f"token id {bad} is outside the vocabulary (ids 0..{self.cfg.vocab_size - 1})")
        if tokens.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of "
                             f"{self.cfg.max_position_embeddings}")
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        cache = None
        if self.model.kv_dtype != self.model.dtype:
            cache = KVCache(self.cfg, self.plan, tokens.shape[0], tokens.shape[1], self.model.kv_dtype, self.device)
        return self.model(tokens, positions, cache, attn_backend=self.engine.attn_backend).float()

    def kv_cache_bytes(self, batch_size: int = 1, max_len: int | None = None) -> int:
        """Bytes of the KV cache for this batch and length (default: the full context), kept layers only."""
        return KVCache.bytes_for(self.cfg, self.plan, batch_size, max_len or self.cfg.max_position_embeddings,
                                 self.model.kv_dtype)

    def param_bytes(self) -> int:
        """Bytes of the weights actually held (a tied embedding counted once; folded kernel weights included)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        unique = {t.data_ptr(): t.nbytes for t in tensors}
        return sum(unique.values())


def _generation_eos(folder: Path, vocab_size: int) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    eos = read_json(path).get("eos_token_id")
    TOKEN_IDS.or_null().check(eos, f"{path}: eos_token_id", ConfigError)
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    check_in_vocabulary(sorted(ids), vocab_size, f"{path}: eos_token_id", ConfigError)
    return ids


def _is_token_ids(value) -> bool:
    """One prompt's token ids (a non-empty sequence of integers), as opposed to a list of prompts."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text


def load(path: str | Path | None = None, drop_attn=None, drop_mlp=None, dtype=None, device=None,
         attn_backend: str | None = None, kernels: str | None = None, decode: str = "auto",
         weights: str | None = "auto", kv_cache: str = "auto", strict: bool = True) -> LLM:
    """Load a Llama/Mistral/Qwen2/Qwen3/Gemma2 checkpoint folder or llama GGUF file (default: the embedded
    SmolLM2-135M-Instruct).

    drop_attn / drop_mlp: layer indices (or a boolean mask) to drop, overriding config.json's
    `drop_attn_list` / `drop_mlp_list`; dropped modules are never built and their weights never read.
    dtype: "float32" | "bfloat16" | "float16" | torch.dtype (default fp32 on CPU, bf16 on GPU).
    weights (CPU): "fp32" | "fp16" | "bf16" | "int8" | "int4": store the weights in that format, embedding and output
    head included, and run our CPU kernels (activations fp32; see llmdrop_rt.model.builder). A GGUF source's
    q8_0 / q4_0 / q4_1 tensors load as stored for int8 / int4. "auto" (default): fp32 kernels for an fp32 model on
    the CPU, plain torch modules in `dtype` everywhere else; None: always torch modules.
    kv_cache: "auto" (default: the activations' dtype, fp32 on CPU) | "fp32" | "fp16" | "bf16": the dtype K/V are
    cached in. fp16 (llama.cpp's default) halves the cache and the bytes each decode step reads from it; keys and
    values are rounded to it when written. The CPU decode step reads fp16 / bf16 caches directly; other paths
    convert the keys they attend over.
    attn_backend: "flash" (default on CUDA when flash-attn is installed), "sdpa" (default otherwise) or "reference".
    kernels: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch", for this model only (see
    llmdrop_rt.model.ops); default: $LLMDROP_RT_KERNELS, else "auto".
    decode: "auto" (CUDA-graph replay of a static-shape step on CUDA, plain eager steps elsewhere), "graph",
    "static" or "dynamic" (see llmdrop_rt.engine.Engine).
    strict: every tensor of the checkpoint must be used by the built model or belong to a dropped module (a
    config describing fewer layers than the weights hold, or no biases where the checkpoint has them, is refused
    with the tensors named); strict=False ignores such tensors.
    A folder without tokenizer files loads for token-id work (`logits`, `generate_ids` with id prompts); text in or
    out then fails with an error naming the missing files.
    """
    from .io import gguf_import

    gguf_file = gguf_import.smollm2_gguf_path() if path is None else None
    if path is not None and Path(path).suffix == ".gguf" and Path(path).is_file():
        gguf_file = Path(path)
    # A GGUF's config and tokenizer come from its (cached) conversion into a checkpoint folder.
    folder = gguf_import.converted_folder(gguf_file) if gguf_file is not None else Path(path)
    cfg = ModelConfig.from_folder(folder)
    plan = DropPlan.from_config(cfg, drop_attn, drop_mlp)
    device = resolve_device(device)
    backend = attn_backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend {backend!r} is not one of {BACKENDS}")
    if backend == "flash" and flash_attn_with_kvcache is None:
        raise ValueError("attn_backend='flash' asked for, but the flash-attn package is not importable")
    if backend == "flash" and cfg.attn_logit_softcapping is not None:
        # (soft-capped layers run the explicit path, under any backend but flash)
        if attn_backend == "flash":
            raise ValueError(f"attn_backend='flash' does not soft-cap attention logits, which {cfg.architecture} "
                             "needs (attn_logit_softcapping); choose 'sdpa'")
        backend = "sdpa"
    activations = resolve_dtype(dtype, device)
    kv_dtype = resolve_kv_dtype(kv_cache, activations)
    if backend == "flash" and kv_dtype != activations:
        if attn_backend == "flash":
            raise ValueError(f"attn_backend='flash' caches K/V in the model's dtype, not kv_cache={kv_cache!r}; "
                             "choose 'sdpa'")
        backend = "sdpa"
    ops = select_ops(kernels, device)
    tokenizer = Tokenizer(folder)
    native_blocks = gguf_file is not None and weights in ("int8", "int4")
    reader = gguf_import.GGUFWeights(gguf_file) if native_blocks else CheckpointReader(folder)
    model = ModelBuilder(cfg, plan, reader, activations, device, ops, weights).build()
    model.kv_dtype = kv_dtype
    if strict:
        check_all_used(reader, cfg, plan)
    return LLM(folder, cfg, plan, model, tokenizer, backend, decode)

"""lm-eval model `llmdrop_rt`: tasks scored on our engine (a possibly dropped model), not on transformers.

    lm_eval --model llmdrop_rt --model_args pretrained=DIR,drop_attn=20;22;24-26,dtype=bfloat16 --tasks piqa
    python -m llmdrop_rt eval --model DIR --drop-attn 20,22,24-26          # LLM-Drop's task/shot settings

Importing this module registers the model with lm-eval. The three request types:
- loglikelihood: requests sorted longest first, right-padded into batches, one causal pass per batch; the
  log-softmax is taken only at the continuation's positions. Tokenisation (context/continuation split, moving
  trailing spaces into the continuation, the BOS/EOS prefix for an empty context, left truncation to
  `max_length`) is lm-eval's own (TemplateLM), so scores are comparable with its `hf` model.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens, scored in the same batches.
- generate_until: batched greedy or sampled generation in our engine (KV cache of kept layers only), stopped
  per row at any `until` string or EOS, cut before the stop string.
"""
from __future__ import annotations

import json

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..arguments import parse_layer_list

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def parse_drop_arg(value) -> list[int] | None:
    """A drop list from --model_args, where commas separate arguments: '20;22;24-26' (';' or ':' or spaces
    between entries), a single int, '' for none, or a list/None when called from Python."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    text = str(value)
    for separator in ";: ":
        text = text.replace(separator, ",")
    return parse_layer_list(text)


@register_model("llmdrop_rt")
class LLMDropLM(TemplateLM):
    """An lm-eval LM over `llmdrop_rt.load(pretrained, ...)`, or over an already loaded `llm`."""

    def __init__(self, pretrained: str | None = None, drop_attn=None, drop_mlp=None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 attn_backend: str | None = None, kernels: str | None = None, llm=None):
        super().__init__()
        if llm is None:
            import llmdrop_rt

            llm = llmdrop_rt.load(pretrained, drop_attn=parse_drop_arg(drop_attn), drop_mlp=parse_drop_arg(drop_mlp),
                                  dtype=dtype, device=device, attn_backend=attn_backend, kernels=kernels)
        elif pretrained is not None or drop_attn is not None or drop_mlp is not None:
            raise ValueError("pass either a loaded `llm` or pretrained/drop_attn/drop_mlp, not both")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.pretrained = str(llm.folder)
        self._batch_size = _parse_batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length or llm.cfg.max_position_embeddings)
        if self._max_length > llm.cfg.max_position_embeddings:
            raise ValueError(f"max_length={self._max_length} exceeds the model's context of "
                             f"{llm.cfg.max_position_embeddings} tokens (max_position_embeddings)")
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        bos = self.tokenizer.token_id(self.tokenizer.bos_token)
        self._prefix_token_id = bos if bos is not None else self.eot_token_id
        self.pad_token_id = self.llm.engine.pad_token_id

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.pretrained}: the tokenizer has no eos_token, which lm-eval needs")
        return eos

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context and the first rolling window: BOS, else EOS (as `hf`)."""
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.llm.device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Special tokens as `hf` adds them: the explicit flag, else add_bos_token, else the tokenizer's default
        (on), except that a string already starting with the BOS text gets no second one."""
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add is None:
            prefix_text = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
            add = not has_bos_prefix(string, prefix_text)
        ids = self.tokenizer.encode(string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding reproduces the continuation) per request of
        (cache key, context ids, continuation ids)."""
        windows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"a loglikelihood request needs a context and a continuation, got {len(context)} "
                                 f"and {len(continuation)} tokens")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            # The model reads context + continuation minus its last token, left-truncated to max_length.
            windows.append(((context + continuation)[-(self.max_length + 1):][:-1], continuation))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # longest first: no surprises late
        with tqdm(total=len(order), disable=disable_tqdm, desc="llmdrop_rt loglikelihood") as bar:
            for first in range(0, len(order), self.batch_size):
                batch = order[first:first + self.batch_size]
                for i, result in zip(batch, self._score_batch([windows[i] for i in batch])):
                    results[i] = result
                    request_key = requests[i][0]
                    if request_key is not None:
                        self.cache_hook.add_partial("loglikelihood", request_key, result)
                bar.update(len(batch))
        return results

    def _score_batch(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        longest = max(len(inputs) for inputs, _ in windows)
        # Right padding: the model is causal, so padding after a row's tokens never reaches them.
        tokens = torch.tensor([inputs + [self.pad_token_id] * (longest - len(inputs)) for inputs, _ in windows])
        logits = self.llm.logits(tokens)
        results = []
        for row, (inputs, continuation) in enumerate(windows):
            n = len(continuation)
            log_probs = F.log_softmax(logits[row, len(inputs) - n:len(inputs)], dim=-1)
            target = torch.tensor(continuation, device=log_probs.device)
            score = log_probs.gather(-1, target[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == target).all())
            results.append((score, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, in lm-eval's disjoint windows of max_length tokens."""
        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first `until` string (EOS text included, as `hf` does)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="llmdrop_rt generate_until") as bar:
            for members in groups.values():
                gen_kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text)
                max_new = int(gen_kwargs.pop("max_gen_toks"))
                if max_new >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length="
                                     f"{self.max_length}")
                temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                           for i in members}
                members = sorted(members, key=lambda i: -len(prompts[i]))  # similar lengths share a batch
                for first in range(0, len(members), self.batch_size):
                    batch = members[first:first + self.batch_size]
                    outputs = self.llm.generate_ids(
                        [prompts[i] for i in batch], max_new_tokens=max_new, temperature=temperature,
                        top_k=int(gen_kwargs.get("top_k") or 0), top_p=float(gen_kwargs.get("top_p") or 1.0),
                        seed=gen_kwargs.get("seed"), stop=[s for s in until if s])
                    for i, ids in zip(batch, outputs):
                        text = postprocess_generated_text(self.tok_decode(ids), until, None)
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results


def _parse_batch_size(batch_size, max_batch_size) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        raise ValueError(f"batch_size={batch_size!r}: automatic batch sizing is not supported; give a number")
    size = int(batch_size)
    if max_batch_size is not None:
        size = min(size, int(max_batch_size))
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


def local_task_manager(include_defaults: bool = False):
    """An lm-eval TaskManager that knows our local offline tasks (and the standard ones when asked)."""
    from lm_eval.tasks import TaskManager

    from .tasks import TASK_DIR

    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults)




# -- LLM-Drop's evaluation settings --------------------------------------------------------------------------------
# Tasks and few-shot counts of the paper's tables, and the metric it reports for each (acc_norm for OBQA, PIQA,
# HellaSwag and ARC-C; exact match for GSM8K; acc otherwise).
PAPER_SHOTS = {"boolq": 0, "rte": 0, "openbookqa": 0, "piqa": 0, "mmlu": 5, "winogrande": 5, "gsm8k": 5,
               "hellaswag": 10, "arc_challenge": 25}
PAPER_METRIC = {"openbookqa": "acc_norm", "piqa": "acc_norm", "hellaswag": "acc_norm", "arc_challenge": "acc_norm",
                "gsm8k": "exact_match"}
LOCAL_METRIC = {"llmdrop_mc": "acc_norm", "llmdrop_tempest": "word_perplexity"}


class TaskError(ValueError):
    """A task lm-eval could not run (the CLI prints it as a plain error)."""


def run_tasks(lm, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              seed: int = 1234) -> dict:
    """Evaluate `lm` on `tasks`, each with the paper's shot count unless `num_fewshot` is given (tasks with the
    same count share one lm-eval run). Returns {"results": {task: metrics}, "n-shot": {...}, "summary": [...]}."""
    from .tasks import LOCAL_TASKS

    by_shots: dict[int | None, list[str]] = {}
    for task in tasks:
        shots = num_fewshot if num_fewshot is not None else PAPER_SHOTS.get(task)
        by_shots.setdefault(shots, []).append(task)
    manager = local_task_manager(include_defaults=any(task not in LOCAL_TASKS for task in tasks))
    report: dict = {"results": {}, "n-shot": {}, "configs": {}, "versions": {}}
    for shots, group in by_shots.items():
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=shots, limit=limit,
                                          task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
        except Exception as e:  # most often a dataset that needs the (unreachable) hub
            hint = "" if set(group) <= set(LOCAL_TASKS) else (
                " (standard tasks download their datasets from the Hugging Face hub: without network access run "
                f"the offline tasks {', '.join(LOCAL_TASKS)})")
            raise TaskError(f"lm-eval failed on tasks {group} at {shots}-shot: {type(e).__name__}: {e}{hint}") from e
        for key in ("results", "n-shot", "configs", "versions"):
            report[key].update(out.get(key, {}))
    report["summary"] = [summary_row(task, report) for task in tasks if task in report["results"]]
    return report


def summary_row(task: str, report: dict) -> dict:
    metric = PAPER_METRIC.get(task) or LOCAL_METRIC.get(task, "acc")
    metrics = report["results"][task]
    key = next((k for k in metrics if k.split(",")[0] == metric), None)
    if key is None:  # e.g. gsm8k reports exact_match under filter names: take the first metric of that name
        key = next((k for k in metrics if k.startswith(metric)), None)
    return {"task": task, "n_shot": report["n-shot"].get(task), "metric": key, "value": metrics.get(key)}


def format_summary(rows: list[dict]) -> str:
    lines = ["| task | shots | metric | value |", "|---|---|---|---|"]
    for row in rows:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else str(row["value"])
        lines.append(f"| {row['task']} | {row['n_shot']} | {row['metric']} | {value} |")
    return "\n".join(lines)

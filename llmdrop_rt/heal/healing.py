"""Healing a dropped model: LoRA training on a text, the adapters merged, the result written as a new checkpoint.

The model trained is transformers' model of the dropped checkpoint with the dropped modules as weightless stand-ins
(`heal.hf_model`), so the adapters learn to repair what the dropped model really computes. Objectives:
- `lm`: next-token cross-entropy on the training sequences;
- `distill`: KL divergence from the undropped teacher's distributions on the same tokens (`heal.distill`).

The output is the input's format family (`output_format`), with the same drop plan: only the adapted projection
weights change; norms, embeddings and every other tensor are copied as stored. It is written in a staging folder
and renamed into place by `io.export`; the source is never written. The same seed gives the same weights.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import DropPlan, ModelConfig
from ..devices import DTYPES
from ..drop.calibration import CalibrationSet
from ..drop.perplexity import PerplexityResult, evaluate_perplexity
from ..io.checkpoint import CheckpointError, CheckpointReader
from ..io.export import check_destination, export_model
from ..model import hf_names
from .distill import TeacherTopK, top_k_kl
from .hf_model import HEALABLE_FAMILIES, load_transformers_model
from .lora import adapter_tensors, add_adapters, merged_weights, train

OBJECTIVES = ("lm", "distill")


class HealError(ValueError):
    """A healing request that cannot be carried out as asked."""


@dataclass(frozen=True)
class HealSettings:
    """objective: lm | distill; rank / alpha: LoRA's (alpha None: 2 x rank); steps of `batch_size` sequences
    each; lr: AdamW's peak learning rate; top_k: teacher log-probabilities kept per position (distill); seed: the
    adapters' initial values and the order of the sequences."""

    objective: str = "lm"
    rank: int = 8
    alpha: float | None = None
    steps: int = 100
    batch_size: int = 4
    lr: float = 5e-4
    top_k: int = 64
    seed: int = 0

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    def check(self):
        if self.objective not in OBJECTIVES:
            raise HealError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        for name in ("rank", "steps", "batch_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HealError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise HealError(f"{name} must be a positive number, got {value!r}")


@dataclass
class HealResult:
    destination: Path
    plan: DropPlan
    settings: HealSettings
    output_format: str
    teacher: str | None
    losses: list[float]
    train_seconds: float
    eval_before: PerplexityResult | None = None
    eval_after: PerplexityResult | None = None
    # the trained adapters as peft names them ('base_model.model....q_proj.lora_A.weight'); merged: W + B·A·alpha/rank
    adapters: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "destination": str(self.destination), **self.plan.to_config_lists(), "output_format": self.output_format,
            "settings": asdict(self.settings), "lora_alpha": self.settings.lora_alpha, "teacher": self.teacher,
            "losses": self.losses, "train_seconds": self.train_seconds,
            "eval_before": self.eval_before.to_dict() if self.eval_before else None,
            "eval_after": self.eval_after.to_dict() if self.eval_after else None,
        }


def output_format(cfg: ModelConfig, plan: DropPlan) -> str:
    """The export format of the input's family: a DeciLM folder stays DeciLM; a folder with drop lists (LLM-Drop's
    strip or reference export) or a plan to apply becomes `strip` (a reference export cannot hold new weights);
    a plain checkpoint (a renumbered export, say) stays plain."""
    if cfg.block_drops is not None:
        return "decilm"
    if plan.drop_attn or plan.drop_mlp or any(name in cfg.raw for name in ("drop_attn_list", "drop_mlp_list")):
        return "strip"
    return "renumbered"


def resolve_teacher(source: Path, cfg: ModelConfig, plan: DropPlan, teacher: str | Path | None) -> Path:
    """The undropped model to distill from: `teacher`, else the source itself when it holds every weight."""
    if teacher is not None:
        folder = Path(teacher)
        teacher_cfg = ModelConfig.from_folder(folder)
        if teacher_cfg.vocab_size != cfg.vocab_size:
            raise HealError(f"teacher {folder}: vocab_size {teacher_cfg.vocab_size}, the model's is {cfg.vocab_size}")
        return folder
    if not (plan.drop_attn or plan.drop_mlp):
        raise HealError(f"{source} drops nothing, so it cannot be its own teacher: distill needs the undropped "
                        "model, pass teacher (--teacher FOLDER)")
    reader = CheckpointReader(source)
    layer = min(plan.drop_attn or plan.drop_mlp)
    unit = hf_names.ATTN_PROJECTIONS["q"] if layer in plan.drop_attn else hf_names.MLP_PROJECTIONS["up"]
    if not reader.has(f"{hf_names.layer_prefix(layer)}.{unit}.weight"):
        raise HealError(f"{source} lacks the dropped modules' weights (a strip, decilm or renumbered export): "
                        "distill needs the undropped model, pass teacher (--teacher FOLDER)")
    return source


def teacher_top_k(teacher: Path, tokens: torch.Tensor, settings: HealSettings, folder: Path, device, progress):
    """The teacher's top-k log-probabilities over `tokens`, computed by our runtime with nothing dropped."""
    from ..runtime import load

    try:
        llm = load(teacher, drop_attn=[], drop_mlp=[], dtype="float32", device=device)
    except CheckpointError as e:
        raise HealError(f"teacher {teacher} cannot be loaded undropped: {e}") from None
    if tokens.shape[1] > llm.cfg.max_position_embeddings:
        raise HealError(f"seq_len {tokens.shape[1]} exceeds the teacher's context {llm.cfg.max_position_embeddings}")
    k = min(settings.top_k, llm.cfg.vocab_size)
    return TeacherTopK.compute(llm.logits, tokens, k, folder, settings.batch_size, progress)


def perplexity_of(folder: Path, eval_tokens, seq_len: int | None, device, progress,
                  plan: DropPlan | None = None) -> PerplexityResult:
    """Perplexity of the checkpoint at `folder` (with `plan`, default its config's) in our runtime, fp32."""
    from ..runtime import load

    drops = {} if plan is None else {"drop_attn": sorted(plan.drop_attn), "drop_mlp": sorted(plan.drop_mlp)}
    llm = load(folder, dtype="float32", device=device, **drops)
    return evaluate_perplexity(llm.model, eval_tokens, seq_len, progress=progress, attn_backend=llm.engine.attn_backend)


def heal_model(source: str | Path, destination: str | Path, data: CalibrationSet,
               settings: HealSettings = HealSettings(), plan: DropPlan | None = None,
               teacher: str | Path | None = None, eval_tokens=None, eval_seq_len: int | None = None,
               device: str = "cpu", dtype: str = "float32", overwrite: bool = False,
               progress: bool = True) -> HealResult:
    """Heal the checkpoint at `source` with `plan` applied (default: its config's drop lists) by LoRA training on
    `data`'s sequences, and write the merged model into the new folder `destination` (see the module doc).
    `eval_tokens`: a held-out token sequence whose perplexity is measured before (on the source) and after (on
    the written checkpoint, through `load()`)."""
    settings.check()
    source, destination = Path(source).resolve(), Path(destination).absolute()
    if dtype not in DTYPES:
        raise HealError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    cfg = ModelConfig.from_folder(source)
    if cfg.architecture not in HEALABLE_FAMILIES:
        raise HealError(f"{source}: heal takes {' and '.join(HEALABLE_FAMILIES)} checkpoints (DeciLM included), "
                        f"not {cfg.architecture}")
    plan = plan if plan is not None else DropPlan.from_config(cfg)
    if plan.num_layers != cfg.num_layers:
        raise HealError(f"the drop plan is for {plan.num_layers} layers, {source} has {cfg.num_layers}")
    if data.seq_len > cfg.max_position_embeddings:
        raise HealError(f"seq_len {data.seq_len} exceeds the model's context {cfg.max_position_embeddings}")
    if data.tokens.max() >= cfg.vocab_size:
        raise HealError(f"training tokens reach id {int(data.tokens.max())}, the vocabulary has {cfg.vocab_size}")
    fmt = output_format(cfg, plan)
    check_destination(source, destination, overwrite)
    teacher_folder = resolve_teacher(source, cfg, plan, teacher) if settings.objective == "distill" else None
    eval_before = perplexity_of(source, eval_tokens, eval_seq_len, device, progress, plan) \
        if eval_tokens is not None else None

    tokens = data.tokens.to(device)
    order = sequence_order(data.n_samples, settings.steps * settings.batch_size, settings.seed)
    with tempfile.TemporaryDirectory(prefix="llmdrop-heal-") as scratch:
        targets = teacher_top_k(teacher_folder, data.tokens, settings, Path(scratch), device, progress) \
            if teacher_folder is not None else None

        def batch_loss(model, step):
            rows = order[step * settings.batch_size: (step + 1) * settings.batch_size]
            logits = model(input_ids=tokens[rows], use_cache=False).logits
            if targets is None:
                return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[rows, 1:].flatten())
            return top_k_kl(logits, *targets.rows(rows, device))

        model = load_transformers_model(source, plan, DTYPES[dtype], device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        peft_model = add_adapters(model, plan, settings.rank, settings.lora_alpha, settings.seed)
        started = time.perf_counter()
        losses = train(peft_model, batch_loss, settings.steps, settings.lr, progress)
        seconds = time.perf_counter() - started
    adapters = adapter_tensors(peft_model)
    del peft_model, model
    reader = CheckpointReader(source)
    stored = load_transformers_model(source, plan, torch.float32, device)
    healed = {name: weight.to(device="cpu", dtype=reader.get(name).dtype).contiguous()
              for name, weight in merged_weights(stored, plan, settings.rank, settings.lora_alpha, adapters).items()}
    del stored
    export_model(source, destination, plan, fmt, overwrite, tensors=healed)
    eval_after = perplexity_of(destination, eval_tokens, eval_seq_len, device, progress) \
        if eval_tokens is not None else None
    return HealResult(destination, plan, settings, fmt, str(teacher_folder) if teacher_folder else None, losses,
                      seconds, eval_before, eval_after, adapters)


def sequence_order(n_samples: int, count: int, seed: int) -> torch.Tensor:
    """`count` sequence indices: seeded shuffles of 0..n_samples-1, one after another (epochs)."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-count // n_samples)
    return torch.cat([torch.randperm(n_samples, generator=generator) for _ in range(epochs)])[:count]

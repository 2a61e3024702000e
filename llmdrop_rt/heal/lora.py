"""LoRA adapters on the kept projections of a dropped model, trained with `peft` (optional extra `heal`).

Every kept attention layer gets adapters on q/k/v/o, every kept MLP on gate/up/down; a dropped module is a
stand-in with no projection to adapt. The adapters start as peft initialises them (A random from the seeded torch
generator, B zero, so training starts from the dropped model itself), train with AdamW under a linear warmup and
cosine decay, and are merged by peft (W + B·A·alpha/rank) into the stored weights, read again in float32 (the
training may have run in a lower precision), so each merged weight is rounded once, to the stored dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..config import DropPlan
from ..model import hf_names

INSTALL_HINT = "healing needs the optional `peft` package: pip install 'llmdrop-rt[heal]' (or peft)"


def import_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return peft


def kept_projections(plan: DropPlan) -> list[str]:
    """Module names of every projection of a kept attention or MLP ('model.layers.0.self_attn.q_proj', ...)."""
    names = []
    for layer in range(plan.num_layers):
        prefix = hf_names.layer_prefix(layer)
        if plan.has_attn(layer):
            names += [f"{prefix}.{module}" for module in hf_names.ATTN_PROJECTIONS.values()]
        if plan.has_mlp(layer):
            names += [f"{prefix}.{module}" for module in hf_names.MLP_PROJECTIONS.values()]
    return names


def lora_config(plan: DropPlan, rank: int, alpha: float):
    peft = import_peft()
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                           target_modules=kept_projections(plan))


def add_adapters(model: nn.Module, plan: DropPlan, rank: int, alpha: float, seed: int) -> nn.Module:
    """peft's LoRA model around `model` (changed in place): only the adapters are trainable."""
    peft = import_peft()
    torch.manual_seed(seed)  # the A matrices' initial values
    return peft.get_peft_model(model, lora_config(plan, rank, alpha))


def adapter_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights as peft saves them ('...q_proj.lora_A.weight', ...), detached copies."""
    peft = import_peft()
    return {name: tensor.detach().clone() for name, tensor in peft.get_peft_model_state_dict(peft_model).items()}


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warmup over `warmup` steps, then cosine decay to zero at `steps`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def train(peft_model: nn.Module, batch_loss: Callable[[nn.Module, int], torch.Tensor], steps: int, lr: float,
          progress: bool = True) -> list[float]:
    """`steps` AdamW steps on `batch_loss(model, step)` over the trainable (adapter) parameters; the loss of
    each step, shown on a progress bar."""
    from tqdm.auto import tqdm

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 10)))
    peft_model.train()
    losses = []
    with tqdm(range(steps), desc="healing", disable=not progress) as bar:
        for step in bar:
            loss = batch_loss(peft_model, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    peft_model.eval()
    return losses


def merged_weights(model: nn.Module, plan: DropPlan, rank: int, alpha: float,
                   adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained `adapters` merged by peft (merge_and_unload) into `model`, transformers' model of the stored
    weights (changed in place): the merged projection weights by checkpoint tensor name."""
    peft = import_peft()
    peft_model = peft.get_peft_model(model, lora_config(plan, rank, alpha))
    loaded = peft.set_peft_model_state_dict(peft_model, adapters)
    if loaded.unexpected_keys:
        raise ValueError(f"adapter tensors that match no module: {loaded.unexpected_keys[:3]}")
    modules = dict(peft_model.merge_and_unload().named_modules())
    return {f"{name}.weight": modules[name].weight.detach() for name in kept_projections(plan)}
